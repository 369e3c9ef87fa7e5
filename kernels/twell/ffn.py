"""twell_ffn: the inference FFN y = (relu(x W_g^T) * (x W_u^T)) W_d^T over TwELL.

Pipeline:
  1. gate on the sparse columns [n_hot, H) into TwELL: by default a cuBLAS GEMM into a bounded
     row-chunk buffer (256 MiB), packed by pack.py. gate_impl="tma_persist" uses the fused
     Triton GEMM whose epilogue packs, so no dense gate reaches memory; it measured slower
     (NOTES.md run 11);
  2. up/down kernel ("the walk"), chunk by chunk as the gate packs them: per token, gathers only
     its active neurons' W_u / W_d^T rows -> y; tokens with an overflowed tile are listed on the
     device and recomputed in parallel (overflow_rows.py);
  3. if weights.n_hot > 0 (see weights.calibrate): the hot columns [0, n_hot) go through a
     dense gate+up GEMM (h written densely) and a cuBLAS down GEMM accumulated into y.
With overlap (CUDA), each chunk's walk runs on a side stream while the next chunk's gate GEMM
(or, after the last chunk, the hot gate+up GEMM) runs on the current one. It measured within 1%
of the serial order on an H100 (NOTES.md run 12: cuBLAS fills every SM, and the GEMMs sit at the
power limit), so it is off by default.
"""
from __future__ import annotations

from contextlib import nullcontext
import os

import torch

from ..common import interpreting
from ._common import check_matrix
from .gate import gate_twell, gate_up_dense
from .reference import twell_ffn_reference
from .overflow_rows import OverflowList, list_overflowed, overflow_rows
from .updown import updown
from .weights import TwellWeights

# walk each gate chunk on a side stream beside the next GEMM (twell_ffn's overlap; NOTES.md run 12)
OVERLAP = os.environ.get("TWELL_OVERLAP", "0") != "0"


def _check(x: torch.Tensor, weights: TwellWeights) -> None:
    if not isinstance(weights, TwellWeights):
        raise TypeError(f"weights must come from kernels.twell.prepare_weights, got {type(weights).__name__}")
    w = weights.w_gate
    check_matrix("x", x, (None, weights.d_model), w.dtype, w.device)


