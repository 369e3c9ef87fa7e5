#!/usr/bin/env python3
"""Could an fp8 gate *screen* pay for the cold columns? (twell NOTES.md run 18)

    python tools/probe_fp8_screen.py [--M 16384 131072]

The idea: on an H100 every bf16 GEMM of the hot/cold pipeline runs at the 700 W cap, so the cold
gate (4096 columns of hot1536) costs ~0.4 ms whatever kernel computes it. fp8 tensor cores do
twice the FLOPs per clock and spend less energy per FLOP. An fp8 gate g' = q(x) q(W_g)^T can
decide *which* neurons may fire, if a margin covers its error: candidates are g' > -c * s_tj,
with s_tj = ||x_t|| ||w_j|| / sqrt(D) (the scale of the fp8 rounding error of a dot product).
The candidates' gates would then be recomputed exactly from bf16 rows, so the cost moves to the
gathers: one more W_g row per candidate.

This probe measures, on BENCHMARKS.md's generator and the hot1536 layout's cold columns:
- the cold gate as a bf16 cuBLAS GEMM and as torch._scaled_mm fp8 (rowwise scales), with and
  without fast accumulation, and the cost of quantizing x;
- the screen's error (g' - g) / s_tj, and per margin c: candidates per true fire, fires missed,
  and the error in y if missed fires are dropped (against the fp32 reference);
- the walk over the candidate lists (the existing up/down kernel on pack(g' + c s)): what the
  extra entries cost, before the extra W_g gathers.
Writes bench/results/probe_fp8_screen_<gpu>.{json,md} ($BENCH_RESULTS_DIR to redirect).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import environment, gpu_slug, median_ms, write_results  # noqa: E402
from bench_ffn_infer import CALIB_TOKENS, fp32_reference, make_inputs  # noqa: E402
from kernels import twell  # noqa: E402
from kernels.twell.gate import gate_twell  # noqa: E402
from kernels.twell.pack import pack_twell  # noqa: E402
from kernels.twell.updown import updown  # noqa: E402
from megasparse.model.twell_layout import dense_ffn  # noqa: E402

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
MARGINS = (0.0, 0.02, 0.05, 0.08, 0.1, 0.2)


def quantize_rows(t: torch.Tensor):
    """(fp8 copy, fp32 per-row scale [rows, 1]) with each row's amax mapped to FP8_MAX."""
    scale = t.abs().amax(1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (t.float() / scale).to(FP8), scale


def fp8_gate(xq, sx, wq, sw, fast):
    return torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw.t().contiguous(), out_dtype=torch.bfloat16, use_fast_accum=fast)


