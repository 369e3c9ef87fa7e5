#!/usr/bin/env python3
"""Where the host time of one eager hybrid training step goes (kernels/hybrid/NOTES.md).

The eager step is host-bound on the H100 VMs (its CPU issue time is about its GPU time), so this
profiles the host side: cProfile over eager fwd+bwd steps (self time per Python function, which
includes Triton's launcher and torch's ops), and the bare cost of issuing one trivial Triton
kernel and a few small torch ops, for scale. Writes $BENCH_RESULTS_DIR/probe_host_profile.json.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels.hybrid import sparse_gated_mlp  # noqa: E402
from bench_common import add_ffn_case_args, busy_issue_ms, ffn_training_case  # noqa: E402
from bench_ffn_train import dense_ffn, fwd_bwd  # noqa: E402


@triton.jit
def _noop_kernel(a_ptr, b_ptr, c_ptr, n, m, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(c_ptr + i, tl.load(a_ptr + i, mask=i < n) + tl.load(b_ptr + i, mask=i < m), mask=i < n)


def _per_call_us(fn, n=2000):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    dt = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return dt


def main():
    ap = argparse.ArgumentParser()
    add_ffn_case_args(ap, steps=30)
    ap.add_argument("--top", type=int, default=45)
    args = ap.parse_args()
    a = torch.randn(4096, device="cuda")
    out = {"case": vars(args), "gpu": torch.cuda.get_device_name(), "issue_us": {
        "triton_noop_5_args": _per_call_us(lambda: _noop_kernel[(1,)](a, a, a, 100, 100, BLOCK=128)),
        "torch_zeros_2": _per_call_us(lambda: torch.zeros(2, device="cuda")),
        "torch_empty_1M": _per_call_us(lambda: torch.empty(1 << 20, device="cuda")),
        "torch_add": _per_call_us(lambda: a + a),
        "torch_mm_64": _per_call_us(lambda: a[:4096].view(64, 64) @ a[:4096].view(64, 64)),
    }}
    dev2 = torch.zeros(2, dtype=torch.int32, device="cuda")
    out["busy_pinned_alloc_and_copy_ms"] = busy_issue_ms(
        lambda: torch.empty(2, dtype=torch.int32, pin_memory=True).copy_(dev2, non_blocking=True), 4)
    print(json.dumps(out), flush=True)
    params, dy = ffn_training_case(args)
    for _ in range(5):
        fwd_bwd(sparse_gated_mlp, params, dy)
    out["busy_step_issue_ms"] = busy_issue_ms(lambda: fwd_bwd(sparse_gated_mlp, params, dy), 6)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(args.steps):
        fwd_bwd(sparse_gated_mlp, params, dy)
    out["host_ms_per_step_no_profiler"] = (time.perf_counter() - t) / args.steps * 1e3
    torch.cuda.synchronize()
    out["wall_ms_per_step_no_profiler"] = (time.perf_counter() - t) / args.steps * 1e3
    out["dense_ms"] = triton.testing.do_bench(lambda: fwd_bwd(dense_ffn, params, dy), return_mode="median")
    out["sparse_ms"] = triton.testing.do_bench(lambda: fwd_bwd(sparse_gated_mlp, params, dy), return_mode="median")
    print(json.dumps(out), flush=True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.steps):
        fwd_bwd(sparse_gated_mlp, params, dy)
    prof.disable()
    torch.cuda.synchronize()
    for sort in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(sort).print_stats(args.top)
        out[f"cprofile_{sort}"] = s.getvalue()
        print(s.getvalue(), flush=True)
    if os.environ.get("BENCH_RESULTS_DIR"):
        Path(os.environ["BENCH_RESULTS_DIR"], "probe_host_profile.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
