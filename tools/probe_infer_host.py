#!/usr/bin/env python3
"""Where the host time of one eager twell_ffn call goes (the tensor-parallel widths are host-bound).

    python tools/probe_infer_host.py [--H 1408] [--n-hot 384]

At M=16384, H=1408 the FFN's GPU time is ~0.35 ms (CUDA graph), but an eager call took 0.45-0.7
ms in bench_ffn_infer.py: the host issues kernels slower than the GPU runs them. This times the
host side of an eager call while the GPU is busy (so nothing waits on it), then cProfiles calls
and prints the functions with the most self time. Writes bench/results/probe_infer_host_<gpu>.json
($BENCH_RESULTS_DIR to redirect).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import RESULTS_DIR, busy_issue_ms, environment, gpu_slug, graph_replay_ms, median_ms  # noqa: E402
from bench_ffn_infer import make_inputs  # noqa: E402
from kernels import twell  # noqa: E402


def _mean_issue_ms(fn, n=50):
    fn()
    times = busy_issue_ms(fn, n)
    return sum(times) / n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--M", type=int, default=16384)
    ap.add_argument("--H", type=int, default=1408)
    ap.add_argument("--n-hot", type=int, default=384)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    torch.manual_seed(0)
    f, x, xc = make_inputs(a.M, a.H, 29.0 * a.H / 5632)
    w0 = twell.prepare_weights(f.w_gate, f.w_up, f.w_down)
    _, fc = twell.twell_ffn(xc, w0, return_fire_counts=True)
    w = twell.calibrate(w0, fc, xc.shape[0], n_hot=a.n_hot)
    out = {"environment": environment(), "case": vars(a)}
    for name, weights in (("all sparse", w0), (f"hot{a.n_hot}", w)):
        fn = lambda: twell.twell_ffn(x, weights)  # noqa: E731
        r = {"eager_ms": median_ms(fn), "graph_ms": graph_replay_ms(fn)[0], "host_issue_ms": _mean_issue_ms(fn)}
        torch.cuda._sleep(int(2e9))
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(50):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(a.top)
        r["cprofile_tottime"] = s.getvalue()
        out[name] = r
        print(name, {k: v for k, v in r.items() if k != "cprofile_tottime"}, flush=True)
        print(r["cprofile_tottime"], flush=True)
    d = Path(os.environ.get("BENCH_RESULTS_DIR") or RESULTS_DIR)
    d.mkdir(parents=True, exist_ok=True)
    (d / f"probe_infer_host_{gpu_slug()}.json").write_text(json.dumps(out, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
