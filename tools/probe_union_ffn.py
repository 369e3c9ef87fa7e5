#!/usr/bin/env python3
"""Does a per-block union of active neurons beat the hot/cold layout? (kernels/twell/union.py)

In one process, on BENCHMARKS.md's generator (D=2048), times dense torch, twell+hot (calibrated
on 8192 other tokens: the standing best), and union_ffn at several block sizes (rows that share a
union), with the union pipeline's pieces (cuBLAS gate, union pass, up, down) at each. Prints
JSON; writes $BENCH_RESULTS_DIR/probe_union_ffn_<gpu>.{json,md} if set.

    python tools/probe_union_ffn.py --m 16384 131072 --blocks 32 64 128
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import environment, gpu_slug, median_ms, rel_err, write_results  # noqa: E402
from bench_ffn_infer import dense_fns, fp32_reference, make_inputs  # noqa: E402
from kernels import twell  # noqa: E402
from kernels.twell import union as U  # noqa: E402


def union_pieces(x, w, block):
    m, h = x.shape[0], w.hidden
    g = torch.empty(m, h, dtype=x.dtype, device=x.device)
    y = torch.empty_like(x)

    def gate():
        torch.mm(x, w.w_gate.t(), out=g)
    gate()
    idx, cnt = U.union_blocks(g, block)
    out = {"gate_ms": median_ms(gate)}
    out["union_pass_ms"] = median_ms(lambda: (gate(), U.union_blocks(g, block))) - out["gate_ms"]
    gate()
    idx, cnt = U.union_blocks(g, block)
    # the up kernel overwrites the compacted gate with h; timing it on its own output only changes
    # the values, not the work (the same unions)
    out["up_ms"] = median_ms(lambda: U.union_up(x, w.w_up, g, idx, cnt, block))
    out["down_ms"] = median_ms(lambda: U.union_down(g, w.w_down_t, idx, cnt, y, block))
    out["up_config"] = str(U._union_up_kernel.best_config)
    out["down_config"] = str(U._union_down_kernel.best_config)
    c = cnt.float()
    out["union_mean"], out["union_max"] = float(c.mean()), int(cnt.max())
    return out


def run(m, h, nnz, blocks):
    f, x, xc = make_inputs(m, h, nnz)
    return _run(f, x, xc, m, h, nnz, blocks)


def _run(f, x, xc, m, h, nnz, blocks):
    ref = fp32_reference(x, f)
    sep, packed = dense_fns(f)
    row = {"m": m, "h": h, "nnz_target": nnz}
    row["dense_separate_ms"] = median_ms(lambda: sep(x))
    row["dense_packed_ms"] = median_ms(lambda: packed(x))
    dense = min(row["dense_separate_ms"], row["dense_packed_ms"])
    w0 = twell.prepare_weights(f.w_gate, f.w_up, f.w_down)
    _, fc = twell.twell_ffn(xc, w0, return_fire_counts=True)
    wh = twell.calibrate(w0, fc, xc.shape[0])
    row["hot_n"] = wh.n_hot
    row["twell_hot_ms"] = median_ms(lambda: twell.twell_ffn(x, wh))
    row["twell_hot_err"] = rel_err(twell.twell_ffn(x, wh), ref)
    row["twell_hot_speedup"] = dense / row["twell_hot_ms"]
    for b in blocks:
        key = f"union{b}"
        row[f"{key}_ms"] = median_ms(lambda: U.union_ffn(x, w0, block_rows=b))
        row[f"{key}_err"] = rel_err(U.union_ffn(x, w0, block_rows=b), ref)
        row[f"{key}_speedup"] = dense / row[f"{key}_ms"]
        row[f"{key}_pieces"] = union_pieces(x, w0, b)
        print(json.dumps({key: row[f"{key}_ms"], "speedup": row[f"{key}_speedup"]}), flush=True)
    row["dense_ms"] = dense
    return row


def markdown(env, rows):
    lines = [f"# union_ffn probe ({env.get('gpu')}, commit {env.get('git_commit')})", "",
             "| M | H | dense ms | twell+hot ms (x) | variant | ms | speedup | err | union mean/max | gate / pass / up / down ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for k in [k[:-3] for k in r if k.startswith("union") and k.endswith("_ms")]:
            p = r[f"{k}_pieces"]
            lines.append(f"| {r['m']} | {r['h']} | {r['dense_ms']:.3f} | {r['twell_hot_ms']:.3f} "
                         f"({r['twell_hot_speedup']:.2f}x) | {k} | {r[k + '_ms']:.3f} | {r[k + '_speedup']:.2f}x | "
                         f"{r[k + '_err']:.1e} | {p['union_mean']:.0f}/{p['union_max']} | {p['gate_ms']:.3f} / "
                         f"{p['union_pass_ms']:.3f} / {p['up_ms']:.3f} / {p['down_ms']:.3f} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, nargs="+", default=[16384])
    ap.add_argument("--h", type=int, nargs="+", default=[5632])
    ap.add_argument("--nnz", type=float, default=29.0)
    ap.add_argument("--blocks", type=int, nargs="+", default=[64])
    a = ap.parse_args()
    env = environment()
    rows = [run(m, h, a.nnz * h / 5632, a.blocks) for m in a.m for h in a.h]
    payload = {"env": env, "rows": rows}
    print(json.dumps(payload, indent=1))
    if os.environ.get("BENCH_RESULTS_DIR"):
        write_results(f"probe_union_ffn_{gpu_slug()}", payload, markdown(env, rows), os.environ["BENCH_RESULTS_DIR"])


if __name__ == "__main__":
    main()