@torch.no_grad()
def twell_ffn(x: torch.Tensor, weights: TwellWeights, *, return_fire_counts: bool = False,
              overlap: bool | None = None, overflow: str = "kernel", overflow_row_cap: int = 256,
              updown_entries: int | None = None, updown_warps: int | None = None,
              gate_impl: str | None = None, gate_chunk_rows: int | None = None):
    """y [M, D] = FFN(x [M, D]) in x's dtype; optionally also fire_counts [H] int32 (tokens with
    g_j > 0, per ORIGINAL neuron index). On CPU without TRITON_INTERPRET it runs the reference.

    overlap (CUDA; default OVERLAP, env TWELL_OVERLAP): run the walk of each gate chunk on a side
    stream while the current stream computes the next chunk's gate GEMM, then the hot gate+up GEMM.
    Without it (and on CPU) the same chunks run in order on one stream.

    overflow: how tokens with a (row, tile) over cap are handled; all three are exact.
      "kernel" (default): tokens with 2 or more overflowed tiles are listed on the device before
        the up/down kernel, and overflow_rows recomputes them with tensor-core dots spread over
        all neuron chunks. No host sync. At most overflow_row_cap tokens are listed; any beyond,
        and tokens with one overflowed tile, are walked as in "walk".
      "walk": the up/down program of the token walks each overflowed tile column by column,
        recomputing its gate from W_g. A fully dense row becomes one long serial program (16
        dense rows in 16384 tokens cost +4.4 ms on an H100, NOTES.md run 9). Kept to measure
        "kernel" against.
      "rows": rows with any overflow are found on the host (one device->host sync per call, so
        no chunked walk), skipped by the up/down kernel, and recomputed with dense cuBLAS GEMMs.

    gate_impl: how the sparse columns' gate is computed and packed (gate.gate_twell's impl):
      "tma_persist" (fused: the GEMM's epilogue packs, no dense gate in memory) or "cublas"
      (cuBLAS writes the gate into a bounded row-chunk buffer, pack.py packs it). Default
      gate.GATE_IMPL (env TWELL_GATE_IMPL). gate_chunk_rows: rows per cuBLAS gate chunk (default
      gate.CHUNK_MIB of buffer); the fused impls are one chunk."""
    if overflow not in ("kernel", "walk", "rows"):
        raise ValueError(f"overflow={overflow!r}; expected 'kernel', 'walk' or 'rows'")
    if not (isinstance(overflow_row_cap, int) and overflow_row_cap >= 0):
        raise ValueError(f"overflow_row_cap={overflow_row_cap!r} must be an int >= 0")
    if gate_chunk_rows is not None and not (isinstance(gate_chunk_rows, int) and gate_chunk_rows >= 1):
        raise ValueError(f"gate_chunk_rows={gate_chunk_rows!r} must be an int >= 1 (rows of x per gate chunk)")
    _check(x, weights)
    if not x.is_cuda and not interpreting():
        y = twell_ffn_reference(x, weights)
        if return_fire_counts:
            g = x.float() @ weights.w_gate_orig().float().t()
            return y, (g > 0).sum(0, dtype=torch.int32)
        return y
    m, d = x.shape
    h, n_hot, cap = weights.hidden, weights.n_hot, weights.cap
    fire = torch.zeros(h, dtype=torch.int32, device=x.device) if return_fire_counts else None
    y = torch.empty(m, d, dtype=x.dtype, device=x.device)
    overlap = OVERLAP if overlap is None else overlap
    main = torch.cuda.current_stream(x.device) if x.is_cuda else None
    side = _side_stream(x.device) if overlap and x.is_cuda and n_hot < h and overflow != "rows" else None
    ovf = OverflowList(overflow_row_cap, d, x.device) if overflow == "kernel" and overflow_row_cap else None
    w = weights

    def walk(counts, pairs, s, e):   # the cold up/down of rows [s, e), once the gate has packed them
        with _after(main, side):
            if ovf is not None:
                list_overflowed(counts[s:e], cap, ovf, row0=s)
            updown(x[s:e], w.w_gate, w.w_up, w.w_down_t, counts[s:e], pairs[s:e], y[s:e], tile=w.tile, cap=cap,
                   col0=n_hot, entries=updown_entries, num_warps=updown_warps)

    dense_rows = None
    if n_hot < h:
        counts, pairs = gate_twell(x, w.w_gate, w.tile, cap, n_hot, fire, impl=gate_impl, chunk_rows=gate_chunk_rows,
                                   on_chunk=None if overflow == "rows" else walk)
        if overflow == "rows":
            dense_rows = (counts > cap).any(1).nonzero().squeeze(1)   # host sync
            if dense_rows.numel():
                counts[dense_rows] = 0      # the up/down kernel writes zeros for these rows
            else:
                dense_rows = None
            walk(counts, pairs, 0, m)
    else:
        y.zero_()
    if n_hot:
        h_hot = gate_up_dense(x, w.w_gate, w.w_up, n_hot, w.tile, fire)   # beside the last chunk's walk
    if side is not None:
        main.wait_stream(side)   # also orders every later free of what the walk read after it
    if n_hot:
        y.addmm_(h_hot, w.w_down_t[:n_hot])
    if ovf is not None and n_hot < h:
        overflow_rows(x, w.w_gate, w.w_up, w.w_down_t, ovf, y, col0=n_hot)
    if dense_rows is not None:
        xr = x[dense_rows]
        hr = torch.relu(xr @ w.w_gate.t()) * (xr @ w.w_up.t())
        y[dense_rows] = hr @ w.w_down_t
    if return_fire_counts:
        orig = torch.empty_like(fire)
        orig[w.perm] = fire
        return y, orig
    return y


_SIDE: dict = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device, made once (twell_ffn's overlap). Work on it always waits for
    the current stream first, and the current stream waits for it before twell_ffn returns."""
    if device not in _SIDE:
        _SIDE[device] = torch.cuda.Stream(device=device)
    return _SIDE[device]


def _after(main, side):
    """Context for work that must follow everything queued so far on main: on side (which first
    waits for main) when there is one, else on main itself."""
    if side is None:
        return nullcontext()
    side.wait_stream(main)
    return torch.cuda.stream(side)
