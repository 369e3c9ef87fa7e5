"""union_ffn: the inference FFN as tensor-core GEMMs over the union of a row block's active neurons.

A block of B tokens (B = 64 by default) touches far fewer neurons than H: on BENCHMARKS.md's
generator (nnz 29 of 5632), about 1215 at B=64, against the 1536 columns that the hot/cold layout
computes densely for every token plus the gathers of the rest (NOTES.md run 15). So instead of a
per-token walk, each block computes up and down as dense products restricted to its union:

  1. g = x W_g^T for all H neurons, by cuBLAS, into a bounded row-chunk buffer (as gate.py's
     cuBLAS path does);
  2. _union_kernel, one program per block: the union U_b = {j : some row of the block has
     g_j > 0} in ascending neuron order (idx[b, :n_b], n_b = |U_b|), and relu(g) of the block
     compacted in place to the buffer's first n_b columns (compaction only moves values left, so
     the buffer is reused);
  3. _union_up_kernel, per (block, chunk of U_b): u = x_b W_u[U_b]^T with the W_u rows gathered,
     h = relu(g) * u written over the compacted gate (each program reads its own elements before
     it writes them);
  4. _union_down_kernel, per (block, chunk of D): y_b = h_b W_d^T[U_b] with the W_d^T rows
     (weights.w_down_t, a neuron's column as a contiguous row) gathered.
Nothing has a capacity: a fully dense row only makes its block's union all of H, so there is no
overflow path. Exact up to bf16 rounding, like the dense FFN: the products are the same, only the
neurons with g <= 0 for every row of the block are skipped, and their h is 0.

Measured SLOWER than twell_ffn's hot/cold layout on an H100 (NOTES.md run 15: 1.24x at B=32,
1.16x at B=64, against 1.67x for hot1536 at M=16384), and for a reason no tuning removes: the
gathered weight rows are re-read once per block, so the up and down GEMMs are bound by L2
bandwidth, not by the tensor cores. Not wired into the model; kept, with its tests, so that
tools/probe_union_ffn.py can measure it again (on other GPUs, or activations whose neighbouring
tokens share neurons more than the generator's independent tokens do).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..common import interpreting
from ._common import m_bucket
from .epilogue import _dot
from .ffn import _check
from .gate import default_chunk_rows
from .reference import twell_ffn_reference
from .weights import TwellWeights

_INTERPRET = interpreting()
BLOCK_ROWS = int(os.environ.get("TWELL_UNION_ROWS", "64"))   # B: rows that share one union


def _gemm_configs(bn_list):
    if _INTERPRET:
        return [triton.Config({"BN": 32, "BK": 32}, num_warps=4, num_stages=1)]
    if os.environ.get("TWELL_NO_AUTOTUNE", "0") != "0":
        return [triton.Config({"BN": 128, "BK": 64}, num_warps=4, num_stages=3)]
    return [triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=s)
            for bn in bn_list for bk, w, s in [(64, 4, 3), (64, 4, 4), (64, 8, 3), (128, 8, 3)]]


@triton.jit
def _union_kernel(g_ptr, idx_ptr, cnt_ptr, M, H, BM: tl.constexpr, BC: tl.constexpr):
    # one program per block of BM rows; g is [M, H] row-major (the chunk buffer)
    b = tl.program_id(0)
    rows = (b * BM + tl.arange(0, BM)).to(tl.int64)
    r_ok = rows < M
    n = 0
    for c0 in range(0, H, BC):
        cols = c0 + tl.arange(0, BC)
        c_ok = cols < H
        g = tl.load(g_ptr + rows[:, None] * H + cols[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.0)
        g = tl.maximum(g, 0.0)
        fire = (tl.max(g, axis=0) > 0) & c_ok          # [BC]: some row of the block fires
        f = fire.to(tl.int32)
        pos = n + tl.cumsum(f, 0) - f                   # exclusive prefix: compacted column
        tl.store(idx_ptr + b.to(tl.int64) * H + pos, cols, mask=fire)
        tl.debug_barrier()   # every load of this column block is done before the in-place stores
        tl.store(g_ptr + rows[:, None] * H + pos[None, :], g, mask=r_ok[:, None] & fire[None, :])
        n += tl.sum(f, 0)
    tl.store(cnt_ptr + b, n)


# restore_value: the kernel overwrites its input (the compacted gate becomes h), so each of the
# autotuner's trial runs must start from the same gate
@triton.autotune(configs=_gemm_configs((64, 128)), key=["M_BUCKET", "D", "H", "BM"], restore_value=["hc_ptr"])
@triton.jit
def _union_up_kernel(x_ptr, wu_ptr, hc_ptr, idx_ptr, cnt_ptr, M, D, H, M_BUCKET,
                     IEEE: tl.constexpr, INTERPRET: tl.constexpr, BM: tl.constexpr,
                     BN: tl.constexpr, BK: tl.constexpr):
    # axis 0 = chunk of the union, axis 1 = block: a block's chunks run together, so x_b stays in L2
    c = tl.program_id(0)
    b = tl.program_id(1)
    n_b = tl.load(cnt_ptr + b)
    if c * BN >= n_b:
        return
    rows = (b * BM + tl.arange(0, BM)).to(tl.int64)
    r_ok = rows < M
    j = c * BN + tl.arange(0, BN)
    j_ok = j < n_b
    nid = tl.load(idx_ptr + b.to(tl.int64) * H + j, mask=j_ok, other=0).to(tl.int64)
    offs_k = tl.arange(0, BK)
    a_ptrs = x_ptr + rows[:, None] * D + offs_k[None, :]
    b_ptrs = wu_ptr + nid[None, :] * D + offs_k[:, None]        # [BK, BN]: gathered W_u rows
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, D, BK):
        k_ok = (k + offs_k) < D
        a = tl.load(a_ptrs, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        acc = _dot(a, w, acc, IEEE, INTERPRET)
        a_ptrs += BK
        b_ptrs += BK
    h_ptrs = hc_ptr + rows[:, None] * H + j[None, :]
    ok = r_ok[:, None] & j_ok[None, :]
    g = tl.load(h_ptrs, mask=ok, other=0.0).to(tl.float32)
    tl.store(h_ptrs, (g * acc).to(hc_ptr.dtype.element_ty), mask=ok)


@triton.autotune(configs=_gemm_configs((128, 256)), key=["M_BUCKET", "D", "H", "BM"])
@triton.jit
def _union_down_kernel(hc_ptr, wdt_ptr, y_ptr, idx_ptr, cnt_ptr, M, D, H, M_BUCKET,
                       IEEE: tl.constexpr, INTERPRET: tl.constexpr, BM: tl.constexpr,
                       BN: tl.constexpr, BK: tl.constexpr):
    nc = tl.program_id(0)
    b = tl.program_id(1)
    n_b = tl.load(cnt_ptr + b)
    rows = (b * BM + tl.arange(0, BM)).to(tl.int64)
    r_ok = rows < M
    cols = nc * BN + tl.arange(0, BN)
    c_ok = cols < D
    offs_k = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, n_b, BK):
        kk = k + offs_k
        k_ok = kk < n_b
        nid = tl.load(idx_ptr + b.to(tl.int64) * H + kk, mask=k_ok, other=0).to(tl.int64)
        a = tl.load(hc_ptr + rows[:, None] * H + kk[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(wdt_ptr + nid[:, None] * D + cols[None, :], mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        acc = _dot(a, w, acc, IEEE, INTERPRET)
    tl.store(y_ptr + rows[:, None] * D + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=r_ok[:, None] & c_ok[None, :])


def union_blocks(g: torch.Tensor, block_rows: int = BLOCK_ROWS):
    """Step 2 on a gate chunk g [rows, H] (pre-ReLU, contiguous; overwritten): returns
    (idx [blocks, H] int32, counts [blocks] int32); g[r, :counts[r // B]] then holds relu(g) of
    row r at its block's union columns idx[r // B, :counts[r // B]]."""
    m, h = g.shape
    nb = triton.cdiv(m, block_rows)
    idx = torch.empty(nb, h, dtype=torch.int32, device=g.device)
    cnt = torch.empty(nb, dtype=torch.int32, device=g.device)
    if nb:
        # a [BM, BC] tile of 16K elements: BC = 256 at BM = 64
        _union_kernel[(nb,)](g, idx, cnt, m, h, BM=block_rows, BC=32 if _INTERPRET else 16384 // block_rows,
                             num_warps=4)
    return idx, cnt


def union_up(x: torch.Tensor, w_up: torch.Tensor, g: torch.Tensor, idx: torch.Tensor, cnt: torch.Tensor,
             block_rows: int = BLOCK_ROWS) -> None:
    """Step 3 on one chunk: the compacted gate g becomes h = relu(g) * x W_u^T, in place."""
    m, d = x.shape
    h = w_up.shape[0]
    if m:
        _union_up_kernel[lambda meta: (triton.cdiv(h, meta["BN"]), cnt.shape[0])](
            x, w_up, g, idx, cnt, m, d, h, m_bucket(m), IEEE=x.dtype == torch.float32, INTERPRET=_INTERPRET,
            BM=block_rows)


def union_down(h_c: torch.Tensor, w_down_t: torch.Tensor, idx: torch.Tensor, cnt: torch.Tensor, y: torch.Tensor,
               block_rows: int = BLOCK_ROWS) -> None:
    """Step 4 on one chunk: y [rows, D] = h W_d^T over each block's union (h_c from union_up)."""
    m, d = y.shape
    h = w_down_t.shape[0]
    if m:
        _union_down_kernel[lambda meta: (triton.cdiv(d, meta["BN"]), cnt.shape[0])](
            h_c, w_down_t, y, idx, cnt, m, d, h, m_bucket(m), IEEE=y.dtype == torch.float32, INTERPRET=_INTERPRET,
            BM=block_rows)


def _check_block_rows(block_rows: int) -> None:
    if not (isinstance(block_rows, int) and 16 <= block_rows <= 256 and block_rows & (block_rows - 1) == 0):
        raise ValueError(f"block_rows={block_rows!r} must be a power of two in [16, 256] "
                         f"(rows of x that share one union of active neurons)")


@torch.no_grad()
def union_ffn(x: torch.Tensor, weights: TwellWeights, *, block_rows: int = BLOCK_ROWS,
              chunk_rows: int | None = None, return_union_sizes: bool = False):
    """y [M, D] = FFN(x [M, D]) over each block's union of active neurons (the module docstring).

    Any internal neuron order and n_hot are accepted: the union path treats every neuron alike.
    chunk_rows: rows of x per gate buffer chunk (default: gate.CHUNK_MIB of buffer), rounded down
    to whole blocks. return_union_sizes adds the per-block union sizes [ceil(M / B)] int32."""
    _check(x, weights)
    _check_block_rows(block_rows)
    if chunk_rows is not None and not (isinstance(chunk_rows, int) and not isinstance(chunk_rows, bool)
                                       and chunk_rows >= 1):
        raise ValueError(f"chunk_rows={chunk_rows!r} must be an int >= 1 (rows of x per gate chunk)")
    m, d = x.shape
    h = weights.hidden
    if not x.is_cuda and not interpreting():
        y = twell_ffn_reference(x, weights)
        if return_union_sizes:
            return y, union_sizes_reference(x, weights, block_rows)
        return y
    y = torch.empty(m, d, dtype=x.dtype, device=x.device)
    rows = chunk_rows or default_chunk_rows(h, x.element_size())
    # whole blocks, at least one; no more than M needs; at most 65535 blocks per chunk (the launch
    # grid's second axis)
    rows = max(block_rows, min(rows - rows % block_rows, -(-m // block_rows) * block_rows, 65535 * block_rows))
    buf = torch.empty(rows, h, dtype=x.dtype, device=x.device)
    sizes = []
    for s in range(0, m, rows):
        e = min(m, s + rows)
        g = buf[: e - s]
        torch.mm(x[s:e], weights.w_gate.t(), out=g)
        idx, cnt = union_blocks(g, block_rows)
        union_up(x[s:e], weights.w_up, g, idx, cnt, block_rows)
        union_down(g, weights.w_down_t, idx, cnt, y[s:e], block_rows)
        sizes.append(cnt)
    if return_union_sizes:
        return y, torch.cat(sizes) if sizes else torch.zeros(0, dtype=torch.int32, device=x.device)
    return y


def union_sizes_reference(x: torch.Tensor, weights: TwellWeights, block_rows: int = BLOCK_ROWS) -> torch.Tensor:
    """Torch reference of the per-block union sizes (gate in x's dtype, as cuBLAS rounds it)."""
    g = (x @ weights.w_gate.t()) > 0
    m = g.shape[0]
    pad = -m % block_rows
    if pad:
        g = torch.cat([g, g.new_zeros(pad, g.shape[1])])
    return g.view(-1, block_rows, g.shape[1]).any(1).sum(1, dtype=torch.int32)
