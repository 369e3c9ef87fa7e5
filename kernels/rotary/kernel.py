"""The rotary kernel, its launcher and its autograd.Function (the op is described in __init__.py)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import interpreting


@triton.jit
def _rotary_kernel(x_ptr, out_ptr, cos_ptr, sin_ptr, n_rows, seq, heads,
                   HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, ROWS: tl.constexpr, INVERSE: tl.constexpr):
    """ROWS (token, head) rows per program; row r is token (r // heads) % seq of its sequence."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_HALF)
    mask = (rows < n_rows)[:, None] & (cols < HALF)[None, :]
    pos = (rows // heads) % seq
    x_at = rows.to(tl.int64)[:, None] * (2 * HALF) + cols[None, :]
    table_at = pos[:, None] * HALF + cols[None, :]
    x1 = tl.load(x_ptr + x_at, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_at + HALF, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + table_at, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + table_at, mask=mask, other=0.0).to(tl.float32)
    if INVERSE:   # the backward: rotate by -angle
        s = -s
    tl.store(out_ptr + x_at, (x1 * c - x2 * s).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + x_at + HALF, (x1 * s + x2 * c).to(out_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"rotary input has shape {list(x.shape)}; expected [batch, seq, heads, head_dim] "
                         f"with an even head_dim")
    half = x.shape[-1] // 2
    for name, table in (("cos", cos), ("sin", sin)):
        if table.dim() != 2 or table.shape[1] != half or table.shape[0] < x.shape[1]:
            raise ValueError(f"rotary {name} table has shape {list(table.shape)}; expected [>= seq={x.shape[1]}, "
                             f"head_dim/2={half}] (model.rotary_tables)")
        # A model cast with .to(bf16) casts its tables too (buffers): any float dtype is read as is
        # and upcast, which is what the torch form's type promotion did.
        if not table.is_floating_point() or table.device != x.device:
            raise ValueError(f"rotary {name} table is {table.dtype} on {table.device}; expected a float table "
                             f"on {x.device}")


def rows_per_program(head_dim: int) -> int:
    """(token, head) rows per program on a GPU: ~4096 elements of x, and a power of two (it is a
    tl.arange length), so head_dim 96 gets 32 rows, not 42."""
    rows = max(1, min(64, 4096 // head_dim))
    return 1 << (rows.bit_length() - 1)


def rotary_apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False,
                 rows: int | None = None) -> torch.Tensor:
    """Launch the kernel (no autograd): the rotation of x, or its inverse. rows: rows per program
    (a power of two; default rows_per_program, or 4 under the interpreter)."""
    _check(x, cos, sin)
    x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty_like(x)
    batch, seq, heads, d = x.shape
    n_rows = batch * seq * heads
    if n_rows == 0:
        return out
    rows = rows or (4 if interpreting() else rows_per_program(d))
    _rotary_kernel[(triton.cdiv(n_rows, rows),)](x, out, cos, sin, n_rows, seq, heads, HALF=d // 2,
                                                 BLOCK_HALF=triton.next_power_of_2(d // 2), ROWS=rows,
                                                 INVERSE=inverse, num_warps=4)
    return out


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotary_apply(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return rotary_apply(grad, cos, sin, inverse=True), None, None
