"""Launch shapes of the overflowed-token recompute (kernels/twell/overflow_rows.py) on an H100.

    python tools/probe_overflow_rows.py     # -> bench/results/probe_overflow_rows_<gpu>.json

The benchmark's realistic layer (D=2048, H=5632, nnz 29, all neurons sparse) with some fully
dense rows: they are listed once, then overflow_rows (recompute + add) is timed alone for each
launch shape. Repeats keep adding into the accumulator and y: only the time is used.
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import environment, gpu_slug, median_ms, write_results  # noqa: E402
from kernels import twell  # noqa: E402
from kernels.synthetic import make_ffn_inputs  # noqa: E402
from kernels.twell.gate import gate_twell  # noqa: E402
from kernels.twell.overflow_rows import OverflowList, list_overflowed, overflow_rows  # noqa: E402
from kernels.twell.updown import updown  # noqa: E402


def main():
    env, rows = environment(), []
    for m, dense in ((16384, 16), (16384, 64)):
        f = make_ffn_inputs(m, 2048, 5632, target_nnz=29.0, dense_rows=dense, device="cuda", seed=1)
        w = twell.prepare_weights(f.w_gate, f.w_up, f.w_down)
        counts, pairs = gate_twell(f.x, w.w_gate, w.tile, w.cap)
        ovf = OverflowList(256, 2048, f.x.device)
        y = torch.empty_like(f.x)
        list_overflowed(counts, w.cap, ovf)
        updown(f.x, w.w_gate, w.w_up, w.w_down_t, counts, pairs, y, tile=w.tile, cap=w.cap, col0=0)
        listed = int(ovf.header[0])
        for bh, bd, rb, nw in itertools.product((32, 64, 128), (64, 128), (1, 4), (4, 8)):
            try:
                ms = median_ms(lambda: overflow_rows(f.x, w.w_gate, w.w_up, w.w_down_t, ovf, y, 0, block_h=bh,
                                                     block_d=bd, row_blocks=rb, num_warps=nw))
            except Exception as e:  # a shape that does not compile is reported, not fatal
                print(f"bh={bh} bd={bd} rb={rb} warps={nw}: {type(e).__name__}: {e}", flush=True)
                continue
            rows.append({"M": m, "dense_rows": dense, "listed": listed, "block_h": bh, "block_d": bd,
                         "row_blocks": rb, "num_warps": nw, "ms": ms})
            print(rows[-1], flush=True)
    best = {d: min((r for r in rows if r["dense_rows"] == d), key=lambda r: r["ms"]) for d in (16, 64)}
    md = "\n".join(["# overflow_rows launch shapes (" + str(env.get("gpu")) + ")", "",
                    "| dense rows (listed) | block_h | block_d | row_blocks | warps | ms |", "|---|---|---|---|---|---|"]
                   + [f"| {r['dense_rows']} ({r['listed']}) | {r['block_h']} | {r['block_d']} | {r['row_blocks']} | "
                      f"{r['num_warps']} | {r['ms']:.4f} |" for r in rows]
                   + ["", "Best: " + "; ".join(f"{d} rows: {b['ms']:.4f} ms (block_h {b['block_h']}, block_d "
                                                 f"{b['block_d']}, row_blocks {b['row_blocks']}, warps {b['num_warps']})"
                                                 for d, b in best.items())])
    write_results(f"probe_overflow_rows_{gpu_slug()}", {"environment": env, "rows": rows}, md)
    print(md)


if __name__ == "__main__":
    main()
