"""twell_ffn: the inference FFN y = (relu(x W_g^T) * (x W_u^T)) W_d^T over TwELL.

Pipeline:
  1. gate on the sparse columns [n_hot, H) into TwELL: by default a cuBLAS GEMM into a bounded
     row-chunk buffer (64 MiB), packed by pack.py. gate_impl="tma_persist" uses the fused
     Triton GEMM whose epilogue packs, so no dense gate reaches memory; it measured slower
     (NOTES.md run 11);
  2. up/down kernel: per token, gathers only its active neurons' W_u / W_d^T rows -> y;
     tokens with an overflowed tile are listed on the device and recomputed in parallel
     (overflow_rows.py);
  3. if weights.n_hot > 0 (see weights.calibrate): the hot columns [0, n_hot) go through a
     dense gate+up GEMM (h written densely) and a cuBLAS down GEMM accumulated into y.
"""
from __future__ import annotations

import torch

from ..common import interpreting
from ._common import check_matrix
from .gate import gate_twell, gate_up_dense
from .reference import twell_ffn_reference
from .overflow_rows import OverflowList, list_overflowed, overflow_rows
from .updown import updown
from .weights import TwellWeights


def _check(x: torch.Tensor, weights: TwellWeights) -> None:
    if not isinstance(weights, TwellWeights):
        raise TypeError(f"weights must come from kernels.twell.prepare_weights, got {type(weights).__name__}")
    w = weights.w_gate
    check_matrix("x", x, (None, weights.d_model), w.dtype, w.device)


@torch.no_grad()
def twell_ffn(x: torch.Tensor, weights: TwellWeights, *, return_fire_counts: bool = False,
              overlap: bool = False, overflow: str = "kernel", overflow_row_cap: int = 256,
              updown_entries: int | None = None, updown_warps: int | None = None,
              gate_impl: str | None = None):
    """y [M, D] = FFN(x [M, D]) in x's dtype; optionally also fire_counts [H] int32 (tokens with
    g_j > 0, per ORIGINAL neuron index). On CPU without TRITON_INTERPRET it runs the reference.

    overlap (CUDA, n_hot > 0): run the hot gate+up GEMM (tensor-core bound) on a side stream
    while the sparse up/down (L2-bandwidth bound) runs on the current one.

    overflow: how tokens with a (row, tile) over cap are handled; all three are exact.
      "kernel" (default): tokens with 2 or more overflowed tiles are listed on the device before
        the up/down kernel, and overflow_rows recomputes them with tensor-core dots spread over
        all neuron chunks. No host sync. At most overflow_row_cap tokens are listed; any beyond,
        and tokens with one overflowed tile, are walked as in "walk".
      "walk": the up/down program of the token walks each overflowed tile column by column,
        recomputing its gate from W_g. A fully dense row becomes one long serial program (16
        dense rows in 16384 tokens cost +4.4 ms on an H100, NOTES.md run 9). Kept to measure
        "kernel" against.
      "rows": rows with any overflow are found on the host (one device->host sync per call),
        skipped by the up/down kernel, and recomputed with dense cuBLAS GEMMs.

    gate_impl: how the sparse columns' gate is computed and packed (gate.gate_twell's impl):
      "tma_persist" (fused: the GEMM's epilogue packs, no dense gate in memory) or "cublas"
      (cuBLAS writes the gate into a bounded row-chunk buffer, pack.py packs it). Default
      gate.GATE_IMPL (env TWELL_GATE_IMPL)."""
    if overflow not in ("kernel", "walk", "rows"):
        raise ValueError(f"overflow={overflow!r}; expected 'kernel', 'walk' or 'rows'")
    if not (isinstance(overflow_row_cap, int) and overflow_row_cap >= 0):
        raise ValueError(f"overflow_row_cap={overflow_row_cap!r} must be an int >= 0")
    _check(x, weights)
    if not x.is_cuda and not interpreting():
        y = twell_ffn_reference(x, weights)
        if return_fire_counts:
            g = x.float() @ weights.w_gate_orig().float().t()
            return y, (g > 0).sum(0, dtype=torch.int32)
        return y
    m, d = x.shape
    h, n_hot = weights.hidden, weights.n_hot
    fire = torch.zeros(h, dtype=torch.int32, device=x.device) if return_fire_counts else None
    y = torch.empty(m, d, dtype=x.dtype, device=x.device)
    side = None
    if n_hot and overlap and x.is_cuda:
        main, side = torch.cuda.current_stream(), torch.cuda.Stream(device=x.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            h_hot = gate_up_dense(x, weights.w_gate, weights.w_up, n_hot, weights.tile, fire)
    dense_rows = None
    if n_hot < h:
        counts, pairs = gate_twell(x, weights.w_gate, weights.tile, weights.cap, n_hot, fire,
                                   impl=gate_impl)
        if overflow == "rows":
            dense_rows = (counts > weights.cap).any(1).nonzero().squeeze(1)   # host sync
            if dense_rows.numel():
                counts[dense_rows] = 0      # the up/down kernel writes zeros for these rows
            else:
                dense_rows = None
        ovf = OverflowList(overflow_row_cap, d, x.device) if overflow == "kernel" and overflow_row_cap else None
        if ovf is not None:
            list_overflowed(counts, weights.cap, ovf)
        updown(x, weights.w_gate, weights.w_up, weights.w_down_t, counts, pairs, y,
               tile=weights.tile, cap=weights.cap, col0=n_hot, entries=updown_entries, num_warps=updown_warps)
        if ovf is not None:
            overflow_rows(x, weights.w_gate, weights.w_up, weights.w_down_t, ovf, y, col0=n_hot)
    else:
        y.zero_()
    if n_hot:
        if side is None:
            h_hot = gate_up_dense(x, weights.w_gate, weights.w_up, n_hot, weights.tile, fire)
        else:
            main.wait_stream(side)
            h_hot.record_stream(main)   # allocated on the side stream, freed after main's use
        y.addmm_(h_hot, weights.w_down_t[:n_hot])
    if dense_rows is not None:
        xr = x[dense_rows]
        hr = torch.relu(xr @ weights.w_gate.t()) * (xr @ weights.w_up.t())
        y[dense_rows] = hr @ weights.w_down_t
    if return_fire_counts:
        orig = torch.empty_like(fire)
        orig[weights.perm] = fire
        return y, orig
    return y
