"""Whole-model benchmark (BENCHMARKS.md, "Whole-model benchmark"): one exported sparse model, its
MLPs run densely (torch) and sparsely (twell for prefill, hybrid for training), in one process.

    python tools/bench_model.py EXPORT_DIR --data DATA_DIR [--batch 8] [--seq 2048]

EXPORT_DIR is a `megasparse export` folder of a model whose activations really are sparse (trained
with L1; tools/gpu_model_bench.sh trains, exports and benchmarks one). DATA_DIR is a `megasparse
data preprocess` folder: the inputs are real text from its valid split, since sparsity depends on
the input. Reported, per MLP path:
- prefill tokens/s: the decoder forward without the LM head (as the paper times it), no grad,
  eager (what a caller sees) and replayed from a CUDA graph (no host launch cost);
- training tokens/s: forward + backward + AdamW step, CE + lambda * L1 loss, on the same weights
  (a tiny learning rate keeps the activations as trained while it is timed);
- peak memory of each;
- measured nnz/token per layer on the inputs, and the prefill's relative error against an fp32
  torch forward of the same weights.
Writes bench/results/model_<gpu>.json and .md (BENCH_RESULTS_DIR overrides the folder).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_common import environment, gpu_slug, graph_replay_ms, rel_err, write_results  # noqa: E402

from megasparse.data.shards import open_preprocessed  # noqa: E402
from megasparse.inference import load_pretrained  # noqa: E402
from megasparse.model.backend_calibration import call_times_ms, median_call_ms, time_forward_backward_ms  # noqa: E402
from megasparse.model.sparse_mlp import (ReluGatedMLP, _hybrid_forward, _twell_forward, torch_gated_mlp,  # noqa: E402
                                         torch_gated_mlp_output)


def real_tokens(data_dir: str, batch: int, seq: int, offset: int = 0) -> torch.Tensor:
    """[batch, seq + 1] token ids read end to end from the valid split (train if too short)."""
    data = open_preprocessed(data_dir)
    need = batch * (seq + 1)
    for split in ("valid", "train"):
        tokens = data.splits[split]
        if tokens.num_tokens >= offset + need:
            ids = torch.from_numpy(tokens.read(offset, need).astype("int64"))
            return ids.view(batch, seq + 1)
    raise SystemExit(f"{data_dir} holds fewer than {offset + need} tokens in one split; lower --batch/--seq")


def sparse_mlps(model) -> list:
    return [layer.mlp for layer in model.layers if isinstance(layer.mlp, ReluGatedMLP)]


def set_backend(model, backend, track_stats: bool = True) -> None:
    """One backend for every sparse MLP, or a list with one per sparse MLP. track_stats=False:
    the torch path computes y only, as a dense inference would (the prefill's dense baseline)."""
    mlps = sparse_mlps(model)
    for mlp, b in zip(mlps, backend if isinstance(backend, list) else [backend] * len(mlps)):
        mlp.backend, mlp.track_stats = b, track_stats


@torch.no_grad()
def twell_overflow(x, mlp) -> dict:
    """How often this layer's real activations overflow a TwELL (row, tile) of the sparse columns:
    those tokens take the kernels' exact but slower overflow path (kernels/twell/ffn.py)."""
    from kernels.twell.reference import gate_twell_reference

    w = mlp._twell_layout.weights
    if w is None:   # the layout is still counting, or kept the dense path: no TwELL tiles
        return {"n_hot": None, "overflow_tiles": None, "overflow_tokens": None, "overflow_tokens_2plus": None}
    over = gate_twell_reference(x, w.w_gate, w.tile, w.cap, col0=w.n_hot).overflowed()
    return {"n_hot": w.n_hot, "overflow_tiles": int(over.sum()), "overflow_tokens": int(over.any(1).sum()),
            "overflow_tokens_2plus": int((over.sum(1) >= 2).sum())}


@torch.no_grad()
def mlp_inputs(model, ids) -> list[torch.Tensor]:
    """The [tokens, D] input each sparse MLP really gets for ids (one dense forward)."""
    inputs = []
    hooks = [mlp.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
             for mlp in sparse_mlps(model)]
    set_backend(model, "torch", track_stats=False)
    model.hidden_states(ids)
    for hook in hooks:
        hook.remove()
    return inputs


def per_layer_fwd_bwd(model, ids, warmup: int, iters: int) -> list[dict]:
    """Each MLP alone on the input it really gets: forward+backward torch vs hybrid (the trainer's
    `auto` measurement, backend_calibration.py) and forward torch vs twell (a prefill's)."""
    rows = []
    for i, (mlp, x) in enumerate(zip(sparse_mlps(model), mlp_inputs(model, ids))):
        weights = [mlp.gate_weight, mlp.up_weight, mlp.down_weight]
        ms = {name: time_forward_backward_ms(fn, x, weights, warmup, iters)
              for name, fn in (("torch", torch_gated_mlp), ("hybrid", _hybrid_forward))}
        with torch.no_grad():
            fwd = {"torch": median_call_ms(lambda: torch_gated_mlp_output(x, *weights), True, warmup, iters),
                   "torch_stats": median_call_ms(lambda: torch_gated_mlp(x, *weights), True, warmup, iters),
                   "twell": median_call_ms(lambda: _twell_forward(x, *weights, mlp._twell_layout), True, warmup, iters)}
        rows.append({"layer": i, "torch_ms": ms["torch"], "hybrid_ms": ms["hybrid"], "faster": min(ms, key=ms.get),
                     "fwd_torch_ms": fwd["torch"], "fwd_torch_stats_ms": fwd["torch_stats"], "fwd_twell_ms": fwd["twell"],
                     **twell_overflow(x, mlp)})
    return rows


def peak_gb(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


@torch.no_grad()
def nnz_per_layer(model, ids) -> list[dict]:
    """Measured on the benchmark's own inputs with the torch path (which counts every token)."""
    set_backend(model, "torch")
    out = model(ids)
    rows = []
    for i, per_token in enumerate(out.token_nnz):
        if per_token is None:
            continue
        fires = out.fire_counts[i]
        rows.append({"layer": i, "nnz_mean": per_token.float().mean().item(), "nnz_max": int(per_token.max()),
                     "never_fired": int((fires == 0).sum()), "busiest_rate": fires.max().item() / per_token.numel()})
    return rows


def prefill_case(model, ids, backend: str, warmup: int, iters: int) -> dict:
    set_backend(model, backend, track_stats=False)
    fn = lambda: model.hidden_states(ids)  # noqa: E731
    with torch.no_grad():
        times = call_times_ms(fn, True, warmup, iters)   # the first twell calls also calibrate unexported layouts
        mem = peak_gb(fn)
        out = fn()
        # The same prefill replayed from a CUDA graph: no host launch cost (twell issues ~15
        # launches per layer; a server would capture fixed shapes like this). Timed by do_bench,
        # which flushes L2 between calls, where the eager times above are warm.
        graph_ms = graph_replay_ms(fn)[0]
    ms = statistics.median(times)
    return {"backend": backend, "ms": ms, "tokens_per_s": ids.numel() / ms * 1e3, "peak_gb": mem,
            "times_ms": times, "graph_ms": graph_ms, "graph_tokens_per_s": ids.numel() / graph_ms * 1e3}, out


def train_case(model, ids, labels, backend, l1_coeff: float, lr: float, warmup: int, iters: int,
               label: str | None = None) -> dict:
    set_backend(model, backend)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(ids, labels)
        (out.ce_loss + l1_coeff * out.aux_loss).backward()
        opt.step()

    times = call_times_ms(step, True, warmup, iters)
    mem = peak_gb(step)
    used = [mlp.last_backend for mlp in sparse_mlps(model)]
    model.eval()
    ms = statistics.median(times)
    return {"backend": label or backend, "mlp_paths_used": used, "ms": ms, "tokens_per_s": ids.numel() / ms * 1e3,
            "peak_gb": mem, "times_ms": times}


def markdown(payload: dict) -> str:
    env, cfg = payload["environment"], payload["model"]
    lines = [f"# Whole-model benchmark on {env['gpu']}", "",
             f"Model: {payload['model_path']} ({payload['parameters'] / 1e6:.0f}M parameters; {cfg['n_layers']} layers, "
             f"D={cfg['d_model']}, H={cfg['ffn_hidden']}). Inputs: {payload['batch']} x {payload['seq']} tokens of real "
             f"text ({payload['data']}, valid split). Commit {env.get('git_commit')}, torch {env.get('torch')}, "
             f"triton {env.get('triton')}.", "",
             f"Sparsity: {payload['sparsity_note']}", "",
             "| workload | dense MLP (torch) | sparse MLP | speedup | peak GB dense / sparse |",
             "|---|---|---|---|---|"]
    train = payload["train"]
    for name, dense, sparse in (("prefill (no LM head)", payload["prefill"]["torch"], payload["prefill"]["twell"]),
                                ("training step (fwd+bwd+AdamW), every MLP hybrid", train["torch"], train["hybrid"]),
                                ("training step, each MLP on its faster path", train["torch"], train["auto"])):
        lines.append(f"| {name} | {dense['tokens_per_s']:,.0f} tok/s ({dense['ms']:.2f} ms) | "
                     f"{sparse['tokens_per_s']:,.0f} tok/s ({sparse['ms']:.2f} ms, {sparse['backend']}) | "
                     f"**{sparse['tokens_per_s'] / dense['tokens_per_s']:.2f}x** | "
                     f"{dense['peak_gb']:.1f} / {sparse['peak_gb']:.1f} |")
    dense, sparse = payload["prefill"]["torch"], payload["prefill"]["twell"]
    if "graph_ms" in dense and "graph_ms" in sparse:
        lines.append(f"| prefill replayed from a CUDA graph (no host launch cost; L2 flushed between calls) | "
                     f"{dense['graph_tokens_per_s']:,.0f} tok/s ({dense['graph_ms']:.2f} ms) | "
                     f"{sparse['graph_tokens_per_s']:,.0f} tok/s ({sparse['graph_ms']:.2f} ms, twell) | "
                     f"**{dense['graph_ms'] / sparse['graph_ms']:.2f}x** | |")
    err = payload["prefill_rel_err_vs_fp32"]
    lines += ["", f"Prefill hidden states, relative error against an fp32 torch forward: torch bf16 "
              f"{err['torch']:.2e}, twell {err['twell']:.2e}.", "",
              "| layer | nnz/token mean | max | never fired (of H) | busiest neuron's rate | twell n_hot | tokens with an "
              "overflowed tile | MLP fwd ms dense / dense+stats / twell | MLP fwd+bwd ms dense / hybrid |",
              "|---|---|---|---|---|---|---|---|---|"]
    timing, nan = {r["layer"]: r for r in payload["train_per_layer_fwd_bwd"]}, float("nan")
    for row in payload["nnz_per_layer"]:
        t = timing.get(row["layer"], {})
        lines.append(f"| {row['layer']} | {row['nnz_mean']:.1f} | {row['nnz_max']} | {row['never_fired']} | "
                     f"{row['busiest_rate']:.3f} | {t.get('n_hot', '-')} | {t.get('overflow_tokens', '-')} | "
                     f"{t.get('fwd_torch_ms', nan):.3f} / {t.get('fwd_torch_stats_ms', nan):.3f} / {t.get('fwd_twell_ms', nan):.3f} | "
                     f"{t.get('torch_ms', nan):.2f} / {t.get('hybrid_ms', nan):.2f} |")
    return "\n".join(lines) + "\n"


def add_model_and_data_args(ap: argparse.ArgumentParser) -> None:
    """The arguments every tool on an exported model shares: the model, real text, the batch."""
    ap.add_argument("model", help="a `megasparse export` folder of a trained sparse model")
    ap.add_argument("--data", required=True, help="a `megasparse data preprocess` folder (real text)")
    ap.add_argument("--batch", type=int, default=8, help="sequences of real text per call")
    ap.add_argument("--seq", type=int, default=2048, help="tokens per sequence")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_data_args(ap)
    ap.add_argument("--train-batch", type=int, default=None, help="sequences per training step (default --batch)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--l1-coeff", type=float, default=0.01, help="lambda of the timed training loss")
    ap.add_argument("--lr", type=float, default=1e-7, help="AdamW lr while timing (tiny: activations stay as trained)")
    ap.add_argument("--sparsity-note", default="as recorded in the export's config.json",
                    help="how the model's sparsity was obtained (goes in the report)")
    ap.add_argument("--stem", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_model needs a CUDA GPU")
    env = environment()
    print(env, flush=True)
    model = load_pretrained(a.model, device="cuda", dtype=torch.bfloat16, mlp_backend="torch")
    with open(os.path.join(a.model, "config.json")) as fh:
        meta = json.load(fh).get("megasparse", {})
    tokens = real_tokens(a.data, a.batch, a.seq).cuda()
    ids = tokens[:, :-1].contiguous()

    nnz = nnz_per_layer(model, ids)
    print("nnz/token per layer:", [round(r["nnz_mean"], 1) for r in nnz], flush=True)
    prefill, outs = {}, {}
    for backend in ("torch", "twell"):
        prefill[backend], outs[backend] = prefill_case(model, ids, backend, a.warmup, a.iters)
        print("prefill", backend, f"{prefill[backend]['ms']:.2f} ms", flush=True)
    twell_layouts = [{"n_hot": getattr(layer.mlp._twell_layout.weights, "n_hot", None),
                      "choice": layer.mlp._twell_layout.choice, "timings_ms": layer.mlp._twell_layout.timings_ms}
                     for layer in model.layers if isinstance(layer.mlp, ReluGatedMLP)]
    # fp32 reference of the same weights (torch path), for the error column
    ref_model = load_pretrained(a.model, device="cuda", dtype=torch.float32, mlp_backend="torch")
    with torch.no_grad():
        ref = ref_model.hidden_states(ids)
    err = {b: rel_err(outs[b].float(), ref) for b in outs}
    del ref_model, ref, outs
    torch.cuda.empty_cache()

    tb = a.train_batch or a.batch
    train_ids, labels = tokens[:tb, :-1].contiguous(), tokens[:tb, 1:].contiguous()
    layers = per_layer_fwd_bwd(model, train_ids, a.warmup, a.iters)
    print("per layer fwd+bwd ms (torch, hybrid):", [(round(r["torch_ms"], 2), round(r["hybrid_ms"], 2)) for r in layers])
    train = {}
    for name, backend in (("torch", "torch"), ("hybrid", "hybrid"), ("auto", [r["faster"] for r in layers])):
        train[name] = train_case(model, train_ids, labels, backend, a.l1_coeff, a.lr, a.warmup, a.iters,
                                 label="per-layer faster (auto)" if name == "auto" else None)
        print("train", name, f"{train[name]['ms']:.2f} ms", train[name]["mlp_paths_used"], flush=True)

    payload = {"environment": env, "model_path": a.model, "model": vars(model.cfg), "parameters": model.num_parameters(),
               "export_metadata": meta, "data": a.data, "batch": a.batch, "seq": a.seq, "train_batch": tb,
               "sparsity_note": a.sparsity_note, "nnz_per_layer": nnz, "prefill": prefill, "twell_layouts": twell_layouts,
               "prefill_rel_err_vs_fp32": err, "train": train, "train_per_layer_fwd_bwd": layers, "train_l1_coeff": a.l1_coeff, "train_lr": a.lr}
    for k, v in payload["prefill"].items():
        print(k, v["tokens_per_s"])
    paths = write_results(a.stem or f"model_{gpu_slug()}", payload, markdown(payload))
    print(markdown(payload))
    print("wrote", *paths)


if __name__ == "__main__":
    main()
