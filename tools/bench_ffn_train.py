#!/usr/bin/env python3
"""FFN training benchmark (BENCHMARKS.md): hybrid sparse MLP vs dense torch bf16 autograd.

For each local width H and nnz target: forward+backward with the L1 term in the loss, dense
(faster of separate and packed gate-up) vs kernels.hybrid.sparse_gated_mlp, gradient relative
errors of both against an fp32 autograd reference on the same bf16 inputs, peak memory, and the
measured activation statistics. Writes bench/results/ffn_train_<gpu>.json and .md
(BENCH_RESULTS_DIR redirects them).

    python tools/bench_ffn_train.py                       # full protocol
    python tools/bench_ffn_train.py --hidden 5632 --nnz 29 --hot-fracs 0.01 0.02 none --breakdown
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels.hybrid import format as hyb_format  # noqa: E402
from kernels.hybrid import sparse_gated_mlp  # noqa: E402
from kernels.hybrid.csc_wgrad import csc_order, csc_wgrad  # noqa: E402
from kernels.hybrid.ell_sddmm import ell_sddmm, ell_sddmm_bwd  # noqa: E402
from kernels.hybrid.ell_spmm import ell_spmm  # noqa: E402
from kernels.hybrid.format import build_pattern  # noqa: E402
from kernels.hybrid.gate_pack import gate_pack  # noqa: E402
from kernels.hybrid.heavy_rows import heavy_backward, heavy_forward  # noqa: E402
from kernels.hybrid.hot_panel import gather_hot_rows  # noqa: E402
from kernels.hybrid.row_pack import cublas_gate_pack  # noqa: E402
from kernels.synthetic import make_ffn_inputs  # noqa: E402
from bench_common import (activation_stats, environment, gpu_slug, graph_replay_ms, median_ms,  # noqa: E402
                          peak_mem_mib, rel_err, write_results)

LAMBDA = 1e-2  # weight of the L1 term in the benchmark loss; any nonzero value exercises its gradient


def dense_ffn(x, wg, wu, wd, packed=False):
    if packed:
        gu = x @ torch.cat([wg, wu]).t()
        g, u = gu.chunk(2, dim=1)
    else:
        g, u = x @ wg.t(), x @ wu.t()
    h = torch.relu(g) * u
    return h @ wd.t(), h.abs().sum(dtype=torch.float32) / x.shape[0]


_LAMBDA_T: dict = {}


def fwd_bwd(fn, params, dy):
    """One training step of the layer: forward, loss = <y, dy> + LAMBDA * l1, gradients of all four.

    The L1 weight tensor is made once per device: building it inside the step (a pageable
    host-to-device copy every step, as this benchmark did before) stalls the queue each step and
    costs the launch-bound sparse step more than dense (kernels/hybrid/NOTES.md); a training
    loop has a Python-float coefficient instead."""
    out = fn(*params)
    y, l1 = out[0], out[1]
    lam = _LAMBDA_T.get(dy.device)
    if lam is None:
        lam = _LAMBDA_T[dy.device] = torch.tensor(LAMBDA, device=dy.device)
    return torch.autograd.grad([y, l1], params, [dy, lam])


def graph_ms(fn, params, dy):
    """Median ms of fwd_bwd(fn) replayed from a CUDA graph: the step's GPU time without the
    host's launch overhead. Leaves are re-made on the capture stream (autograd's leaf nodes
    remember the stream their tensors were made on)."""
    return graph_replay_ms(lambda p, d: fwd_bwd(fn, p, d),
                           setup=lambda: ([t.detach().clone().requires_grad_() for t in params], dy.clone()))[0]


def saved_mem_mib(fn, params):
    """Memory held between forward and backward (outputs + what autograd saved)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    out = fn(*params)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base
    del out
    return held / 2**20


def _step_operands(x, wg, wu, wd, dy, hot_frac, ell_width):
    """The inputs the pieces of one sparse step take, built once (breakdown and the sweep):
    (pattern, W_d^T, u, the L1 scale, du, dg, csc_order's (tok, h, du, dg))."""
    pat = build_pattern(x, wg, ell_width, hot_frac)
    wdt = wd.t().contiguous()
    u = ell_sddmm(x, wu, pat.idx, pat.cnt)
    scale = torch.tensor(LAMBDA / x.shape[0], device=x.device)
    du, dg = ell_sddmm_bwd(dy, wdt, pat.idx, pat.cnt, pat.g, u, scale)
    return pat, wdt, u, scale, du, dg, csc_order(pat.csc_ptr, pat.csc_slot, pat.width, (pat.g, u), du, dg)


