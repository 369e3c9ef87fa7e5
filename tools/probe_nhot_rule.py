#!/usr/bin/env python3
"""Is calibrate's n_hot rule (fire rate > 0.6%, rounded up to a tile) still right away from nnz 29?

    python tools/probe_nhot_rule.py [--M 16384] [--nnz 10 29 60 120]

The rule was fitted by an n_hot sweep at nnz 29 only (NOTES.md run 12). Trained layers run at
5-130 nonzeros per token (model_h100.md), and the slowest twell layers are the densest. For each
nnz target of BENCHMARKS.md's generator (D=2048, H=5632), this times twell_ffn with the rule's
n_hot and with multiples of the tile around it, eager (do_bench median) and replayed from a CUDA
graph, beside dense. Writes bench/results/probe_nhot_rule_<gpu>.{json,md} ($BENCH_RESULTS_DIR to
redirect).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import environment, gpu_slug, graph_replay_ms, median_ms, write_results  # noqa: E402
from bench_ffn_infer import CALIB_TOKENS, D_MODEL, H_FULL  # noqa: E402
from bench_ffn_infer import make_inputs  # noqa: E402
from kernels import twell  # noqa: E402
from megasparse.model.twell_layout import dense_ffn  # noqa: E402

FACTORS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


def candidates(rule: int, tile: int, h: int) -> list[int]:
    top = h - h % tile
    return sorted({min(top, max(0, round(rule * f / tile) * tile)) for f in FACTORS})


@torch.no_grad()
def case(m: int, nnz: float) -> dict:
    f, x, xc = make_inputs(m, H_FULL, nnz)
    ws = (f.w_gate, f.w_up, f.w_down)
    w0 = twell.prepare_weights(*ws)
    _, fires = dense_ffn(xc, *ws, fire_counts=True)
    rule = twell.calibrate(w0, fires, CALIB_TOKENS).n_hot
    row = {"M": m, "nnz_target": nnz, "nnz_mean": fires.sum().item() / CALIB_TOKENS, "rule_n_hot": rule,
           "dense_eager_ms": median_ms(lambda: dense_ffn(x, *ws)),
           "dense_graph_ms": graph_replay_ms(lambda: dense_ffn(x, *ws))[0], "n_hot": {}}
    for n in candidates(rule, w0.tile, H_FULL):
        w = twell.calibrate(w0, fires, CALIB_TOKENS, n_hot=n)
        row["n_hot"][n] = {"eager_ms": median_ms(lambda: twell.twell_ffn(x, w)),
                           "graph_ms": graph_replay_ms(lambda: twell.twell_ffn(x, w))[0]}
    return row


def markdown(env, rows) -> str:
    out = [f"# n_hot around calibrate's rule ({env['gpu']}, torch {env['torch']}, triton {env['triton']}, "
           f"commit {env['git_commit']})", "",
           f"D={D_MODEL}, H={H_FULL}, BENCHMARKS.md's generator; ms, eager (do_bench median) / replayed from a "
           "CUDA graph; x = dense / twell, each way.", "",
           "| M | nnz | rule's n_hot | dense | n_hot: twell (x) | best against the rule |", "|---|---|---|---|---|---|"]
    for r in rows:
        de, dg = r["dense_eager_ms"], r["dense_graph_ms"]
        cells = "; ".join(f"{'**' if n == r['rule_n_hot'] else ''}{n}{'**' if n == r['rule_n_hot'] else ''}: "
                          f"{v['eager_ms']:.3f} / {v['graph_ms']:.3f} ({de / v['eager_ms']:.2f}x / "
                          f"{dg / v['graph_ms']:.2f}x)" for n, v in r["n_hot"].items())
        best = min(r["n_hot"], key=lambda n: r["n_hot"][n]["graph_ms"])
        gain = r["n_hot"][r["rule_n_hot"]]["graph_ms"] / r["n_hot"][best]["graph_ms"]
        out.append(f"| {r['M']} | {r['nnz_mean']:.1f} | {r['rule_n_hot']} | {de:.3f} / {dg:.3f} | {cells} | "
                   f"{best} ({gain:.3f}x from graphs) |")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--M", type=int, default=16384)
    ap.add_argument("--nnz", type=float, nargs="+", default=[10, 29, 60, 120])
    args = ap.parse_args()
    env = environment()
    rows = []
    for nnz in args.nnz:
        rows.append(case(args.M, nnz))
        print(rows[-1], flush=True)
    md = markdown(env, rows)
    print(md)
    write_results(f"probe_nhot_rule_{gpu_slug()}", {"env": env, "rows": rows}, md)


if __name__ == "__main__":
    main()
