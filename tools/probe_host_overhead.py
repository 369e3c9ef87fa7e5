#!/usr/bin/env python3
"""Where the hybrid training step's wall time goes beyond its GPU work (kernels/hybrid/NOTES.md).

For one case (default: the main case, M=16384, D=2048, H=5632, nnz 29) it measures, in one process:
  * dense and sparse fwd+bwd, eager (do_bench medians, as bench_ffn_train.py);
  * the CPU time to issue one sparse step while the GPU is kept busy by a long sleep kernel, so
    no call blocks (the layer has no host sync after its first call), split by hybrid function;
  * both steps replayed from CUDA graphs, i.e. the GPU time without host overhead.
Prints one JSON object; writes it to $BENCH_RESULTS_DIR/probe_host_overhead.json if set.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels.hybrid import format as hyb_format  # noqa: E402
from kernels.hybrid import function as hyb_function  # noqa: E402
from kernels.hybrid import sparse_gated_mlp  # noqa: E402
from bench_common import add_ffn_case_args, ffn_training_case  # noqa: E402
from bench_ffn_train import dense_ffn, fwd_bwd, graph_ms  # noqa: E402

CPU_TIMES: dict = collections.defaultdict(float)


def _timed(mod, name):
    fn = getattr(mod, name)

    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            CPU_TIMES[name] += time.perf_counter() - t
    setattr(mod, name, wrapper)


def main():
    ap = argparse.ArgumentParser()
    add_ffn_case_args(ap, steps=20)
    args = ap.parse_args()
    params, dy = ffn_training_case(args)
    x, wg = params[0], params[1]
    out = {"case": vars(args), "gpu": torch.cuda.get_device_name()}

    def dense():
        return fwd_bwd(dense_ffn, params, dy)

    def sparse():
        return fwd_bwd(sparse_gated_mlp, params, dy)

    out["dense_eager_ms"] = triton.testing.do_bench(dense, return_mode="median")
    out["sparse_eager_ms"] = triton.testing.do_bench(sparse, return_mode="median")
    pat = hyb_format.build_pattern(x, wg, hyb_function.DEFAULT_ELL_WIDTH, hyb_function.DEFAULT_HOT_FRAC)
    out["heavy_rows"] = pat.heavy_rows().numel()

    for name in ("build_pattern", "ell_sddmm", "ell_sddmm_bwd", "ell_spmm", "csc_order", "csc_wgrad",
                 "gather_hot_rows", "hot_forward", "hot_backward", "heavy_forward", "heavy_backward"):
        _timed(hyb_function, name)
    for name in ("count_pass", "pack_pass", "cublas_gate_pack", "split_pack"):
        _timed(hyb_format, name)
    sparse()
    torch.cuda.synchronize()
    CPU_TIMES.clear()
    torch.cuda._sleep(int(2e9))   # ~1 s of GPU work ahead of everything issued below
    t0 = time.perf_counter()
    fwd_cpu, bwd_cpu = [], []
    for _ in range(args.steps):
        t = time.perf_counter()
        y, l1, _fire = sparse_gated_mlp(*params)
        t1 = time.perf_counter()
        torch.autograd.grad([y, l1], params, [dy, torch.ones((), device="cuda")])
        t2 = time.perf_counter()
        fwd_cpu.append(t1 - t)
        bwd_cpu.append(t2 - t1)
    issue = time.perf_counter() - t0
    busy = torch.cuda.Event()
    busy.record()
    out["gpu_still_busy_after_issue"] = not busy.query()
    torch.cuda.synchronize()
    n = args.steps
    out["sparse_cpu_issue_ms_per_step"] = issue / n * 1e3
    # medians: one step may still block once (e.g. on the allocator), which a sum would hide
    out["sparse_cpu_fwd_ms_median"] = sorted(fwd_cpu)[n // 2] * 1e3
    out["sparse_cpu_bwd_ms_median"] = sorted(bwd_cpu)[n // 2] * 1e3
    out["sparse_cpu_by_function_ms"] = {k: v / n * 1e3 for k, v in sorted(CPU_TIMES.items())}
    print(json.dumps(out), flush=True)
    out["dense_graph_ms"] = graph_ms(dense_ffn, params, dy)
    print(json.dumps(out), flush=True)
    out["sparse_graph_ms"] = graph_ms(sparse_gated_mlp, params, dy)
    print(json.dumps(out, indent=1))
    if os.environ.get("BENCH_RESULTS_DIR"):
        Path(os.environ["BENCH_RESULTS_DIR"], "probe_host_overhead.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
