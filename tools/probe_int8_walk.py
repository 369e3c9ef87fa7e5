#!/usr/bin/env python3
"""Does gathering int8 rows in the walk (kernels/twell/quant.py) pay, and at what error?

The walk is L2-bound at ~5.8 TB/s of 16-bit W_u / W_d^T rows (NOTES.md run 12). int8 rows
halve its bytes, and a cheaper walk moves the best hot/cold split toward fewer dense columns
(which are power-capped GEMM work). In one process, on BENCHMARKS.md's generator (D=2048,
H=5632), this times dense torch and, for each n_hot, the exact layout and the same layout with
int8 walk rows: eager (do_bench median) and replayed from a CUDA graph, the walk alone, and
the relative error against fp32. Energy per call for dense and the two hot1536 layouts at the
first M. Prints JSON; writes $BENCH_RESULTS_DIR/probe_int8_walk_<gpu>.{json,md} if set.

    python tools/probe_int8_walk.py --m 16384 131072 --hot 512 1024 1536
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
from bench_common import (energy_joules_per_call, environment, gpu_slug, graph_replay_ms, median_ms,  # noqa: E402
                          rel_err, write_results)
from bench_ffn_infer import dense_fns, fp32_reference, make_inputs  # noqa: E402
from kernels import twell  # noqa: E402
from kernels.twell.gate import gate_twell  # noqa: E402
from kernels.twell.updown import updown  # noqa: E402


def walk_ms(x, w):
    """The cold walk alone over a packed gate (the rows it gathers: exact or int8)."""
    counts, pairs = gate_twell(x, w.w_gate, w.tile, w.cap, w.n_hot)
    y = torch.empty_like(x)
    rows, kw = (w.w_up, w.w_down_t), {}
    if w.up_int8 is not None:
        rows, kw = (w.up_int8.q, w.down_t_int8.q), dict(up_scale=w.up_int8.scale, down_scale=w.down_t_int8.scale)
    return median_ms(lambda: updown(x, w.w_gate, *rows, counts, pairs, y, tile=w.tile, cap=w.cap,
                                    col0=w.n_hot, **kw))


def run(m, hots, energy):
    torch.manual_seed(0)
    f, x, xc = make_inputs(m, 5632, 29.0)
    ref = fp32_reference(x, f)
    sep, packed = dense_fns(f)
    row = {"m": m, "h": 5632, "nnz_target": 29.0}
    sep_ms, packed_ms = median_ms(lambda: sep(x)), median_ms(lambda: packed(x))
    row["dense_ms"] = min(sep_ms, packed_ms)
    dense = sep if sep_ms <= packed_ms else packed
    row["dense_err"] = rel_err(dense(x), ref)
    w0 = twell.prepare_weights(f.w_gate, f.w_up, f.w_down)
    _, fc = twell.twell_ffn(xc, w0, return_fire_counts=True)
    layouts = {}
    for k in hots:
        wk = twell.calibrate(w0, fc, xc.shape[0], n_hot=k)
        layouts[f"hot{k}"] = wk
        layouts[f"hot{k}+int8"] = twell.quantize_cold_rows(wk)
    row["variants"] = {}
    for name, w in layouts.items():
        v = {"n_hot": w.n_hot, "int8": w.up_int8 is not None}
        v["ms"] = median_ms(lambda: twell.twell_ffn(x, w))
        v["err"] = rel_err(twell.twell_ffn(x, w), ref)
        v["walk_ms"] = walk_ms(x, w)
        v["speedup"] = row["dense_ms"] / v["ms"]
        row["variants"][name] = v
        print(json.dumps({"m": m, name: v}), flush=True)
    if energy:
        row["energy_dense"] = energy_joules_per_call(lambda: dense(x))
        for name in (n for n in ("hot1536", "hot1536+int8") if n in layouts):
            row["variants"][name]["energy"] = energy_joules_per_call(lambda: twell.twell_ffn(x, layouts[name]))
    # graphs last: an eager timing right after a capture measured slow (NOTES.md run 12)
    row["dense_graph_ms"] = min(graph_replay_ms(lambda: sep(x))[0], graph_replay_ms(lambda: packed(x))[0])
    for name, w in layouts.items():
        v = row["variants"][name]
        v["graph_ms"], _ = graph_replay_ms(lambda: twell.twell_ffn(x, w))
        v["graph_speedup"] = row["dense_graph_ms"] / v["graph_ms"]
    return row   # the caller empties the cache once this frame's tensors are gone


def markdown(env, rows):
    lines = [f"# int8 walk rows probe ({env.get('gpu')}, commit {env.get('git_commit')})", "",
             "D=2048, H=5632, nnz 29 (BENCHMARKS.md generator), bf16 activations; hot layouts calibrated on "
             "8192 other tokens. eager: do_bench median; graph: replayed from a CUDA graph. err: relative "
             "to fp32.", "",
             "| M | layout | walk rows | eager ms | speedup | graph ms | speedup | walk ms | err | J/call |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    def joules(e):
        return f"{e['joules_per_call']:.3f}" if isinstance(e, dict) and "joules_per_call" in e else ""
    for r in rows:
        lines.append(f"| {r['m']} | dense | | {r['dense_ms']:.3f} | 1.00x | {r['dense_graph_ms']:.3f} | 1.00x | | "
                     f"{r['dense_err']:.1e} | {joules(r.get('energy_dense'))} |")
        for v in r["variants"].values():
            lines.append(f"| {r['m']} | hot{v['n_hot']} | {'int8' if v['int8'] else 'bf16'} | {v['ms']:.3f} | "
                         f"{v['speedup']:.2f}x | {v['graph_ms']:.3f} | {v['graph_speedup']:.2f}x | "
                         f"{v['walk_ms']:.3f} | {v['err']:.1e} | {joules(v.get('energy'))} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, nargs="+", default=[16384])
    ap.add_argument("--hot", type=int, nargs="+", default=[512, 1024, 1536])
    a = ap.parse_args()
    env = environment()
    rows = []
    for i, m in enumerate(a.m):
        rows.append(run(m, a.hot, energy=i == 0))
        torch.cuda.empty_cache()
    payload = {"env": env, "rows": rows}
    print(json.dumps(payload, indent=1, default=str))
    if os.environ.get("BENCH_RESULTS_DIR"):
        write_results(f"probe_int8_walk_{gpu_slug()}", payload, markdown(env, rows), os.environ["BENCH_RESULTS_DIR"])


if __name__ == "__main__":
    main()