def breakdown(x, wg, wu, wd, dy, hot_frac, ell_width):
    """Median ms of each piece of the sparse step (pieces run alone, so the sum is indicative)."""
    pat, wdt, u, scale, du, dg, (tok, h_c, du_c, dg_c) = _step_operands(x, wg, wu, wd, dy, hot_frac, ell_width)
    K = pat.hot.numel()
    y = torch.empty_like(x)
    hw, _ = gather_hot_rows(pat.hot, wg, wu, wdt)
    gu = x @ hw.t()
    hw_grads = [torch.zeros_like(wg), torch.zeros_like(wu), torch.zeros_like(wdt)]
    pieces = {
        "gate_pack (fused Triton epilogue)": lambda: gate_pack(x, wg, ell_width),
        "gate cuBLAS + row_pack": lambda: cublas_gate_pack(x, wg, ell_width),
        "build_pattern(incl gate)": lambda: build_pattern(x, wg, ell_width, hot_frac),
        "cuBLAS relu(x Wg^T)": lambda: torch.relu(x @ wg.t()),
        "fwd sddmm u": lambda: ell_sddmm(x, wu, pat.idx, pat.cnt),
        "fwd spmm y": lambda: ell_spmm(y, pat.idx, pat.cnt, pat.g, wdt, c3=u),
        "bwd sddmm dh": lambda: ell_sddmm_bwd(dy, wdt, pat.idx, pat.cnt, pat.g, u, scale),
        "bwd spmm dx": lambda: ell_spmm(y, pat.idx, pat.cnt, du, wu, c2=dg, w2=wg),
        "bwd csc order (tok, h, du, dg)": lambda: csc_order(pat.csc_ptr, pat.csc_slot, pat.width, (pat.g, u), du, dg),
        "bwd csc dWu+dWg": lambda: csc_wgrad(x, pat.csc_ptr, tok, wg.shape[0], du_c, dg_c),
        "bwd csc dWd": lambda: csc_wgrad(dy, pat.csc_ptr, tok, wg.shape[0], h_c),
        f"hot gemm [M,D]x[D,2K] (K={K})": lambda: x @ hw.t(),
        f"hot gemm [2K,M]x[M,D] (K={K})": lambda: gu.t() @ x,
        "heavy rows fwd": lambda: heavy_forward(x, wg, wu, wdt, pat.cold_mask, pat.heavy, pat.n_heavy,
                                                y, torch.empty(x.shape[0], device=x.device)),
        "heavy rows bwd (dx, dW)": lambda: heavy_backward(x, dy, wg, wu, wdt, pat.cold_mask, pat.heavy,
                                                          pat.n_heavy, scale, y, *hw_grads),
    }
    res = {k: median_ms(f) for k, f in pieces.items()}
    res["cold_nnz_per_token"] = float(pat.cnt.float().mean())
    res["ell_width_cold"] = pat.width
    res["hot_neurons"] = K
    res["heavy_rows"] = pat.heavy_rows().numel()
    res["pattern_bytes"] = pat.nbytes()
    return res


