"""Where a whole-model prefill and training step spend their GPU time, and why the twell MLP is
slower on a trained model's activations than on BENCHMARKS.md's generator. One process, one GPU.

    python tools/probe_model_time.py --export EXPORT_DIR --data DATA_DIR   # a trained, exported model
    python tools/probe_model_time.py --config configs/sparse05b.yaml       # random weights: non-MLP part only

Reports (bench/results/probe_model_time_<gpu>.json and .md; BENCH_RESULTS_DIR overrides):
1. GPU kernel time per category (GEMM, attention, RMSNorm, rotary, twell kernels, other
   elementwise) of one prefill (decoder without LM head) and one forward+backward, from the torch
   profiler, with the dense MLP (y only) and, for an export, the twell MLP;
2. the same prefill and forward+backward timed with the torch forms of RMSNorm and rotary that
   the fused ones replaced (monkeypatched in this process), so the change is measured in one
   process;
3. for an export, per layer on its real input: the dense MLP and twell, each eager (what a
   caller sees, host cost included) and replayed from a CUDA graph (no host cost; do_bench, L2
   flushed), twell's GPU time per kernel, and the layer's overflowed TwELL tiles.
"""
from __future__ import annotations

import argparse
import os
from contextlib import nullcontext
import re
import statistics
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_common import environment, gpu_slug, graph_replay_ms, write_results  # noqa: E402
from bench_model import mlp_inputs, real_tokens, set_backend, sparse_mlps, twell_overflow  # noqa: E402

from kernels.rotary import rotary_reference  # noqa: E402
from kernels.twell import twell_ffn  # noqa: E402
from megasparse.model import attention  # noqa: E402
from megasparse.model.backend_calibration import call_times_ms  # noqa: E402
from megasparse.model.sparse_mlp import _twell_forward, torch_gated_mlp_output  # noqa: E402

CATEGORIES = (("twell", r"_gate_twell|_gate_up_dense|_pack_kernel|_updown|_overflow|_list_overflowed"),
              ("rotary", r"_rotary_kernel"),
              ("attention", r"flash|fmha|attention"),
              ("gemm", r"gemm|nvjet|cutlass|xmma|cublas|splitK"),
              ("rmsnorm", r"rms|layer_norm"),
              ("optimizer", r"adam|multi_tensor"))


def category(kernel: str) -> str:
    for name, pattern in CATEGORIES:
        if re.search(pattern, kernel, re.IGNORECASE):
            return name
    return "other elementwise / reduction"


