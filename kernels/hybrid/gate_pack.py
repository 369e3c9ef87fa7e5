"""Dense gate GEMM g = x W_g^T whose epilogue packs relu(g) into a per-token ELL, no dense g stored.

Why in the epilogue: the gate GEMM is the only dense product of the layer; writing g [M, H] and
re-reading it to pack would cost 2 x M x H x 2 bytes of traffic and the same in peak memory.
Here each [BM, BN] tile keeps its accumulator in registers and emits only:
  * fire[j]   += number of rows of the tile with g_ij > 0      (int32 atomics, fire_counts),
  * cnt[i]    += 1 for each positive entry of row i (int32 atomic; the returned old value is the
    entry's slot, so no inter-program ordering is needed),
  * for each positive entry, (column j, value g_ij) at that slot if it is < width.
Rows whose final cnt exceeds `width` are incomplete in the ELL; the caller routes them to the
dense backup (they are never truncated: their true count is known and they are recomputed).
Slot order inside a row depends on atomic arrival order: sums over a row are therefore
deterministic only up to fp32 reassociation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import grouped_tile_ids
from ._common import INTERPRET, ceil_div, check_matrix


@triton.jit
def _gate_pack_kernel(x_ptr, w_ptr, fire_ptr, cnt_ptr, idx_ptr, val_ptr,
                      M, H, D, width,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                      GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
                      PREC: tl.constexpr, SCAN: tl.constexpr):
    # Grouped launch order: GROUP_M row-tiles share each W_g column tile while it is in L2.
    pid_m, pid_n = grouped_tile_ids(M, tl.cdiv(H, BN), BM, GROUP_M)

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    n_ok = rn < H
    # Clamp out-of-range rows/columns to a valid one instead of masking every load: the
    # extra rows are computed and then dropped by the epilogue masks.
    a_ptrs = x_ptr + tl.where(m_ok, rm, 0)[:, None].to(tl.int64) * D + rk[None, :]
    b_ptrs = w_ptr + tl.where(n_ok, rn, 0)[None, :].to(tl.int64) * D + rk[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(k0 + rk)[None, :] < D, other=0.0)
            b = tl.load(b_ptrs, mask=(k0 + rk)[:, None] < D, other=0.0)
        a_ptrs += BK
        b_ptrs += BK
        if UPCAST:  # the interpreter's bf16 dot is wrong; fp32 operands are exact there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PREC)

    fire = (acc > 0) & m_ok[:, None] & n_ok[None, :]
    tl.atomic_add(fire_ptr + rn, tl.sum(fire.to(tl.int32), axis=0), mask=n_ok)
    if SCAN:
        # Reserve a run of slots per (row, tile) with one atomic per row, rank by a row scan.
        fi = fire.to(tl.int32)
        base = tl.atomic_add(cnt_ptr + rm, tl.sum(fi, axis=1), mask=m_ok)
        pos = base[:, None] + tl.cumsum(fi, axis=1) - 1
    else:
        # ~0.7 nonzeros per (row, 128-column tile): one masked atomic per nonzero is cheaper
        # than a [BM, BN] scan (1.32 ms vs 0.64 ms cuBLAS for the scan version, NOTES.md).
        pos = tl.atomic_add(cnt_ptr + rm[:, None] + tl.zeros((BM, BN), dtype=tl.int64),
                            tl.full((BM, BN), 1, tl.int32), mask=fire)
    keep = fire & (pos < width)
    off = rm[:, None].to(tl.int64) * width + pos
    tl.store(idx_ptr + off, (rn[None, :] + tl.zeros((BM, BN), dtype=tl.int32)), mask=keep)
    tl.store(val_ptr + off, acc, mask=keep)


# Launch configuration; the benchmark overrides it to sweep (one config under the interpreter).
CONFIG = dict(BM=128, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=4, SCAN=False)


def gate_pack(x: torch.Tensor, w_gate: torch.Tensor, width: int):
    """Launch the gate GEMM + ELL pack.

    Returns (fire [H] int32, cnt [M] int32 = true nonzeros per row, idx [M, width] int32,
    val [M, width] fp32). Slots >= min(cnt, width) are unspecified.
    """
    M, D = x.shape
    x = check_matrix("x", x)
    w_gate = check_matrix("w_gate", w_gate, cols=D)
    H = w_gate.shape[0]
    if width < 1:
        raise ValueError(f"ELL width={width} must be >= 1")
    dev = x.device
    fire = torch.zeros(H, dtype=torch.int32, device=dev)
    cnt = torch.zeros(M, dtype=torch.int32, device=dev)
    idx = torch.empty(M, width, dtype=torch.int32, device=dev)
    val = torch.empty(M, width, dtype=torch.float32, device=dev)
    cfg = dict(BM=32, BN=64, BK=32, GROUP_M=4, SCAN=False) if INTERPRET else dict(CONFIG)
    grid = (ceil_div(M, cfg["BM"]) * ceil_div(H, cfg["BN"]),)
    if M > 0 and H > 0:
        _gate_pack_kernel[grid](x, w_gate, fire, cnt, idx, val, M, H, D, width,
                                EVEN_K=D % cfg["BK"] == 0, UPCAST=INTERPRET,
                                PREC="ieee" if x.dtype == torch.float32 else "tf32", **cfg)
    return fire, cnt, idx, val


def reference(x: torch.Tensor, w_gate: torch.Tensor, width: int):
    """Pure-torch gate_pack, slots in column order (the kernel's slot order may differ)."""
    g = x.float() @ w_gate.float().t()
    fire_mask = g > 0
    fire = fire_mask.sum(0).to(torch.int32)
    cnt = fire_mask.sum(1).to(torch.int32)
    M, H = g.shape
    idx = torch.zeros(M, width, dtype=torch.int32, device=x.device)
    val = torch.zeros(M, width, dtype=torch.float32, device=x.device)
    pos = torch.cumsum(fire_mask.int(), 1) - 1
    keep = fire_mask & (pos < width)
    rows, cols = keep.nonzero(as_tuple=True)
    idx[rows, pos[rows, cols]] = cols.int()
    val[rows, pos[rows, cols]] = g[rows, cols]
    return fire, cnt, idx, val