SWEEP = {
    "gate_pack": [dict(BM=128, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=4, SCAN=False),
                  dict(BM=128, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=4, SCAN=True),
                  dict(BM=128, BN=256, BK=64, GROUP_M=8, num_warps=8, num_stages=3, SCAN=False)],
    "row_pack": [dict(TWO_PASS=True, BR=32, BH=128, num_warps=4, COUNT_BR=64, COUNT_WARPS=4),
                 dict(TWO_PASS=True, BR=32, BH=128, num_warps=4, COUNT_BR=32, COUNT_WARPS=4),
                 dict(TWO_PASS=True, BR=32, BH=128, num_warps=4, COUNT_BR=64, COUNT_WARPS=8),
                 dict(TWO_PASS=True, BR=32, BH=128, num_warps=4, COUNT_BR=128, COUNT_WARPS=8),
                 dict(TWO_PASS=True, BR=16, BH=128, num_warps=4, COUNT_BR=64, COUNT_WARPS=4),
                 dict(TWO_PASS=True, BR=64, BH=128, num_warps=8, COUNT_BR=64, COUNT_WARPS=8),
                 dict(TWO_PASS=True, BR=16, BH=256, num_warps=4, COUNT_BR=32, COUNT_WARPS=4),
                 dict(TWO_PASS=True, BR=32, BH=256, num_warps=8, COUNT_BR=64, COUNT_WARPS=8),
                 dict(TWO_PASS=True, BR=8, BH=512, num_warps=4, COUNT_BR=32, COUNT_WARPS=8),
                 dict(BR=64, BH=128, num_warps=8, SCAN=True)],
    "ell_sddmm": [dict(WALK=True, num_warps=2), dict(WALK=True, num_warps=4), dict(WALK=True, num_warps=1),
                  dict(WALK=True, num_warps=8),
                  dict(SP=32, BD=128, num_warps=4), dict(SP=16, BD=256, num_warps=4),
                  dict(SP=32, BD=256, num_warps=8), dict(SP=16, BD=128, num_warps=4),
                  dict(SP=64, BD=64, num_warps=4)],
    "ell_spmm": [dict(WALK=True, num_warps=2), dict(WALK=True, num_warps=4), dict(WALK=True, num_warps=1),
                 dict(WALK=True, num_warps=8),
                 dict(SP=8, BD=512, num_warps=4), dict(SP=16, BD=512, num_warps=4),
                 dict(SP=8, BD=256, num_warps=4), dict(SP=16, BD=256, num_warps=4)],
    "csc_wgrad": [dict(WALK=True, num_warps=4), dict(WALK=True, num_warps=2), dict(WALK=True, num_warps=8),
                  dict(NB=1, KT=16, BD=512, num_warps=4), dict(NB=2, KT=16, BD=256, num_warps=4),
                  dict(NB=1, KT=32, BD=256, num_warps=4), dict(NB=4, KT=8, BD=256, num_warps=4)],
}


def sweep_configs(x, wg, wu, wd, dy, hot_frac, ell_width):
    """Time each kernel under each candidate launch config; install the fastest in the modules."""
    import kernels.hybrid.csc_wgrad as m_csc
    import kernels.hybrid.ell_sddmm as m_sddmm
    import kernels.hybrid.ell_spmm as m_spmm
    import kernels.hybrid.gate_pack as m_gate
    import kernels.hybrid.row_pack as m_row
    pat, wdt, u, scale, du, dg, (tok, h_c, du_c, dg_c) = _step_operands(x, wg, wu, wd, dy, hot_frac, ell_width)
    y = torch.empty_like(x)
    H = wg.shape[0]
    jobs = {
        "gate_pack": (m_gate, lambda: gate_pack(x, wg, ell_width)),
        "row_pack": (m_row, lambda: cublas_gate_pack(x, wg, ell_width)),
        "ell_sddmm": (m_sddmm, lambda: (ell_sddmm(x, wu, pat.idx, pat.cnt),
                                        ell_sddmm_bwd(dy, wdt, pat.idx, pat.cnt, pat.g, u, scale))),
        "ell_spmm": (m_spmm, lambda: (ell_spmm(y, pat.idx, pat.cnt, pat.g, wdt, c3=u),
                                      ell_spmm(y, pat.idx, pat.cnt, du, wu, c2=dg, w2=wg))),
        "csc_wgrad": (m_csc, lambda: (csc_wgrad(x, pat.csc_ptr, tok, H, du_c, dg_c),
                                      csc_wgrad(dy, pat.csc_ptr, tok, H, h_c))),
    }
    out = {}
    for name, (mod, fn) in jobs.items():
        times = []
        for cfg in SWEEP[name]:
            mod.CONFIG = dict(cfg)
            try:
                times.append((median_ms(fn), cfg))
            except Exception as e:  # noqa: BLE001 - a config may not compile (resources)
                times.append((float("inf"), {**cfg, "error": str(e)[:200]}))
        best = min(times, key=lambda t: t[0])
        mod.CONFIG = dict(best[1])
        out[name] = [{"ms": t, **c} for t, c in times]
        print(f"sweep {name}: " + ", ".join(f"{t:.3f}" for t, _ in times) + f" -> {best[1]}", flush=True)
    return out


