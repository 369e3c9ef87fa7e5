"""Small helpers shared by the hybrid kernels: interpreter detection and argument checks.

Errors name the bad value, what was expected, and the fix (DESIGN.md convention).
"""
from __future__ import annotations

import torch

from ..common import interpreting

# Read once at import: TRITON_INTERPRET must be set before triton is imported anyway.
INTERPRET = interpreting()

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# The pipelined walks (ell_sddmm, ell_spmm, csc_wgrad) keep one whole D row per program in
# registers; wider rows take the chunked kernels.
MAX_WALK_D = 8192


def check_matrix(name: str, t: torch.Tensor, rows: int | None = None, cols: int | None = None) -> torch.Tensor:
    """Validate a 2-D operand and return a contiguous version of it.

    Weights may arrive as views (ZeRO-3 gathered params, TP slices); .contiguous() is a no-op for
    already-contiguous tensors and a copy otherwise, so strides never reach the kernels.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}; reshape tokens to [M, D] first")
    if rows is not None and t.shape[0] != rows:
        raise ValueError(f"{name} has {t.shape[0]} rows, expected {rows} (shape {tuple(t.shape)})")
    if cols is not None and t.shape[1] != cols:
        raise ValueError(f"{name} has {t.shape[1]} columns, expected {cols} (shape {tuple(t.shape)})")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of {SUPPORTED_DTYPES}")
    if not (t.is_cuda or INTERPRET):
        raise RuntimeError(f"{name} is on {t.device}: the Triton kernels need CUDA tensors "
                           "(or TRITON_INTERPRET=1 for CPU tests); use sparse_gated_mlp_reference on CPU")
    return t.contiguous()


def ceil_div(a: int, b: int) -> int:
    return (a + b - 1) // b
