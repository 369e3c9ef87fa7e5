#!/usr/bin/env python3
"""The hybrid layer's heavy-row backup, scratch path against the recomputing path, in one process.

kernels/hybrid/heavy_rows.py serves the first fast_rows(M) heavy rows from a scratch that
(row block, neuron block) programs fill; HYBRID_HEAVY_FAST_ROWS=0 (here: heavy_rows.FAST_ROWS = 0)
recomputes every heavy row per D slice, the design before round 7. This times the layer's
forward+backward (bench_ffn_train.fwd_bwd: L1 in the loss) on BENCHMARKS.md's generator with and
without fully dense rows, switching the path back and forth in one process (A B A B ...), eager
(do_bench median) and replayed from a CUDA graph, next to dense torch. The case without dense
rows checks that the new path costs nothing when no row is heavy.
Writes $BENCH_RESULTS_DIR (default bench/results)/probe_heavy_rows_<gpu>.{json,md}.

    python tools/probe_heavy_rows.py [--dense-rows 0 4 32] [--rounds 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import environment, gpu_slug, median_ms, write_results  # noqa: E402
from bench_ffn_train import dense_ffn, fwd_bwd, graph_ms  # noqa: E402
from kernels.hybrid import heavy_rows, sparse_gated_mlp  # noqa: E402
from kernels.synthetic import make_ffn_inputs  # noqa: E402

PATHS = {"scratch": 64, "recompute": 0}   # heavy_rows.FAST_ROWS of each path


def run_case(m, d, h, nnz, dense_rows, rounds, hot_frac):
    inp = make_ffn_inputs(m, d, h, target_nnz=nnz, dense_rows=dense_rows, device="cuda", dtype=torch.bfloat16)
    params = [t.requires_grad_() for t in (inp.x, inp.w_gate, inp.w_up, inp.w_down)]
    dy = torch.randn(m, d, device="cuda", dtype=torch.bfloat16)

    def sparse(*p):
        return sparse_gated_mlp(*p, ell_width="auto", hot_frac=hot_frac)
    row = {"M": m, "D": d, "H": h, "nnz_target": nnz, "dense_rows": dense_rows,
           "dense_ms": median_ms(lambda: fwd_bwd(dense_ffn, params, dy))}
    eager = {k: [] for k in PATHS}
    graph = {k: [] for k in PATHS}
    for _ in range(rounds):
        for name, fast in PATHS.items():
            heavy_rows.FAST_ROWS = fast
            for _ in range(3):            # let the auto ELL width settle on this input
                fwd_bwd(sparse, params, dy)
            eager[name].append(median_ms(lambda: fwd_bwd(sparse, params, dy)))
            graph[name].append(graph_ms(sparse, params, dy))
    heavy_rows.FAST_ROWS = PATHS["scratch"]
    for name in PATHS:
        row[f"{name}_eager_ms"] = statistics.median(eager[name])
        row[f"{name}_graph_ms"] = statistics.median(graph[name])
        row[f"{name}_eager_all"] = eager[name]
        row[f"{name}_graph_all"] = graph[name]
    print(row, flush=True)
    return row


def markdown(env, rows):
    lines = [f"# Hybrid heavy-row backup: scratch path vs recomputing path ({env.get('gpu')}, commit "
             f"{env.get('git_commit')})", "",
             "One process; fwd+bwd of the hybrid layer (ell_width auto, L1 in the loss), the two paths "
             "alternated; medians over the rounds of do_bench medians (eager) and of CUDA-graph replays.", "",
             "| M | H | nnz | dense rows | dense ms | recompute eager / graph | scratch eager / graph | "
             "speedup over dense, recompute / scratch (eager) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['M']} | {r['H']} | {r['nnz_target']:g} | {r['dense_rows']} | {r['dense_ms']:.3f} | "
                     f"{r['recompute_eager_ms']:.3f} / {r['recompute_graph_ms']:.3f} | "
                     f"{r['scratch_eager_ms']:.3f} / {r['scratch_graph_ms']:.3f} | "
                     f"{r['dense_ms'] / r['recompute_eager_ms']:.2f}x / {r['dense_ms'] / r['scratch_eager_ms']:.2f}x |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--M", type=int, default=16384)
    ap.add_argument("--D", type=int, default=2048)
    ap.add_argument("--H", type=int, default=5632)
    ap.add_argument("--nnz", type=float, default=29.0)
    ap.add_argument("--hot-frac", type=float, default=0.01)
    ap.add_argument("--dense-rows", type=int, nargs="+", default=[0, 4, 32])
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("probe_heavy_rows needs a CUDA GPU")
    env = environment()
    rows = [run_case(a.M, a.D, a.H, a.nnz, n, a.rounds, a.hot_frac) for n in a.dense_rows]
    md = markdown(env, rows)
    print(md)
    print("wrote", *write_results(f"probe_heavy_rows_{gpu_slug()}", {"environment": env, "rows": rows}, md))


if __name__ == "__main__":
    main()
