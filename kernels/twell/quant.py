"""int8 copies of the weight rows the up/down walk gathers (an opt-in, approximate layout).

The walk is bound by L2 bandwidth: each activation gathers one W_u row and one W_d^T row, 2*D
bytes each in bf16 (NOTES.md runs 8-12). Stored as int8 with one fp32 scale per row
(symmetric, scale = max|row| / 127) the same gathers move half the bytes. The kernel dequantizes
after the dot product (u = scale_u * sum(x * q_u)) and folds scale_d into h, so the inner loop
only changes its load width.

This is not exact: each row is rounded to 255 levels. On a Gaussian row (max ~3.5 sigma) the
rounding error is ~0.8% of a typical element, so a gathered activation's u and its down product
each carry ~0.8% relative error; y's error grows with the share of activations the walk serves
(the hot columns and the tokens that overflow_rows recomputes keep the exact weights). The
benchmark reports it against fp32 beside the exact layout's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Int8Rows:
    q: torch.Tensor      # int8 [R, D]
    scale: torch.Tensor  # fp32 [R]: row r is q[r] * scale[r]

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale[:, None]

    def __getitem__(self, rows) -> "Int8Rows":
        return Int8Rows(self.q[rows].contiguous(), self.scale[rows].contiguous())


def quantize_rows_int8(w: torch.Tensor) -> Int8Rows:
    """Symmetric per-row int8: q = round(w / s), s = max|w_row| / 127 (an all-zero row gets s = 1)."""
    if w.dim() != 2:
        raise ValueError(f"quantize_rows_int8 wants a matrix [R, D], got shape {list(w.shape)}")
    wf = w.detach().float()
    amax = wf.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(wf / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8Rows(q.contiguous(), scale.contiguous())