def run_case(M, D, H, nnz, hot_fracs, ell_width, dense_rows=0, syncfrees=(True,), seed=0,
             graphs=False, hot_from_pack=(True,),
             grads=True,
             do_breakdown=False,
             do_profile=False):
    dev = "cuda"
    inp = make_ffn_inputs(M, D, H, target_nnz=nnz, dense_rows=dense_rows, dtype=torch.bfloat16,
                          device=dev, seed=seed)
    params = [t.requires_grad_() for t in (inp.x, inp.w_gate, inp.w_up, inp.w_down)]
    dy = torch.randn(M, D, device=dev, dtype=torch.bfloat16, generator=torch.Generator(dev).manual_seed(seed + 1))
    rec = {"M": M, "D": D, "H": H, "nnz_target": nnz, "dense_rows": dense_rows,
           "stats": activation_stats(inp.x, inp.w_gate)}
    t_sep = median_ms(lambda: fwd_bwd(dense_ffn, params, dy))
    t_pk = median_ms(lambda: fwd_bwd(lambda *p: dense_ffn(*p, packed=True), params, dy))
    rec["dense_separate_ms"], rec["dense_packed_ms"] = t_sep, t_pk
    rec["dense_ms"] = min(t_sep, t_pk)
    if graphs:   # both sides replayed from CUDA graphs (the faster dense variant)
        rec["dense_graph_ms"] = graph_ms(dense_ffn if t_sep <= t_pk else lambda *p: dense_ffn(*p, packed=True),
                                         params, dy)
    rec["dense_peak_mib"] = peak_mem_mib(lambda: fwd_bwd(dense_ffn, params, dy))
    rec["dense_saved_mib"] = saved_mem_mib(dense_ffn, params)
    ref = None
    if grads:
        p32 = [p.detach().float().requires_grad_() for p in params]
        ref = fwd_bwd(dense_ffn, p32, dy.float())
        gd = fwd_bwd(dense_ffn, params, dy)
        rec["dense_bf16_grad_rel_err"] = {n: rel_err(a, b) for n, a, b in zip(("dx", "dWg", "dWu", "dWd"), gd, ref)}
        del gd
    rec["variants"] = []
    for hf, sf, hp in [(h, f, p) for h in hot_fracs for f in syncfrees for p in hot_from_pack]:
        def fn(*p, hf=hf, sf=sf, hp=hp):
            hyb_format.SYNC_FREE["enabled"] = sf
            hyb_format.GATE["hot_from_pack"] = hp
            return sparse_gated_mlp(*p, ell_width=ell_width, hot_frac=hf)
        v = {"hot_frac": hf, "ell_width": ell_width, "sync_free": sf, "hot_from_pack": hp}
        with torch.no_grad():
            y_s, l1_s, fire = fn(*params)
        with torch.no_grad():
            y_r, l1_r = dense_ffn(*[p.float() for p in params])
        v["y_rel_err"] = rel_err(y_s, y_r)
        v["l1_rel_err"] = abs(float(l1_s) - float(l1_r)) / max(abs(float(l1_r)), 1e-30)
        v["fire_nnz_per_token"] = float(fire.sum()) / M
        del y_s, y_r
        v["sparse_ms"] = median_ms(lambda: fwd_bwd(fn, params, dy))
        v["speedup"] = rec["dense_ms"] / v["sparse_ms"]
        if graphs and sf:
            v["sparse_graph_ms"] = graph_ms(fn, params, dy)
            v["graph_speedup"] = rec["dense_graph_ms"] / v["sparse_graph_ms"]
        v["sparse_peak_mib"] = peak_mem_mib(lambda: fwd_bwd(fn, params, dy))
        v["sparse_saved_mib"] = saved_mem_mib(fn, params)
        if ref is not None:
            gs = fwd_bwd(fn, params, dy)
            v["grad_rel_err"] = {n: rel_err(a, b) for n, a, b in zip(("dx", "dWg", "dWu", "dWd"), gs, ref)}
            del gs
        rec["variants"].append(v)
        print(f"H={H} nnz={nnz} hot_frac={hf} sync_free={sf} hot_from_pack={hp}: dense {rec['dense_ms']:.3f} ms sparse {v['sparse_ms']:.3f} ms "
              f"x{v['speedup']:.2f} graphs {rec.get('dense_graph_ms')} / {v.get('sparse_graph_ms')} grad {v.get('grad_rel_err')}",
              flush=True)
    best = min(rec["variants"], key=lambda v: v["sparse_ms"])
    rec["best"] = best
    if do_breakdown:
        rec["breakdown_ms"] = breakdown(*params, dy, best["hot_frac"], ell_width)
        print("breakdown", rec["breakdown_ms"], flush=True)
    if do_profile:
        hyb_format.SYNC_FREE["enabled"] = best["sync_free"]
        hyb_format.GATE["hot_from_pack"] = best["hot_from_pack"]
        fn = lambda *p: sparse_gated_mlp(*p, ell_width=ell_width, hot_frac=best["hot_frac"])  # noqa: E731
        rec["sparse_fwd_ms"] = median_ms(lambda: fn(*params))
        with torch.no_grad():
            rec["sparse_fwd_nograd_ms"] = median_ms(lambda: fn(*params))
        from torch.profiler import ProfilerActivity, profile
        for _ in range(3):
            fwd_bwd(fn, params, dy)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fwd_bwd(fn, params, dy)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60)
        print(table, flush=True)
        # GPU work per step (sum of kernel times) against the measured step: the gap is idle GPU
        # time (CPU launch overhead, the end-of-forward host read)
        from torch.autograd import DeviceType
        gpu_us = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type == DeviceType.CUDA)
        rec["gpu_kernel_ms_per_step"] = gpu_us / 5 / 1000
        print(f"GPU kernel time per step {rec['gpu_kernel_ms_per_step']:.3f} ms", flush=True)
        rec["profile_table"] = table
    del ref
    torch.cuda.empty_cache()
    return rec


