"""The two cross-entropy kernels (row statistics, gradient) and their launchers; the math is in
__init__.py. Each program takes ROWS rows and walks the vocabulary in BLOCK_V-wide blocks, so
any V_local (not only powers of two) works with a fixed register footprint."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..common import interpreting
from . import IGNORE_INDEX, KERNEL_DTYPES, _check_grad_inputs, _check_logits_labels

# elements of the logits one program holds per block: ROWS * BLOCK_V
_GPU_BLOCK_ELEMENTS = 4096
_INTERPRETER_BLOCK_V = 512   # small, so that tests with V in the thousands run the vocabulary loop
_INTERPRETER_ROWS = 4


@triton.jit
def _row_stats_kernel(z_ptr, labels_ptr, max_ptr, sum_exp_ptr, target_ptr, n_rows, n_cols, stride_row,
                      vocab_start, ignore_index, ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
    """Online max / sum-exp over the row in fp32: after each block, the running sum is rescaled
    to the new running max. A block of -inf (padding, or -inf logits) keeps the shift finite."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    row_at = rows.to(tl.int64) * stride_row
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([ROWS], float("-inf"), tl.float32)
    s = tl.zeros([ROWS], tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        c = start + cols
        mask = row_ok[:, None] & (c < n_cols)[None, :]
        z = tl.load(z_ptr + row_at[:, None] + c[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift[:, None]), axis=1)
        m = m_new
    label = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
    local = label - vocab_start
    owned = row_ok & (label != ignore_index) & (local >= 0) & (local < n_cols)
    target = tl.load(z_ptr + row_at + tl.where(owned, local, 0), mask=owned, other=0.0).to(tl.float32)
    tl.store(max_ptr + rows, m, mask=row_ok)
    tl.store(sum_exp_ptr + rows, s, mask=row_ok)
    tl.store(target_ptr + rows, target, mask=row_ok)


@triton.jit
def _grad_kernel(z_ptr, out_ptr, labels_ptr, lse_ptr, scale_ptr, shift_ptr, n_rows, n_cols, stride_z, stride_out,
                 stride_scale, vocab_start, ignore_index, ROWS: tl.constexpr, BLOCK_V: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """out = scale * (exp((z - shift) - lse) - onehot), 0 on ignored rows (shift = 0 without
    HAS_SHIFT). Every element is loaded and then stored by the same program, so out may be z."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    z_row = rows.to(tl.int64) * stride_z
    out_row = rows.to(tl.int64) * stride_out
    cols = tl.arange(0, BLOCK_V)
    label = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
    keep = row_ok & (label != ignore_index)
    local = label - vocab_start      # outside [0, n_cols) when another shard owns the label
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    scale = tl.where(keep, tl.load(scale_ptr + rows * stride_scale, mask=row_ok, other=0.0), 0.0)
    if HAS_SHIFT:
        shift = tl.load(shift_ptr + rows, mask=row_ok, other=0.0)
    for start in range(0, n_cols, BLOCK_V):
        c = start + cols
        mask = row_ok[:, None] & (c < n_cols)[None, :]
        z = tl.load(z_ptr + z_row[:, None] + c[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        if HAS_SHIFT:
            z = z - shift[:, None]
        p = tl.exp(z - lse[:, None]) - tl.where(c[None, :] == local[:, None], 1.0, 0.0)
        g = tl.where(keep[:, None], p * scale[:, None], 0.0)
        tl.store(out_ptr + out_row[:, None] + c[None, :], g.to(out_ptr.dtype.element_ty), mask=mask)


def launch_config(n_cols: int) -> Tuple[int, int, int]:
    """(rows per program, BLOCK_V, num_warps) on a GPU: ~4096 logits per block; short rows are
    packed several to a program. Both are powers of two (tl.arange lengths)."""
    block_v = min(triton.next_power_of_2(n_cols), _GPU_BLOCK_ELEMENTS)
    rows = max(1, min(16, _GPU_BLOCK_ELEMENTS // block_v))
    num_warps = 8 if rows * block_v >= 4096 else 4
    return rows, block_v, num_warps


def _config(n_cols: int, rows: Optional[int], block_v: Optional[int]) -> Tuple[int, int, int]:
    if interpreting():
        g_rows, g_block, warps = _INTERPRETER_ROWS, min(triton.next_power_of_2(n_cols), _INTERPRETER_BLOCK_V), 4
    else:
        g_rows, g_block, warps = launch_config(n_cols)
    rows, block_v = rows or g_rows, block_v or g_block
    for name, v in (("rows", rows), ("block_v", block_v)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"cross_entropy: {name}={v} must be a power of two")
    return rows, block_v, warps


def row_stats_triton(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int = 0,
                     ignore_index: int = IGNORE_INDEX, rows: Optional[int] = None,
                     block_v: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the row-statistics kernel (no autograd): (row_max, sum_exp, target) [N] fp32.
    rows / block_v: rows per program and vocabulary block (powers of two; default launch_config,
    or 4 rows of <= 512 under the interpreter)."""
    labels = _check_logits_labels(logits, labels, vocab_start, "row_stats", KERNEL_DTYPES)
    n, v = logits.shape
    stats = torch.empty(3, n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return stats[0], stats[1], stats[2]
    rows, block_v, warps = _config(v, rows, block_v)
    _row_stats_kernel[(triton.cdiv(n, rows),)](logits, labels, stats[0], stats[1], stats[2], n, v, logits.stride(0),
                                               vocab_start, ignore_index, ROWS=rows, BLOCK_V=block_v,
                                               num_warps=warps)
    return stats[0], stats[1], stats[2]


def grad_triton(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor,
                vocab_start: int = 0, ignore_index: int = IGNORE_INDEX, out: Optional[torch.Tensor] = None,
                shift: Optional[torch.Tensor] = None, rows: Optional[int] = None,
                block_v: Optional[int] = None) -> torch.Tensor:
    """Launch the gradient kernel (no autograd) into `out` (default a new tensor; may be `logits`
    itself, whose values are then overwritten). shift: see grad_logits."""
    labels = _check_grad_inputs(logits, labels, lse, scale, vocab_start, out, shift, "grad", KERNEL_DTYPES)
    lse = lse.to(torch.float32).contiguous()
    # read with its stride: a mean's gradient reaches here as one value broadcast (stride 0), and a
    # contiguous copy would cost a launch per backward
    scale = scale.to(torch.float32)
    has_shift = shift is not None
    shift = shift.to(torch.float32).contiguous() if has_shift else lse   # a dummy pointer without it
    n, v = logits.shape
    if out is None:
        out = torch.empty(n, v, dtype=logits.dtype, device=logits.device)
    if n == 0:
        return out
    rows, block_v, warps = _config(v, rows, block_v)
    _grad_kernel[(triton.cdiv(n, rows),)](logits, out, labels, lse, scale, shift, n, v, logits.stride(0),
                                          out.stride(0), scale.stride(0), vocab_start, ignore_index, ROWS=rows,
                                          BLOCK_V=block_v, HAS_SHIFT=has_shift, num_warps=warps)
    return out
