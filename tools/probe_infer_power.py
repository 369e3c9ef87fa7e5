"""Probe: time, energy, power and SM clock of each piece of the inference FFN, dense and TwELL.

    python tools/probe_infer_power.py   -> bench/results/probe_infer_power_<gpu>.{json,md}

Why: the full-protocol energy loops of bench_ffn_infer.py drew 690-705 W for dense and sparse
alike, i.e. the H100 sat at its power cap. If each piece is power-capped too, its time follows
its energy, and a faster kernel must also be a cheaper one. For M=16384, H=5632, nnz 29 (the
BENCHMARKS.md generator) and the hot1536 layout (calibrated on separate tokens) this times each
dense and sparse piece with do_bench and runs it in a >= 1.5 s loop reading NVML's energy
counter and sampling the SM clock. The dense down GEMM runs on the real h (99.5% zeros) and on
a dense random h of the same shape, to see whether zeros make a GEMM cheaper. Then a
torch.profiler trace of one eager sparse call (kernel times and the gaps between them), and
eager against CUDA-graph replay for dense and sparse at H=5632/2816/1408.
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (_nvml_handle, energy_joules_per_call, environment, gpu_slug, graph_replay_ms,  # noqa: E402
                          median_ms, write_results)
from bench_ffn_infer import dense_fns, make_inputs  # noqa: E402
from kernels import twell  # noqa: E402
from kernels.twell.gate import gate_twell, gate_up_dense  # noqa: E402
from kernels.twell.pack import pack_twell  # noqa: E402
from kernels.twell.updown import updown  # noqa: E402


def measure(fn, seconds=1.5):
    """do_bench median, then an energy loop with the SM clock sampled every 20 ms beside it."""
    ms = median_ms(fn)
    pynvml, h = _nvml_handle()
    clocks, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            clocks.append(pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM))
            time.sleep(0.02)
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    e = energy_joules_per_call(fn, seconds=seconds)
    stop.set()
    th.join()
    busy = clocks[len(clocks) // 5:] or clocks   # skip the ramp
    return {"ms": ms, "loop_ms": 1e3 * e["seconds"] / e["calls"], "joules": e["joules_per_call"],
            "watts": e["mean_watts"], "sm_mhz": sum(busy) / max(1, len(busy))}


def pieces(m=16384, h=5632, n_hot=1536):
    torch.manual_seed(0)
    f, x, xc = make_inputs(m, h, 29.0 * h / 5632)
    sep, _ = dense_fns(f)
    w0 = twell.prepare_weights(f.w_gate, f.w_up, f.w_down)
    _, fc = twell.twell_ffn(xc, w0, return_fire_counts=True)
    w = twell.calibrate(w0, fc, xc.shape[0], n_hot=n_hot)
    g = F.linear(x, f.w_gate)
    u = F.linear(x, f.w_up)
    hh = torch.relu(g) * u
    h_rand = torch.randn_like(hh) * hh.float().std().to(hh.dtype)
    cold = w.w_gate[n_hot:]
    g_cold = F.linear(x, cold)
    counts, pairs = gate_twell(x, w.w_gate, w.tile, w.cap, n_hot)
    h_hot = gate_up_dense(x, w.w_gate, w.w_up, n_hot, w.tile)
    wgu_hot = torch.cat([w.w_gate[:n_hot], w.w_up[:n_hot]]).contiguous()
    y = twell.twell_ffn(x, w)
    fns = {
        "dense: gate GEMM x W_g^T": lambda: F.linear(x, f.w_gate),
        "dense: up GEMM x W_u^T": lambda: F.linear(x, f.w_up),
        "dense: relu(g) * u": lambda: torch.relu(g) * u,
        "dense: down GEMM, real h (99.5% zeros)": lambda: F.linear(hh, f.w_down),
        "dense: down GEMM, random dense h": lambda: F.linear(h_rand, f.w_down),
        "dense: whole FFN": lambda: sep(x),
        f"sparse: cold gate GEMM alone ({h - n_hot} cols)": lambda: F.linear(x, cold),
        "sparse: pack alone": lambda: pack_twell(g_cold, counts, pairs, w.tile, w.cap),
        "sparse: cold gate + pack (default impl)": lambda: gate_twell(x, w.w_gate, w.tile, w.cap, n_hot),
        "sparse: hot gate+up (Triton, h written)": lambda: gate_up_dense(x, w.w_gate, w.w_up, n_hot, w.tile),
        "sparse: hot gate+up GEMM by cuBLAS (no epilogue)": lambda: F.linear(x, wgu_hot),
        "sparse: hot down addmm": lambda: y.addmm_(h_hot, w.w_down_t[:n_hot]),
        "sparse: cold up/down walk": lambda: updown(x, w.w_gate, w.w_up, w.w_down_t, counts, pairs, y,
                                                    tile=w.tile, cap=w.cap, col0=n_hot),
        f"sparse: whole FFN (hot{n_hot})": lambda: twell.twell_ffn(x, w),
    }
    out = {}
    for name, fn in fns.items():
        out[name] = measure(fn)
        print(name, out[name], flush=True)
    try:
        out["_profile"] = profile(lambda: twell.twell_ffn(x, w))
    except Exception as e:   # the profile is context, not the point: report why it is missing
        out["_profile"] = {"error": f"{type(e).__name__}: {e}", "kernels": [], "sum_us": 0, "span_us": 0}
    return out


def profile(fn):
    """Kernel names and GPU times of one eager call, and its span from first start to last end."""
    from torch.profiler import ProfilerActivity, profile as tprof
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with tprof(activities=[ProfilerActivity.CUDA]) as p:
        fn()
        torch.cuda.synchronize()
    evs = sorted((e for e in p.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    kernels = [{"name": e.name[:80], "us": e.time_range.end - e.time_range.start,
                "start_us": e.time_range.start - evs[0].time_range.start} for e in evs]
    span = max(e.time_range.end for e in evs) - evs[0].time_range.start
    return {"kernels": kernels, "sum_us": sum(k["us"] for k in kernels), "span_us": span}


def graph_vs_eager():
    rows = []
    for h, n_hot in ((5632, 1536), (2816, 768), (1408, 384)):
        torch.manual_seed(0)
        f, x, xc = make_inputs(16384, h, 29.0 * h / 5632)
        sep, _ = dense_fns(f)
        w0 = twell.prepare_weights(f.w_gate, f.w_up, f.w_down)
        _, fc = twell.twell_ffn(xc, w0, return_fire_counts=True)
        w = twell.calibrate(w0, fc, xc.shape[0], n_hot=n_hot)
        r = {"H": h, "n_hot": n_hot}
        for name, fn in (("dense", lambda: sep(x)), ("sparse", lambda: twell.twell_ffn(x, w))):
            r[f"{name}_eager_ms"] = median_ms(fn)
            r[f"{name}_graph_ms"], out = graph_replay_ms(fn)
            r[f"{name}_graph_matches_eager"] = bool(torch.equal(out, fn()))
        r["speedup_eager"] = r["dense_eager_ms"] / r["sparse_eager_ms"]
        r["speedup_graph"] = r["dense_graph_ms"] / r["sparse_graph_ms"]
        print(r, flush=True)
        rows.append(r)
    return rows


def markdown(env, res):
    lines = [f"# Inference FFN pieces: time, energy, power ({env.get('gpu')}, commit {env.get('git_commit')})", "",
             "M=16384, D=2048, H=5632, nnz 29, bf16. ms: do_bench median (L2 flushed). loop ms, J, W, MHz: a "
             ">= 1.5 s back-to-back loop (NVML energy counter, SM clock sampled every 20 ms).", "",
             "| piece | ms | loop ms | J/call | W | SM MHz |", "|---|---|---|---|---|---|"]
    for k, v in res["pieces"].items():
        if not k.startswith("_"):
            lines.append(f"| {k} | {v['ms']:.3f} | {v['loop_ms']:.3f} | {v['joules']:.4f} | {v['watts']:.0f} | "
                         f"{v['sm_mhz']:.0f} |")
    p = res["pieces"]["_profile"]
    lines += ["", f"One eager sparse call under torch.profiler: kernels sum to {p['sum_us']:.0f} us, span "
              f"{p['span_us']:.0f} us.", "", "| kernel | start us | us |", "|---|---|---|"]
    lines += [f"| `{k['name']}` | {k['start_us']:.0f} | {k['us']:.1f} |" for k in p["kernels"]]
    lines += ["", "Eager against CUDA-graph replay, M=16384 (n_hot scaled with H):", "",
              "| H | n_hot | dense eager | dense graph | sparse eager | sparse graph | speedup eager | speedup graph |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['H']} | {r['n_hot']} | {r['dense_eager_ms']:.3f} | {r['dense_graph_ms']:.3f} | "
              f"{r['sparse_eager_ms']:.3f} | {r['sparse_graph_ms']:.3f} | {r['speedup_eager']:.2f}x | "
              f"{r['speedup_graph']:.2f}x |" for r in res["graphs"]]
    return "\n".join(lines) + "\n"


def main():
    if not torch.cuda.is_available():
        sys.exit("probe_infer_power needs CUDA")
    env = environment()
    res = {"pieces": pieces(), "graphs": graph_vs_eager()}
    write_results(f"probe_infer_power_{gpu_slug()}", {"environment": env, **res}, markdown(env, res))


if __name__ == "__main__":
    main()
