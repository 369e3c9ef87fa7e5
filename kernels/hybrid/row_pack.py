"""Pack a dense gate output g [M, H] (from cuBLAS) into the per-token ELL, one program per token.

Why this exists next to the fused epilogue (gate_pack.py): on H100 our Triton gate GEMM with
the packing epilogue runs 1.30-1.37 ms at M=16384, D=2048, H=5632, against 0.65 ms for cuBLAS
(NOTES.md). cuBLAS writing bf16 g (184 MB, freed right after) plus this pass (one read of g)
is faster until the fused kernel's main loop is fixed. Same output contract as gate_pack.

A program owns its whole row, so slots are assigned by a running scan in column order: the ELL
is sorted and deterministic. fire_counts use one int32 atomic per nonzero.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET


@triton.jit
def _row_pack_kernel(g_ptr, fire_ptr, cnt_ptr, idx_ptr, val_ptr, H, width, BH: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BH)
    n = tl.zeros((), dtype=tl.int32)
    for h0 in range(0, H, BH):
        c = h0 + cols
        v = tl.load(g_ptr + row * H + c, mask=c < H, other=0.0).to(tl.float32)
        on = v > 0
        oi = on.to(tl.int32)
        pos = n + tl.cumsum(oi, axis=0) - 1
        keep = on & (pos < width)
        tl.store(idx_ptr + row * width + pos, c, mask=keep)
        tl.store(val_ptr + row * width + pos, v, mask=keep)
        tl.atomic_add(fire_ptr + c, oi, mask=on)
        n += tl.sum(oi, axis=0)
    tl.store(cnt_ptr + row, n)


def row_pack(g: torch.Tensor, width: int):
    """(fire [H] int32, cnt [M] int32, idx [M, width] int32, val [M, width] fp32) from dense g."""
    M, H = g.shape
    g = g.contiguous()
    dev = g.device
    fire = torch.zeros(H, dtype=torch.int32, device=dev)
    cnt = torch.zeros(M, dtype=torch.int32, device=dev)
    idx = torch.empty(M, width, dtype=torch.int32, device=dev)
    val = torch.empty(M, width, dtype=torch.float32, device=dev)
    if M and H:
        bh = 64 if INTERPRET else 1024
        _row_pack_kernel[(M,)](g, fire, cnt, idx, val, H, width, BH=bh, **({} if INTERPRET else {"num_warps": 4}))
    return fire, cnt, idx, val


def cublas_gate_pack(x: torch.Tensor, w_gate: torch.Tensor, width: int):
    """gate_pack through a cuBLAS GEMM + row_pack (the transient dense g is freed on return)."""
    return row_pack(x @ w_gate.t(), width)
