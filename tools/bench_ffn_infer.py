"""FFN inference benchmark: TwELL (kernels.twell) against dense torch bf16, per ../shared/BENCHMARKS.md.

    python tools/bench_ffn_infer.py            # full protocol -> bench/results/ffn_infer_<gpu>.{json,md}
    python tools/bench_ffn_infer.py --quick    # one shape (smoke test)

Protocol: D=2048; H=5632 plus the tensor-parallel local widths 2816 (tp=2) and 1408 (tp=4);
M=16384 and 131072; bf16; the kernels/synthetic.py generator (30% dead neurons, log-normal
popularity, sigma=1). The nnz target is per full layer (10/29/60/120 of 5632); a TP shard sees
H/5632 of it (29 -> 14.5 at tp=2, 7.25 at tp=4), so sharded widths use the scaled target.
Dense = the faster of torch separate gate/up and a packed [2H, D] gate-up GEMM. Times are
triton.testing.do_bench medians; error is ||y - y_ref|| / ||y_ref|| against fp32 on the same bf16
inputs; energy from NVML's counter over >= 3 s loops. Sparse variants: "twell" (all neurons
through TwELL) and "twell+hot" (weights.calibrate on 8192 *other* tokens of the same generator
moves popular neurons to a dense tensor-core path). Nothing is hard-coded: every number printed
is measured in this process.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (activation_stats, energy_joules_per_call, environment, gpu_slug,  # noqa: E402
                          graph_replay_ms, median_ms, rel_err, write_results)
from kernels.synthetic import make_ffn_inputs  # noqa: E402
from kernels import twell  # noqa: E402

D_MODEL, H_FULL, CALIB_TOKENS = 2048, 5632, 8192


def dense_fns(f):
    wg, wu, wd = f.w_gate, f.w_up, f.w_down
    wgu = torch.cat([wg, wu]).contiguous()
    h = wg.shape[0]

    def separate(x):
        return F.linear(torch.relu(F.linear(x, wg)) * F.linear(x, wu), wd)

    def packed(x):
        gu = F.linear(x, wgu)
        return F.linear(torch.relu(gu[:, :h]) * gu[:, h:], wd)
    return separate, packed


@torch.no_grad()
def fp32_reference(x, f, chunk=8192):
    wg, wu, wd = f.w_gate.float(), f.w_up.float(), f.w_down.float()
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    for s in range(0, x.shape[0], chunk):
        xs = x[s:s + chunk].float()
        out[s:s + chunk] = (torch.relu(xs @ wg.t()) * (xs @ wu.t())) @ wd.t()
    return out


def make_inputs(m, h, nnz, dense_rows=0, seed=0):
    """Timed tokens plus CALIB_TOKENS separate calibration tokens from the same layer."""
    f = make_ffn_inputs(m + CALIB_TOKENS, D_MODEL, h, target_nnz=nnz, dense_rows=dense_rows, device="cuda",
                        seed=seed)
    return f, f.x[:m].contiguous(), f.x[m:].contiguous()


def sparse_variants(f, xc, hot_list=(), modes=(), gate_impls=(), chunk_rows=(), overlap=False):
    """name -> (weights, twell_ffn keyword arguments). overlap: also time every layout with
    "/overlap" (each gate chunk's walk on a side stream beside the next GEMM); modes: other
    overflow modes ("walk": the up/down program walks overflowed tiles; "rows": the host-side
    dense-row route); gate_impls: other gate implementations (gate.gate_twell's impl);
    chunk_rows: other cuBLAS gate chunk sizes (rows of x), with overlap."""
    w0 = twell.prepare_weights(f.w_gate, f.w_up, f.w_down)
    _, fc = twell.twell_ffn(xc, w0, return_fire_counts=True)
    layouts = {"twell": w0, "twell+hot": twell.calibrate(w0, fc, xc.shape[0])}
    for k in (k for k in hot_list if k < f.w_gate.shape[0]):
        layouts[f"twell+hot{k}"] = twell.calibrate(w0, fc, xc.shape[0], n_hot=k)
    out = {}
    for name, w in layouts.items():
        out[name] = (w, {"overlap": False})
        if overlap:
            out[name + "/overlap"] = (w, {"overlap": True})
        for mode in modes:
            out[f"{name}/{mode}"] = (w, {"overlap": False, "overflow": mode})
        for impl in gate_impls:
            out[f"{name}/{impl}"] = (w, {"overlap": False, "gate_impl": impl})
        for rows in chunk_rows:
            out[f"{name}/overlap/chunk{rows}"] = (w, {"overlap": True, "gate_chunk_rows": rows})
    return out


def pieces(f, x, w0):
    """Where the time goes (all-sparse weights): gate+pack by cuBLAS + pack.py and by the fused
    kernel (and its GEMM floor), and up/down alone."""
    from kernels.twell import gate as G
    from kernels.twell.gate import gate_twell
    from kernels.twell.updown import _updown_tuned, updown
    t, cap = w0.tile, w0.cap
    counts, pairs = gate_twell(x, w0.w_gate, t, cap)
    y = torch.empty_like(x)
    fused = "tma_persist"
    out = {"cublas_relu_gate_ms": median_ms(lambda: torch.relu(F.linear(x, f.w_gate))),
           "cublas_gate_ms": median_ms(lambda: F.linear(x, f.w_gate)),
           "gate_default_impl": G.GATE_IMPL,
           "gate_cublas_pack_ms": median_ms(lambda: gate_twell(x, w0.w_gate, t, cap, impl="cublas")),
           "gate_fused_pack_ms": median_ms(lambda: gate_twell(x, w0.w_gate, t, cap, impl=fused)),
           "gate_fused_epilogue": G.EPILOGUE,
           "gate_fused_config": str(G._gate_twell_tma_kernel.best_config),
           "gate_fused_counts_only_ms": median_ms(lambda: gate_twell(x, w0.w_gate, t, cap, epilogue=2, impl=fused)),
           "updown_ms": median_ms(lambda: updown(x, w0.w_gate, w0.w_up, w0.w_down_t, counts, pairs, y,
                                                 tile=t, cap=cap, col0=0)),
           "overflow_tiles": int((counts > cap).sum())}
    out["updown_config"] = str(_updown_tuned.best_config)
    return out


def run_case(m, h, nnz, energy=False, dense_rows=0, hot_list=(), with_pieces=False, modes=None, gate_impls=(),
             chunk_rows=(), graphs=False, overlap=False):
    torch.manual_seed(0)
    f, x, xc = make_inputs(m, h, nnz, dense_rows)
    stats = activation_stats(x, f.w_gate, tile=128)
    ref = fp32_reference(x, f)
    sep, packed = dense_fns(f)
    # the generator spreads dense rows over timed and calibration tokens and marks them with x0 = -4
    row = {"M": m, "H": h, "D": D_MODEL, "nnz_target": nnz, "dense_rows": dense_rows,
           "dense_rows_timed": int((x[:, 0] < 0).sum()), **stats}
    row["dense_separate_ms"] = median_ms(lambda: sep(x))
    row["dense_packed_ms"] = median_ms(lambda: packed(x))
    dense = sep if row["dense_separate_ms"] <= row["dense_packed_ms"] else packed
    row["dense_ms"] = min(row["dense_separate_ms"], row["dense_packed_ms"])
    row["dense_rel_err"] = rel_err(dense(x), ref)
    if modes is None:
        modes = ("rows", "walk") if dense_rows else ()
    variants = sparse_variants(f, xc, hot_list, modes, gate_impls, chunk_rows, overlap)
    row["variants"] = {}
    for name, (w, kw) in variants.items():
        try:
            y = twell.twell_ffn(x, w, **kw)
            ms = median_ms(lambda: twell.twell_ffn(x, w, **kw))
        except Exception as e:   # a failing variant is reported, not fatal to the run
            print(f"variant {name} failed: {type(e).__name__}: {e}", flush=True)
            continue
        row["variants"][name] = {"ms": ms, "speedup": row["dense_ms"] / ms, "rel_err": rel_err(y, ref),
                                 "n_hot": w.n_hot, "finite": bool(torch.isfinite(y).all()), "kwargs": kw}
    best = min(row["variants"], key=lambda k: row["variants"][k]["ms"])
    row["best"] = best
    if with_pieces:
        row["pieces"] = pieces(f, x, variants["twell"][0])
    if energy:
        wb, kw = variants[best]
        row["energy_dense"] = energy_joules_per_call(lambda: dense(x))
        row["energy_sparse"] = energy_joules_per_call(lambda: twell.twell_ffn(x, wb, **kw))
    if graphs:   # last: eager timings taken right after a capture measured slow
        graph_times(row, variants, x, ref, sep, packed)
    del f, x, xc, ref, variants
    torch.cuda.empty_cache()
    return row


def graph_times(row, variants, x, ref, sep, packed):
    """Dense and every variant replayed from CUDA graphs: GPU time without host launch cost.
    overflow="rows" reads counts on the host, which a graph cannot capture."""
    row["dense_graph_ms"] = min(graph_replay_ms(lambda: sep(x))[0], graph_replay_ms(lambda: packed(x))[0])
    for name, v in row["variants"].items():
        w, kw = variants[name]
        if kw.get("overflow") == "rows":
            continue
        v["graph_ms"], yg = graph_replay_ms(lambda: twell.twell_ffn(x, w, **kw))
        v["graph_speedup"] = row["dense_graph_ms"] / v["graph_ms"]
        v["graph_rel_err"] = rel_err(yg, ref)
        del yg


def fmt_energy(e):
    return f"{e['joules_per_call']:.3f}" if isinstance(e, dict) and "joules_per_call" in e else "n/a"


def markdown(env, rows):
    lines = [f"# FFN inference: TwELL vs dense ({env.get('gpu')})", "",
             f"torch {env['torch']}, triton {env['triton']}, commit {env['git_commit']}, {env['date_utc']}. "
             "Protocol: ../shared/BENCHMARKS.md (D=2048, bf16, realistic generator). Dense = faster of torch "
             "separate and packed gate-up. Times: do_bench medians (ms). `twell`: all neurons sparse; "
             "`twell+hot`: calibrated on 8192 other tokens, popular neurons dense. rel err vs fp32.", "",
             "| M | H | nnz target | nnz mean / max | tile max | busiest rate | dense ms | twell ms (x) | "
             "twell+hot ms (x, n_hot) | best speedup | rel err (best) | J/call dense | J/call sparse |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        v = r["variants"]
        a, b = v["twell"], v["twell+hot"]
        bb = v[r["best"]]
        lines.append(
            f"| {r['M']} | {r['H']} | {r['nnz_target']:g}{' +%d dense rows' % r.get('dense_rows_timed', r['dense_rows']) if r['dense_rows'] else ''}"
            f" | {r['nnz_mean']:.1f} / {r['nnz_max']} | {r['tile_nnz_max']} | {r['busiest_neuron_rate']:.3f} "
            f"| {r['dense_ms']:.3f} | {a['ms']:.3f} ({a['speedup']:.2f}x) | {b['ms']:.3f} ({b['speedup']:.2f}x, "
            f"{b['n_hot']}) | **{bb['speedup']:.2f}x** ({r['best']}) | {bb['rel_err']:.1e} | "
            f"{fmt_energy(r.get('energy_dense'))} | {fmt_energy(r.get('energy_sparse'))} |")
    extra = [f"- {k} (M={r['M']}, H={r['H']}, nnz {r['nnz_target']:g}): {vv['ms']:.3f} ms, {vv['speedup']:.2f}x, "
             f"rel err {vv['rel_err']:.1e}" for r in rows for k, vv in r["variants"].items()
             if k not in ("twell", "twell+hot")]
    graph = [f"- M={r['M']}, H={r['H']}, nnz {r['nnz_target']:g}: dense {r['dense_graph_ms']:.3f} ms; "
             + "; ".join(f"{k} {vv['graph_ms']:.3f} ms **{vv['graph_speedup']:.2f}x** (err {vv['graph_rel_err']:.1e})"
                         for k, vv in r["variants"].items() if "graph_ms" in vv)
             for r in rows if "dense_graph_ms" in r]
    if extra:
        lines += ["", "Other variants:"] + extra
    if graph:
        lines += ["", "Replayed from CUDA graphs (dense and sparse each captured once; GPU time without host "
                  "launch cost):"] + graph
    pc = [f"- M={r['M']}, H={r['H']}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                    for k, v in r["pieces"].items()) for r in rows if "pieces" in r]
    if pc:
        lines += ["", "Pieces (ms; all neurons sparse):"] + pc
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only M=16384, H=5632, nnz 29 (smoke test)")
    ap.add_argument("--only-m", type=int, nargs="*", default=[], help="only these M, nnz 29 cases")
    ap.add_argument("--full-sweep", action="store_true", help="nnz sweep at M=131072 too")
    ap.add_argument("--hot", type=int, nargs="*", default=[], help="extra explicit n_hot variants")
    ap.add_argument("--overflow", action="store_true",
                    help="only the overflow cases (dense rows: 16 in 16384, 64 in 131072 = one per 2048-token "
                         "sequence) and the clean M=16384 case, each in every overflow mode; writes "
                         "ffn_infer_overflow_<gpu>")
    ap.add_argument("--gate-impl", nargs="*", default=[], choices=["tma_persist", "tma", "ptr", "cublas"],
                    help="also time every variant with these gate implementations (suffix /<impl>)")
    ap.add_argument("--only-h", type=int, nargs="*", default=[], help="only these H (with --only-m)")
    ap.add_argument("--graphs", action="store_true",
                    help="also time dense and every variant replayed from a CUDA graph")
    ap.add_argument("--overlap", action="store_true",
                    help="also time every layout with overlap (each gate chunk's walk on a side stream)")
    ap.add_argument("--chunk-rows", type=int, nargs="*", default=[],
                    help="also time every layout with overlap and these cuBLAS gate chunk sizes (rows of x)")
    ap.add_argument("--name", default=None, help="results file stem (default ffn_infer[_overflow]_<gpu>)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_ffn_infer needs CUDA")
    env = environment()
    cases = []  # (M, H, nnz, energy, dense_rows)
    for m in (16384, 131072):
        for h in (H_FULL, 2816, 1408):
            cases.append((m, h, 29.0 * h / H_FULL, h == H_FULL, 0))
        if m == 16384 or args.full_sweep:   # the nnz curve; at M=131072 only with --full-sweep
            for nnz in (10.0, 60.0, 120.0):
                cases.append((m, H_FULL, nnz, False, 0))
    cases.append((16384, H_FULL, 29.0, False, 16))   # a few fully dense rows (overflow path)
    if args.quick:
        cases = [(16384, H_FULL, 29.0, False, 0)]
    if args.only_m:
        cases = [c for c in cases if c[0] in args.only_m and c[4] == 0 and c[2] == 29.0 * c[1] / H_FULL]
    if args.only_h:
        cases = [c for c in cases if c[1] in args.only_h]
    name, modes = f"ffn_infer_{gpu_slug()}", None
    if args.overflow:
        cases = [(16384, H_FULL, 29.0, False, 0), (16384, H_FULL, 29.0, False, 16), (131072, H_FULL, 29.0, False, 64)]
        name, modes = f"ffn_infer_overflow_{gpu_slug()}", ("rows", "walk")
    name = args.name or name
    rows = []
    t0 = time.time()
    for m, h, nnz, energy, dr in cases:
        r = run_case(m, h, nnz, energy=energy, dense_rows=dr, hot_list=args.hot, with_pieces=energy, modes=modes,
                     gate_impls=args.gate_impl, chunk_rows=args.chunk_rows, graphs=args.graphs,
                     overlap=args.overlap)
        rows.append(r)
        v = r["variants"]
        print(f"[{time.time() - t0:6.1f}s] M={m} H={h} nnz={nnz:g} dr={dr}: measured nnz {r['nnz_mean']:.1f}, "
              f"dense {r['dense_ms']:.3f} ms; " + "; ".join(
                  f"{k} {vv['ms']:.3f} ms {vv['speedup']:.2f}x err {vv['rel_err']:.1e}" for k, vv in v.items()),
              flush=True)
        if "pieces" in r:
            print("   pieces:", r["pieces"], flush=True)
        # rewritten after every case, so a run cut short still leaves its measured rows
        md = markdown(env, rows)
        jp, mp = write_results(name, {"environment": env, "rows": rows}, md)
    print(md)
    print(f"wrote {jp} and {mp}")


if __name__ == "__main__":
    main()