def kernel_ms(fn, calls: int = 3) -> dict[str, float]:
    """GPU ms per call of each CUDA kernel fn launches (torch profiler, after one warm call)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
        if us and evt.key:
            out[evt.key] += us / 1e3 / calls
    return dict(out)


def by_category(kernels: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for name, ms in kernels.items():
        out[category(name)] += ms
    return {k: round(v, 3) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def torch_form_rmsnorm(self, x):   # what RMSNorm.forward was before the fused F.rms_norm
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
    return xf.to(x.dtype) * self.weight


class TorchForms:
    """Context: RMSNorm and rotary in their former torch forms (~6 and ~10 passes)."""

    def __enter__(self):
        self.saved = attention.RMSNorm.forward, attention.rotary
        attention.RMSNorm.forward, attention.rotary = torch_form_rmsnorm, rotary_reference

    def __exit__(self, *exc):
        attention.RMSNorm.forward, attention.rotary = self.saved


def workloads(model, ids, labels):
    def prefill():
        with torch.no_grad():
            model.hidden_states(ids)

    def fwd_bwd():
        out = model(ids, labels)
        out.ce_loss.backward()
        model.zero_grad(set_to_none=True)

    return {"prefill": prefill, "fwd+bwd": fwd_bwd}


def whole_model(model, ids, labels, backends, iters: int) -> list[dict]:
    rows = []
    for backend in backends:
        set_backend(model, backend, track_stats=False)
        for forms in ("fused", "torch forms"):
            with TorchForms() if forms == "torch forms" else nullcontext():
                for name, fn in workloads(model, ids, labels).items():
                    if name == "fwd+bwd" and backend == "twell":
                        continue   # twell is inference-only
                    ms = statistics.median(call_times_ms(fn, True, 2, iters))
                    kernels = kernel_ms(fn)
                    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:15]
                    rows.append({"workload": name, "mlp": backend, "norm_rotary": forms, "ms": round(ms, 3),
                                 "gpu_ms_by_category": by_category(kernels),
                                 "top_kernels_ms": {k: round(v, 3) for k, v in top}})
                    print(rows[-1], flush=True)
    return rows


def per_layer(model, ids, iters: int) -> list[dict]:
    rows = []
    for i, (mlp, x) in enumerate(zip(sparse_mlps(model), mlp_inputs(model, ids))):
        w = (mlp.gate_weight, mlp.up_weight, mlp.down_weight)
        layout = mlp._twell_layout
        with torch.no_grad():
            while not layout.final:     # builds the layout (a preset one at once; else after counting)
                _twell_forward(x, *w, layout)
        fns = {"dense": lambda: torch_gated_mlp_output(x, *w).y,
               "twell": lambda: _twell_forward(x, *w, layout).y}
        if layout.weights is not None:  # a twell layout, not the dense path
            # the cold gate GEMM in one chunk instead of CHUNK_MIB ones: 3 fewer launches per
            # chunk saved, for the host-bound eager call
            fns["twell_one_chunk"] = lambda: twell_ffn(x, layout.weights, gate_chunk_rows=x.shape[0])
        row = {"layer": i, **twell_overflow(x, mlp)}
        with torch.no_grad():
            for name, fn in fns.items():
                row[f"{name}_eager_ms"] = round(statistics.median(call_times_ms(fn, True, 2, iters)), 4)
                row[f"{name}_graph_ms"] = round(graph_replay_ms(fn)[0], 4)
            row["twell_kernels_ms"] = {k: round(v, 4) for k, v in sorted(kernel_ms(fns["twell"]).items(),
                                                                           key=lambda kv: -kv[1])}
        rows.append(row)
        print(row, flush=True)
    return rows


def markdown(payload: dict) -> str:
    env = payload["environment"]
    lines = [f"# Where the whole model's time goes, {env['gpu']} (commit {env.get('git_commit')})", "",
             f"Model: {payload['source']}; {payload['tokens']} tokens per call; torch {env.get('torch')}, "
             f"triton {env.get('triton')}. ms: median of {payload['iters']} event-timed calls; categories: GPU "
             "kernel time per call from the torch profiler.", "",
             "| workload | MLP | RMSNorm + rotary | ms | GPU ms by kernel category |", "|---|---|---|---|---|"]
    for r in payload["whole_model"]:
        cats = ", ".join(f"{k} {v:.2f}" for k, v in r["gpu_ms_by_category"].items())
        lines.append(f"| {r['workload']} | {r['mlp']} | {r['norm_rotary']} | {r['ms']:.2f} | {cats} |")
    if payload.get("per_layer"):
        lines += ["", "Per layer, on its real input (ms):", "",
                  "| layer | n_hot | tokens with an overflowed tile | dense eager / graph | twell eager / graph | "
                  "twell, gate in one chunk, eager / graph | twell's three largest kernels (GPU ms) |",
                  "|---|---|---|---|---|---|---|"]
        for r in payload["per_layer"]:
            top = ", ".join(f"{k[:40]} {v:.3f}" for k, v in list(r["twell_kernels_ms"].items())[:3])
            lines.append(f"| {r['layer']} | {r['n_hot']} | {r['overflow_tokens']} | {r['dense_eager_ms']:.3f} / "
                         f"{r['dense_graph_ms']:.3f} | {r['twell_eager_ms']:.3f} / {r['twell_graph_ms']:.3f} | "
                         f"{r['twell_one_chunk_eager_ms']:.3f} / {r['twell_one_chunk_graph_ms']:.3f} | {top} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--export", help="a `megasparse export` folder (trained: its activations are sparse)")
    src.add_argument("--config", help="a run config; the model gets random weights (non-MLP timings only)")
    ap.add_argument("--data", help="a `megasparse data preprocess` folder (needed with --export)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--stem", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("probe_model_time needs a CUDA GPU")
    env = environment()
    print(env, flush=True)
    if a.export:
        if not a.data:
            raise SystemExit("--export needs --data (the model's sparsity depends on real text)")
        from megasparse.inference import load_pretrained
        model = load_pretrained(a.export, device="cuda", dtype=torch.bfloat16, mlp_backend="torch", track_stats=False)
        tokens = real_tokens(a.data, a.batch, a.seq).cuda()
    else:
        from megasparse.config import load_config
        from megasparse.model.transformer import SparseLlama
        cfg = load_config(a.config).model
        torch.manual_seed(0)
        model = SparseLlama(cfg).to("cuda", torch.bfloat16)
        tokens = torch.randint(0, cfg.vocab_size, (a.batch, a.seq + 1), device="cuda")
    ids, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    backends = ("torch", "twell") if a.export else ("torch",)
    payload = {"environment": env, "source": a.export or f"{a.config} (random weights)", "tokens": ids.numel(),
               "iters": a.iters, "whole_model": whole_model(model, ids, labels, backends, a.iters),
               "per_layer": per_layer(model, ids, a.iters) if a.export else []}
    paths = write_results(a.stem or f"probe_model_time_{gpu_slug()}", payload, markdown(payload))
    print(markdown(payload))
    print("wrote", *paths)


if __name__ == "__main__":
    main()
