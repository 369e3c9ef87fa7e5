#!/usr/bin/env python3
"""An eval forward of a model whose activations are not sparse yet, with model.mlp_backend=auto.

    python tools/probe_eval_untrained.py [--label now] [--micro-batches 4]

The whole-model benchmark's shape (configs/sparse05b.yaml: 8 layers, D=2048, H=5632) freshly
initialized, so each ReLU gate fires on about half its neurons, as before the L1 term has
sparsified a training run. Runs `--micro-batches` eval forwards of 8 x 2048 tokens (the config's
micro-batch) under torch.no_grad(), as Trainer.evaluate does, with every MLP on `auto` and then
on `torch`: the time of the first forward (where each layer's twell layout calibrates), of the
whole eval, and what each layout kept. It uses only APIs older trees also have, so it can time a
tree from before kernels/twell/NOTES.md run 17 too (copy it into that tree's tools/).
Writes bench/results/probe_eval_untrained_<gpu>_<label>.{json,md} ($BENCH_RESULTS_DIR to redirect).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import environment, gpu_slug, write_results  # noqa: E402
from megasparse.config import ModelConfig  # noqa: E402
from megasparse.model.transformer import SparseLlama  # noqa: E402
from megasparse.parallel.plan import ParallelPlan  # noqa: E402


def eval_pass(model, batches) -> dict:
    """ms of each forward, each waited for (the first is where layouts calibrate)."""
    times = []
    for ids in batches:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(ids, ids)     # labels: the fused CE of Trainer.evaluate (no [tokens, vocab] logits)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    later = sorted(times[1:])
    return {"first_ms": times[0], "total_ms": sum(times), "later_median_ms": later[len(later) // 2]}


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", default="now", help="names the results file (e.g. the tree's commit)")
    ap.add_argument("--micro-batches", type=int, default=4, help="eval forwards (the config's eval_iters)")
    a = ap.parse_args()
    if a.micro_batches < 2:
        ap.error(f"--micro-batches={a.micro_batches}: need at least 2 (the first forward is timed apart from the rest)")
    cfg = ModelConfig(vocab_size=32768, d_model=2048, n_layers=8, n_heads=16, n_kv_heads=16, ffn_hidden=5632,
                      max_seq_len=2048)
    model = SparseLlama(cfg, ParallelPlan(init_seed=0)).cuda().to(torch.bfloat16).eval()
    gen = torch.Generator(device="cuda").manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (8, 2048), device="cuda", generator=gen)
               for _ in range(a.micro_batches)]
    mlps = [layer.mlp for layer in model.layers]
    for mlp in mlps:
        mlp.backend = "torch"
    out = model(batches[0], batches[0])
    nnz = [t.float().mean().item() for t in out.token_nnz]
    warm = eval_pass(model, batches[:2])   # cuBLAS and allocator warm-up on these shapes
    payload = {"environment": environment(), "label": a.label, "tokens_per_forward": batches[0].numel(),
               "nnz_per_token_by_layer": nnz, "torch": eval_pass(model, batches), "torch_warmup": warm}
    for mlp in mlps:
        mlp.backend = "auto"
    payload["auto"] = eval_pass(model, batches)
    payload["auto_again"] = eval_pass(model, batches)   # layouts final: the steady state
    for mlp in mlps:
        mlp.up_weight.mul_(1.001)   # an optimizer step: every layout is rebuilt (the gate, so nnz, unchanged)
    payload["auto_after_update"] = eval_pass(model, batches)
    payload["layouts"] = [{"choice": getattr(m._twell_layout, "choice", None),
                           "n_hot": getattr(getattr(m._twell_layout, "weights", None), "n_hot", None),
                           "timings_ms": m._twell_layout.timings_ms, "last_backend": m.last_backend} for m in mlps]
    print(payload, flush=True)
    t, s, s2, s3 = payload["torch"], payload["auto"], payload["auto_again"], payload["auto_after_update"]
    md = [f"# Eval forwards of an untrained 0.5B-shape model, mlp_backend=auto vs torch ({payload['environment']['gpu']})",
          "", f"Tree {a.label} (commit {payload['environment'].get('git_commit')}), torch "
          f"{payload['environment']['torch']}, triton {payload['environment']['triton']}. 8 layers, D=2048, H=5632, "
          f"fresh init; {a.micro_batches} eval forwards of 8 x 2048 tokens under no_grad, each waited for. "
          f"nnz/token by layer: {', '.join(f'{v:.0f}' for v in nnz)} (of 5632).", "",
          "| MLP backend | first forward ms | whole eval ms | later forwards, median ms |", "|---|---|---|---|",
          f"| torch | {t['first_ms']:.1f} | {t['total_ms']:.1f} | {t['later_median_ms']:.1f} |",
          f"| auto, first eval (layouts calibrate) | {s['first_ms']:.1f} | {s['total_ms']:.1f} | {s['later_median_ms']:.1f} |",
          f"| auto, second eval (same weights) | {s2['first_ms']:.1f} | {s2['total_ms']:.1f} | {s2['later_median_ms']:.1f} |",
          f"| auto, eval after a weight update (layouts rebuilt) | {s3['first_ms']:.1f} | {s3['total_ms']:.1f} | "
          f"{s3['later_median_ms']:.1f} |",
          "", "The first auto eval also pays this process's Triton compilation and autotuning for the twell "
          "kernels at these shapes.",
          "", "Layouts kept: " + ", ".join(str(r["choice"] or r["n_hot"]) for r in payload["layouts"]) + "."]
    for p in write_results(f"probe_eval_untrained_{gpu_slug()}_{a.label}", payload, "\n".join(md)):
        print("wrote", p)


if __name__ == "__main__":
    main()
