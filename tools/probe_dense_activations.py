#!/usr/bin/env python3
"""How the twell kernels and the model's `auto` eval path fare as activations get denser.

    python tools/probe_dense_activations.py [--M 16384] [--nnz 29 120 280 560 1400 2800]

The benchmark layer (D=2048, H=5632) with BENCHMARKS.md's generator at each nnz target, plus the
tensor-parallel widths at their share of nnz 29. For each: dense torch, every neuron sparse, the
calibrated hot layout (popular neurons dense), and a ReluGatedMLP with model.mlp_backend=auto in
eval after calibrating on the timed batch (twell_layout.py: which layout it kept and what it timed).
Times are do_bench medians in one process. Writes bench/results/probe_dense_activations_<gpu>.{json,md}
($BENCH_RESULTS_DIR to redirect).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import environment, gpu_slug, median_ms, rel_err, write_results  # noqa: E402
from megasparse.model.backend_calibration import back_to_back_ms, median_call_ms  # noqa: E402
from bench_ffn_infer import CALIB_TOKENS, D_MODEL, H_FULL, fp32_reference, make_inputs  # noqa: E402
from kernels import twell  # noqa: E402
from megasparse.model.sparse_mlp import ReluGatedMLP  # noqa: E402
from megasparse.model.twell_layout import dense_ffn  # noqa: E402


def auto_mlp(f, h):
    mlp = ReluGatedMLP(D_MODEL, h, backend="auto").cuda().to(torch.bfloat16)
    with torch.no_grad():
        for p, w in ((mlp.gate_weight, f.w_gate), (mlp.up_weight, f.w_up), (mlp.down_weight, f.w_down)):
            p.copy_(w)
    return mlp


def three_timings(call) -> dict:
    """The same call timed three ways (ms): do_bench (L2 flushed between calls), back to back
    (the twell layout's own measure), and each call alone and waited for (the layout's old one)."""
    return {"do_bench": median_ms(call), "back_to_back": back_to_back_ms(call, 2, 3, 4),
            "alone": median_call_ms(call, True, 2, 5)}


@torch.no_grad()
def case(m: int, h: int, nnz: float) -> dict:
    f, x, xc = make_inputs(m, h, nnz)
    ws = (f.w_gate, f.w_up, f.w_down)
    ref = fp32_reference(x, f)
    w0 = twell.prepare_weights(*ws)
    _, fires = dense_ffn(xc, *ws, fire_counts=True)
    hot = twell.calibrate(w0, fires, CALIB_TOKENS)
    row = {"M": m, "H": h, "nnz_target": nnz, "nnz_mean": fires.sum().item() / CALIB_TOKENS, "n_hot": hot.n_hot,
           "dense": three_timings(lambda: dense_ffn(x, *ws))}
    for name, w in (("all_sparse", w0), ("hot", hot)):
        row[name] = three_timings(lambda: twell.twell_ffn(x, w))
        row[f"{name}_err"] = rel_err(twell.twell_ffn(x, w), ref)
    mlp = auto_mlp(f, h)
    mlp(x[None])    # >= 8192 tokens: the layout counts them, then times its candidates on this batch
    layout = mlp._twell_layout
    kept = (lambda: dense_ffn(x, *ws)) if layout.weights is None else (lambda: twell.twell_ffn(x, layout.weights))
    row.update(auto_choice=layout.choice, auto_timings_ms=layout.timings_ms, auto_nnz_fraction=layout.nnz_fraction,
               auto_ms=median_ms(lambda: mlp(x[None])), auto_kept_layout_ms=median_ms(kept),
               auto_err=rel_err(mlp(x[None])[0], ref), auto_last_backend=mlp.last_backend)
    print(row, flush=True)
    return row


def markdown(payload: dict) -> str:
    env = payload["environment"]
    lines = [f"# twell and the `auto` eval layout against activation density ({env['gpu']})", "",
             f"torch {env['torch']}, triton {env['triton']}, commit {env['git_commit']}, {env['date_utc']}. "
             f"M={payload['M']}, D={D_MODEL}, BENCHMARKS.md's generator; one process; x = dense ms / this ms. "
             "Each path is timed three ways (ms): do_bench median (L2 flushed between calls: the protocol's "
             "number), back to back (what the layout times), and alone (each call waited for). `auto`: "
             "ReluGatedMLP(model.mlp_backend=auto) in eval after calibrating on the timed batch: it times "
             "dense, the hot layout, and every-neuron-sparse only at nnz/H <= 5%, back to back, and keeps the "
             "fastest; its call is timed with do_bench through the module, and its kept layout alone.", "",
             "| H | nnz/token | nnz/H | dense | all sparse (x, err) | hot layout (n_hot, x, err) | auto keeps | "
             "auto, module / layout alone (x, err) | auto timed |", "|---|---|---|---|---|---|---|---|---|"]

    def three(t):
        return f"{t['do_bench']:.3f} / {t['back_to_back']:.3f} / {t['alone']:.3f}"

    for r in payload["rows"]:
        dense = r["dense"]["do_bench"]
        timed = ", ".join(f"{k} {v:.3f}" for k, v in r["auto_timings_ms"].items()) or "-"
        lines.append(f"| {r['H']} | {r['nnz_mean']:.1f} | {r['nnz_mean'] / r['H']:.2%} | {three(r['dense'])} | "
                     f"{three(r['all_sparse'])} ({dense / r['all_sparse']['do_bench']:.2f}x, {r['all_sparse_err']:.1e}) | "
                     f"{three(r['hot'])} ({r['n_hot']}, {dense / r['hot']['do_bench']:.2f}x, {r['hot_err']:.1e}) | "
                     f"{r['auto_choice']} | {r['auto_ms']:.3f} / {r['auto_kept_layout_ms']:.3f} "
                     f"({dense / r['auto_ms']:.2f}x, {r['auto_err']:.1e}) | {timed} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--M", type=int, default=16384)
    ap.add_argument("--nnz", type=float, nargs="*", default=[29, 120, 280, 560, 1400, 2800],
                    help="nnz/token targets at H=5632")
    ap.add_argument("--tp-widths", type=int, nargs="*", default=[2816, 1408],
                    help="local H of tensor-parallel shards, at their share of nnz 29")
    a = ap.parse_args()
    torch.manual_seed(0)
    cases = [(H_FULL, n) for n in a.nnz] + [(h, 29.0 * h / H_FULL) for h in a.tp_widths]
    rows = [case(a.M, h, n) for h, n in cases]
    payload = {"environment": environment(), "M": a.M, "rows": rows}
    for p in write_results(f"probe_dense_activations_{gpu_slug()}", payload, markdown(payload)):
        print("wrote", p)


if __name__ == "__main__":
    main()
