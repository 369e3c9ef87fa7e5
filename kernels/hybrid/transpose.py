"""W_d^T as a contiguous [H, D] copy of W_d [D, H], once per layer forward.

The gathers (SpMM y, SDDMM dh) and dW_d^T want a neuron's D values contiguous. torch's
`w.t().contiguous()` ran 0.085 ms for the 23 MB W_d at D=2048, H=5632 on an H100 (~0.5 TB/s,
kernels/hybrid/NOTES.md); a tiled transpose (load a [BR, BC] tile along W_d's rows, store it
along W_d^T's rows) moves the 46 MB near memory bandwidth.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET


@triton.jit
def _transpose_kernel(src_ptr, dst_ptr, R, C, BR: tl.constexpr, BC: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    r_ok = r < R
    c_ok = c < C
    tile = tl.load(src_ptr + r.to(tl.int64)[:, None] * C + c[None, :], mask=r_ok[:, None] & c_ok[None, :])
    tl.store(dst_ptr + c.to(tl.int64)[:, None] * R + r[None, :], tl.trans(tile), mask=c_ok[:, None] & r_ok[None, :])


CONFIG = dict(BR=64, BC=64, num_warps=4)


def transpose(w: torch.Tensor) -> torch.Tensor:
    """Contiguous w.t() for a 2-D tensor."""
    w = w.contiguous()
    R, C = w.shape
    out = torch.empty(C, R, dtype=w.dtype, device=w.device)
    if R and C:
        cfg = dict(BR=16, BC=16) if INTERPRET else dict(CONFIG)
        grid = (triton.cdiv(R, cfg["BR"]), triton.cdiv(C, cfg["BC"]))
        _transpose_kernel[grid](w, out, R, C, **cfg)
    return out