def markdown(env, cases):
    lines = [f"# FFN training fwd+bwd (L1 in loss): hybrid sparse vs dense torch bf16 autograd",
             "", f"GPU {env.get('gpu')}, torch {env.get('torch')}, triton {env.get('triton')}, "
             f"CUDA {env.get('cuda')}, commit {env.get('git_commit')}, {env.get('date_utc')}", "",
             "| M | D | H | nnz target | nnz/token (mean/max) | busiest neuron | dense ms | sparse ms (hot_frac) "
             "| speedup | grad rel err dx/dWg/dWu/dWd (sparse) | same for dense bf16 | peak MiB dense/sparse "
             "| saved MiB dense/sparse |", "|" + "---|" * 13]
    note = ("nnz targets for H < 5632 are the per-rank share of 29 (29 * H / 5632): the same model "
            "sharded by tensor parallelism. Speedup uses the faster dense variant (separate or packed "
            "gate-up); sparse ms is the fastest hot_frac variant.")
    for c in cases:
        b, s = c["best"], c["stats"]
        ge = b.get("grad_rel_err") or {}
        gd = c.get("dense_bf16_grad_rel_err") or {}
        fmt = lambda d: "/".join(f"{d[k]:.1e}" for k in ("dx", "dWg", "dWu", "dWd")) if d else "-"  # noqa: E731
        lines.append(f"| {c['M']} | {c['D']} | {c['H']} | {c['nnz_target']}{' +%d dense rows' % c['dense_rows'] if c['dense_rows'] else ''} "
                     f"| {s['nnz_mean']:.1f}/{s['nnz_max']} | {s['busiest_neuron_rate']:.3f} | {c['dense_ms']:.3f} "
                     f"| {b['sparse_ms']:.3f} ({b['hot_frac']}{', sync-free' if b.get('sync_free') else ''}) | **{b['speedup']:.2f}x** | {fmt(ge)} | {fmt(gd)} "
                     f"| {c['dense_peak_mib']:.0f}/{b['sparse_peak_mib']:.0f} | {c['dense_saved_mib']:.0f}/{b['sparse_saved_mib']:.0f} |")
    lines += ["", note]
    graphed = [c for c in cases if "dense_graph_ms" in c]
    if graphed:
        lines += ["", "Both sides replayed from CUDA graphs (GPU time without launch overhead; "
                  "the sparse layer has no host sync, so it can be captured):", "",
                  "| H | nnz | dense graph ms | sparse graph ms | speedup |", "|---|---|---|---|---|"]
        for c in graphed:
            v = min((v for v in c["variants"] if "sparse_graph_ms" in v), key=lambda v: v["sparse_graph_ms"])
            lines.append(f"| {c['H']} | {c['nnz_target']}{' +%d dense rows' % c['dense_rows'] if c['dense_rows'] else ''} "
                         f"| {c['dense_graph_ms']:.3f} | {v['sparse_graph_ms']:.3f} | **{v['graph_speedup']:.2f}x** |")
    lines += ["", "All variants (hot_frac sweep):", "",
              "| H | nnz | hot_frac | sync-free | hot g from pack | sparse ms | speedup | sparse graph ms |",
              "|---|---|---|---|---|---|---|---|"]
    for c in cases:
        for v in c["variants"]:
            gms = f"{v['sparse_graph_ms']:.3f}" if "sparse_graph_ms" in v else "-"
            lines.append(f"| {c['H']} | {c['nnz_target']} | {v['hot_frac']} | {v.get('sync_free')} "
                         f"| {v.get('hot_from_pack')} | {v['sparse_ms']:.3f} | {v['speedup']:.2f}x | {gms} |")
    for c in cases:
        if "breakdown_ms" in c:
            lines += ["", f"Breakdown, H={c['H']} nnz={c['nnz_target']} (pieces timed alone):", ""]
            lines += [f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in c["breakdown_ms"].items()]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--hidden", type=int, nargs="+", default=[5632, 2816, 1408])
    ap.add_argument("--nnz", type=float, nargs="+", default=[10, 29, 60, 120])
    ap.add_argument("--hot-fracs", nargs="+", default=["0.01", "0.02", "0.05"])
    ap.add_argument("--ell-width", type=int, default=256)
    ap.add_argument("--dense-rows", type=int, default=4, help="extra case at nnz 29 with this many dense rows")
    ap.add_argument("--sync-free", choices=["on", "off", "both"], default="on",
                    help="remembered hot count, no host read in the layer (format.SYNC_FREE)")
    ap.add_argument("--hot-from-pack", choices=["on", "off", "both"], default="off",
                    help="hot panel's g copied by the pack pass, or recomputed by its GEMM (format.GATE)")
    ap.add_argument("--graphs", action="store_true",
                    help="also time dense and sparse fwd+bwd replayed from CUDA graphs (no launch overhead)")
    ap.add_argument("--breakdown", action="store_true")
    ap.add_argument("--profile", action="store_true", help="torch.profiler table of the main case")
    ap.add_argument("--sweep", action="store_true", help="sweep launch configs on the first case first")
    ap.add_argument("--stem", default=None)
    a = ap.parse_args()
    hot_fracs = [None if h == "none" else float(h) for h in a.hot_fracs]
    syncfrees = {"on": (True,), "off": (False,), "both": (True, False)}[a.sync_free]
    hfp = {"on": (True,), "off": (False,), "both": (True, False)}[a.hot_from_pack]
    env = environment()
    print(env, flush=True)
    cases = []
    sweep = None
    if a.sweep:
        inp = make_ffn_inputs(a.tokens, a.d_model, a.hidden[0], target_nnz=29, dtype=torch.bfloat16, device="cuda")
        dy = torch.randn(a.tokens, a.d_model, device="cuda", dtype=torch.bfloat16)
        sweep = sweep_configs(inp.x, inp.w_gate, inp.w_up, inp.w_down, dy, hot_fracs[0], a.ell_width)
        del inp, dy
    for H in a.hidden:
        nnzs = a.nnz if H == a.hidden[0] else [n * H / a.hidden[0] for n in a.nnz if n == 29] or a.nnz[:1]
        for nnz in nnzs:
            main_case = H == a.hidden[0] and nnz == 29
            cases.append(run_case(a.tokens, a.d_model, H, nnz, hot_fracs, a.ell_width,
                                  syncfrees=syncfrees, graphs=a.graphs, hot_from_pack=hfp, do_breakdown=a.breakdown and main_case,
                                  do_profile=a.profile and main_case))
    if a.dense_rows:
        cases.append(run_case(a.tokens, a.d_model, a.hidden[0], 29, hot_fracs[:1], a.ell_width,
                              syncfrees=syncfrees, dense_rows=a.dense_rows, graphs=a.graphs,
                              hot_from_pack=hfp))
    payload = {"environment": env, "protocol": "BENCHMARKS.md FFN training", "lambda_l1": LAMBDA, "cases": cases,
               "sweep": sweep}
    md = markdown(env, cases)
    print(md)
    write_results(a.stem or f"ffn_train_{gpu_slug()}", payload, md)


if __name__ == "__main__":
    main()
