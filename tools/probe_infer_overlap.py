"""Probe: can the memory-bound cold walk hide under a power-capped tensor-core GEMM?

    python tools/probe_infer_overlap.py   -> bench/results/probe_infer_overlap_<gpu>.{json,md}

probe_infer_power.py found the GEMMs of the inference FFN at the H100's 700 W cap (SM clock
~1430 MHz) while the cold up/down walk runs at 1980 MHz and ~630 W: it is bound by L2, not by
power. Run side by side on two streams, the walk's bandwidth might come at little extra time.
For M=16384, H=5632, nnz 29, hot1536 this times the hot gate+up GEMM (Triton, or cuBLAS with an
SM carve-out so that the walk has SMs of its own) and the walk, serially and on two streams
(walk stream at normal or high priority, walk launched first or second).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import environment, gpu_slug, median_ms, write_results  # noqa: E402
from bench_ffn_infer import make_inputs  # noqa: E402
from kernels import twell  # noqa: E402
from kernels.twell.gate import gate_twell, gate_up_dense  # noqa: E402
from kernels.twell.updown import updown  # noqa: E402


def with_carveout(k, fn, lt=False):
    """fn with torch's experimental cuBLAS SM carve-out (k SMs left free); lt: via cuBLASLt."""
    def run():
        torch._C._set_sm_carveout_experimental(k)
        if lt:
            torch.backends.cuda.preferred_blas_library("cublaslt")
        try:
            return fn()
        finally:
            torch._C._set_sm_carveout_experimental(None)
            if lt:
                torch.backends.cuda.preferred_blas_library("default")
    return run if k or lt else fn


def main():
    if not torch.cuda.is_available():
        sys.exit("probe_infer_overlap needs CUDA")
    env, n_hot = environment(), 1536
    torch.manual_seed(0)
    f, x, xc = make_inputs(16384, 5632, 29.0)
    w0 = twell.prepare_weights(f.w_gate, f.w_up, f.w_down)
    _, fc = twell.twell_ffn(xc, w0, return_fire_counts=True)
    w = twell.calibrate(w0, fc, xc.shape[0], n_hot=n_hot)
    counts, pairs = gate_twell(x, w.w_gate, w.tile, w.cap, n_hot)
    y = torch.empty_like(x)
    wgu = torch.cat([w.w_gate[:n_hot], w.w_up[:n_hot]]).contiguous()
    gu_out = torch.empty(x.shape[0], 2 * n_hot, dtype=x.dtype, device=x.device)

    def walk():
        updown(x, w.w_gate, w.w_up, w.w_down_t, counts, pairs, y, tile=w.tile, cap=w.cap, col0=n_hot)

    gemms = {"triton hot gate+up": lambda: gate_up_dense(x, w.w_gate, w.w_up, n_hot, w.tile),
             "cold gate GEMM (cuBLAS, 4096 cols)": lambda: torch.mm(x, w.w_gate[n_hot:].t())}
    for k in (0, 8, 16, 32):
        gemms[f"cuBLAS hot gate+up, carve-out {k}"] = with_carveout(k, lambda: torch.mm(x, wgu.t(), out=gu_out))
    for k in (0, 16):
        gemms[f"cuBLASLt hot gate+up, carve-out {k}"] = with_carveout(k, lambda: torch.mm(x, wgu.t(), out=gu_out),
                                                                     lt=True)
    main_s = torch.cuda.current_stream()
    streams = {"normal": torch.cuda.Stream(), "high": torch.cuda.Stream(priority=-1)}
    gemm_s = torch.cuda.Stream()
    rows = [{"case": "walk alone", "ms": median_ms(walk)}]
    print(rows[-1], flush=True)
    for name, gemm in gemms.items():
        alone = median_ms(gemm)
        serial = median_ms(lambda: (gemm(), walk()))
        r = {"case": name, "gemm_ms": alone, "serial_ms": serial}
        for prio, ws in streams.items():
            for walk_first in (False, True):
                def both():
                    gemm_s.wait_stream(main_s)
                    ws.wait_stream(main_s)
                    order = [(ws, walk), (gemm_s, gemm)] if walk_first else [(gemm_s, gemm), (ws, walk)]
                    for s, fn in order:
                        with torch.cuda.stream(s):
                            fn()
                    main_s.wait_stream(gemm_s)
                    main_s.wait_stream(ws)
                r[f"two streams, walk {prio} priority, walk {'first' if walk_first else 'second'}"] = median_ms(both)
        rows.append(r)
        print(r, flush=True)
    md = [f"# Walk beside a GEMM on two streams ({env.get('gpu')}, commit {env.get('git_commit')})", "",
          "M=16384, H=5632, nnz 29, hot1536; do_bench medians in ms.", ""]
    md.append(f"Walk alone: {rows[0]['ms']:.3f} ms.\n")
    for r in rows[1:]:
        md.append(f"- **{r['case']}**: " + "; ".join(f"{k} {v:.3f}" for k, v in r.items() if k != "case"))
    write_results(f"probe_infer_overlap_{gpu_slug()}", {"environment": env, "rows": rows}, "\n".join(md))


if __name__ == "__main__":
    main()
