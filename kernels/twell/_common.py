"""Shared by the TwELL kernels: input checks (non-contiguous inputs get a clear error) and the
autotuners' M bucket."""
from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_matrix(name: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
    """Raise a ValueError naming the bad value, what was expected, and the fix."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != len(shape) or any(e is not None and s != e for s, e in zip(t.shape, shape)):
        want = "[" + ", ".join("*" if e is None else str(e) for e in shape) + "]"
        raise ValueError(f"{name} has shape {list(t.shape)}, expected {want}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; supported: bf16, fp16, fp32")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but the weights are {dtype}; cast one to match")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the weights are on {device}; move it")
    if not t.is_contiguous():
        raise ValueError(f"{name} (shape {list(t.shape)}, strides {t.stride()}) is not contiguous; "
                         f"call .contiguous() first")


def m_bucket(m: int) -> int:
    """Autotune once per power-of-two range of M, not per exact M."""
    return 1 << max(m - 1, 1).bit_length()