@torch.no_grad()
def case(m: int, full: bool) -> dict:
    f, x, xc = make_inputs(m, 5632, 29)
    ws = (f.w_gate, f.w_up, f.w_down)
    w0 = twell.prepare_weights(*ws)
    _, fires = dense_ffn(xc, *ws, fire_counts=True)
    hot = twell.calibrate(w0, fires, CALIB_TOKENS)
    n_hot, d = hot.n_hot, x.shape[1]
    wc = hot.w_gate[n_hot:].contiguous()                  # the cold gate rows, internal order
    xq, sx = quantize_rows(x)
    wq, sw = quantize_rows(wc)
    row = {"M": m, "n_hot": n_hot, "cold_cols": wc.shape[0],
           "bf16_gate_ms": median_ms(lambda: torch.mm(x, wc.t())),
           "fp8_gate_ms": median_ms(lambda: fp8_gate(xq, sx, wq, sw, False)),
           "fp8_gate_fast_ms": median_ms(lambda: fp8_gate(xq, sx, wq, sw, True)),
           "quantize_x_ms": median_ms(lambda: quantize_rows(x)),
           "bf16_full_gate_ms": median_ms(lambda: torch.mm(x, hot.w_gate.t()))}
    if not full:
        return row
    counts, pairs = gate_twell(x, hot.w_gate, hot.tile, hot.cap, n_hot)
    y = torch.empty_like(x)
    walk = lambda c, p: updown(x, hot.w_gate, hot.w_up, hot.w_down_t, c, p, y,  # noqa: E731
                               tile=hot.tile, cap=hot.cap, col0=n_hot)
    row["walk_exact_ms"] = median_ms(lambda: walk(counts, pairs))
    row["fires_cold"] = int(counts.clamp(max=hot.cap).sum())
    g = x.float() @ wc.float().t()
    gq = fp8_gate(xq, sx, wq, sw, True).float()
    s = x.float().norm(dim=1, keepdim=True) * wc.float().norm(dim=1)[None, :] / math.sqrt(d)
    err = (gq - g) / s
    row["err_std"], row["err_absmax"] = err.std().item(), err.abs().max().item()
    ref = fp32_reference(x, f)
    u = x.float() @ hot.w_up[n_hot:].float().t()
    fire = g > 0
    row["margins"] = []
    for c in MARGINS:
        cand = gq > -c * s
        missed = fire & ~cand
        h_missed = torch.where(missed, torch.relu(g) * u, 0.0)
        dy = h_missed @ hot.w_down_t[n_hot:].float()
        shifted = (gq + c * s).to(torch.bfloat16)     # pack keeps entries > 0: the candidates
        cc, pp = torch.empty_like(counts), torch.empty_like(pairs)
        pack_twell(shifted, cc, pp, hot.tile, hot.cap)
        row["margins"].append({"c": c, "candidates_per_fire": cand.sum().item() / fire.sum().item(),
                               "missed": int(missed.sum()), "fires": int(fire.sum()),
                               "missed_h_share": (h_missed.abs().sum() / (torch.relu(g) * u).abs().sum()).item(),
                               "y_err_from_misses": (dy.norm() / ref.norm()).item(),
                               "overflow_tiles": int((cc > hot.cap).sum()),
                               "walk_ms": median_ms(lambda: walk(cc, pp))})
        del cand, missed, h_missed
    return row


def markdown(env, rows) -> str:
    out = [f"# fp8 gate screen probe ({env['gpu']}, torch {env['torch']}, triton {env['triton']}, "
           f"commit {env['git_commit']})", "",
           "| M | cold cols | bf16 cold gate | fp8 | fp8 fast accum | quantize x | bf16 full gate |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['M']} | {r['cold_cols']} | {r['bf16_gate_ms']:.3f} | {r['fp8_gate_ms']:.3f} | "
                   f"{r['fp8_gate_fast_ms']:.3f} | {r['quantize_x_ms']:.3f} | {r['bf16_full_gate_ms']:.3f} |")
    for r in (r for r in rows if "margins" in r):
        out += ["", f"M={r['M']}: screen error (g' - g) / s: std {r['err_std']:.4f}, max {r['err_absmax']:.3f}; "
                f"walk over the exact lists {r['walk_exact_ms']:.3f} ms ({r['fires_cold']} cold fires)", "",
                "| margin c | candidates / fire | fires missed | missed share of |h| | y error from misses | "
                "overflowed tiles | walk over candidates (ms) |", "|---|---|---|---|---|---|---|"]
        for g in r["margins"]:
            out.append(f"| {g['c']} | {g['candidates_per_fire']:.3f} | {g['missed']} of {g['fires']} | "
                       f"{g['missed_h_share']:.2e} | {g['y_err_from_misses']:.2e} | {g['overflow_tiles']} | "
                       f"{g['walk_ms']:.3f} |")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--M", type=int, nargs="+", default=[16384, 131072])
    args = ap.parse_args()
    env = environment()
    rows = []
    for m in args.M:
        rows.append(case(m, full=m <= 16384))
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    md = markdown(env, rows)
    print(md)
    write_results(f"probe_fp8_screen_{gpu_slug()}", {"env": env, "rows": rows}, md)


if __name__ == "__main__":
    main()
