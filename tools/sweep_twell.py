"""A/B sweep of the TwELL kernel variants, one config at a time (not autotuned), on one GPU.

    python tools/sweep_twell.py [--m 16384] [--out sweep.json]

Same generator and timing as tools/bench_ffn_infer.py (BENCHMARKS.md: D=2048, H=5632, nnz 29,
do_bench medians). It times every gate+pack launch config (main loop, tile loop flattening,
programs per SM) and every up/down config (entries per step, warps, prefetch) on the same
inputs, and checks each against the first: gate outputs must be identical, up/down outputs
equal within bf16 rounding. The table this prints is what kernels/twell/NOTES.md quotes for
choosing the autotune candidates; the headline numbers come from bench_ffn_infer.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import environment, median_ms, rel_err  # noqa: E402
from kernels import twell  # noqa: E402
from kernels.synthetic import make_ffn_inputs  # noqa: E402
from kernels.twell import gate as G  # noqa: E402
from kernels.twell._common import m_bucket  # noqa: E402
from kernels.twell import updown as U  # noqa: E402

# (BM, BK, warps, stages). The flattened tile loop and 2-3 programs per SM measured in run 8
# (NOTES.md) were removed from the kernel after losing; commit 269121b reproduces them.
GATE_VARIANTS = [(128, 64, 8, 4), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)]
# (E, warps, ACC2D, PF, entries per step for tokens with an overflowed tile under PF)
UPDOWN_VARIANTS = [(2, 4, False, False, 0), (2, 4, True, False, 0), (4, 8, False, False, 0), (1, 2, False, False, 0),
                   (2, 4, False, True, 0), (1, 2, False, True, 0), (2, 8, False, True, 0), (4, 8, False, True, 0),
                   (1, 4, False, True, 0), (1, 1, False, True, 0), (1, 2, False, True, 2), (1, 2, False, True, 4)]


def gate_launch(x, w, tile, cap, col0, bm, bk, warps, stages, epi=3):
    m, d = x.shape
    h = w.shape[0]
    nt = -(-(h - col0) // tile)
    counts = torch.empty(m, nt, dtype=torch.int32, device=x.device)
    pairs = torch.empty(m, nt, cap, dtype=torch.int32, device=x.device)
    xd, wd = G._desc(x), G._desc(w)
    xd.block_shape, wd.block_shape = [bm, bk], [tile, bk]
    grid = (min(triton.cdiv(m, bm) * nt, G._num_sms(x.device)),)

    def run():
        G._gate_twell_tma_kernel.fn[grid](
            xd, wd, x, counts, pairs, counts, m, d, h, col0, nt, m_bucket(m), CAP=cap, BN=tile,
            COUNT_FIRES=False, IEEE=False, INTERPRET=False, EPI=epi, PAIR64=False, PERSIST=True,
            BM=bm, BK=bk, GROUP_M=8, num_warps=warps, num_stages=stages)
        return counts, pairs
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=16384)
    ap.add_argument("--h", type=int, default=5632)
    ap.add_argument("--nnz", type=float, default=29.0)
    ap.add_argument("--n-hot", type=int, default=1536, help="hot columns for the col0 > 0 rows")
    ap.add_argument("--dense-rows", type=int, default=0, help="fully dense tokens (overflow path)")
    ap.add_argument("--only", choices=["gate", "updown"], default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    f = make_ffn_inputs(a.m, 2048, a.h, target_nnz=a.nnz, dense_rows=a.dense_rows, device="cuda", seed=0)
    x = f.x
    w0 = twell.prepare_weights(f.w_gate, f.w_up, f.w_down)
    _, fc = twell.twell_ffn(x[:8192].contiguous(), w0, return_fire_counts=True)
    wh = twell.calibrate(w0, fc, 8192, n_hot=a.n_hot)
    rows = []
    for name, w in (("all sparse", w0), (f"hot{a.n_hot}", wh)):
        col0 = w.n_hot
        base = None
        for v in (GATE_VARIANTS if a.only != "updown" else GATE_VARIANTS[:1]):
            try:
                run = gate_launch(x, w.w_gate, w.tile, w.cap, col0, *v)
                c, p = run()
                valid = torch.arange(w.cap, device=x.device) < c.clamp(max=w.cap).unsqueeze(2)
                if base is None:
                    base = (c.clone(), p[valid].clone())
                same = torch.equal(c, base[0]) and torch.equal(p[valid], base[1])
                ms = median_ms(run)
                floor = median_ms(gate_launch(x, w.w_gate, w.tile, w.cap, col0, *v, epi=2))
            except Exception as e:   # a config that does not compile or fit is reported, not fatal
                print("gate", name, v, "failed:", type(e).__name__, str(e)[:200], flush=True)
                continue
            rows.append({"piece": "gate", "weights": name, "variant": v, "ms": ms, "floor_ms": floor, "same": same})
            print(rows[-1], flush=True)
        counts, pairs = G.gate_twell(x, w.w_gate, w.tile, w.cap, col0)
        ref = None
        for v in (UPDOWN_VARIANTS if a.only != "gate" else []):
            e, nw, a2, pf, eo = v
            y = torch.empty_like(x)

            def run():
                return U.updown(x, w.w_gate, w.w_up, w.w_down_t, counts, pairs, y, tile=w.tile, cap=w.cap,
                                col0=col0, entries=e, num_warps=nw, acc2d=a2, prefetch=pf, overflow_entries=eo)
            try:
                run()
                if ref is None:
                    ref = y.clone()
                err = rel_err(y, ref.float())
                ms = median_ms(run)
            except Exception as ex:
                print("updown", name, v, "failed:", type(ex).__name__, str(ex)[:200], flush=True)
                continue
            rows.append({"piece": "updown", "weights": name, "variant": v, "ms": ms, "rel_diff": err})
            print(rows[-1], flush=True)
        if col0:
            rows.append({"piece": "hot_gate_up", "weights": name,
                         "ms": median_ms(lambda: G.gate_up_dense(x, w.w_gate, w.w_up, col0, w.tile))})
            print(rows[-1], flush=True)
    out = {"env": environment(), "M": a.m, "H": a.h, "nnz": a.nnz, "rows": rows}
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
