"""The training gate GEMM with pass 1 of the pack in its epilogue: g = x W_g^T, dense, plus the
nonzeros of every (row, column chunk) and the per-neuron fire counts.

Why: the cuBLAS path (row_pack.py) writes g (184 MB at M=16384, H=5632) and then reads it
twice: pass 1 counts, pass 2 packs. Pass 1 is a pure read of g (~0.09 ms per step on an
H100). Here the GEMM counts while the tile is still in registers, so only pass 2 reads g.
The main loop is the TwELL gate's (TMA tensor descriptors, one persistent program per SM,
kernels/twell/gate.py); the tile is stored by TMA as well. Same outputs as
`x @ w_gate.t()` + `row_pack.count_pass`: g in x's dtype, counts per (row, BN-column chunk)
judged on the stored (rounded) value, which is what pass 2 reads.
Used only where TMA applies (16-bit inputs, 16-byte aligned rows); `build_pattern` takes the
cuBLAS path otherwise.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import grouped_tile_ids
from ..twell.gate import _desc, _m_bucket, _num_sms, _tma_ok
from ._common import INTERPRET


@triton.jit
def _dot(a, b, acc, INTERP: tl.constexpr):
    if INTERP:   # the interpreter's 16-bit dot is wrong: do it in fp32
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


def _set_blocks(nargs):
    # autotune pre-hook: the TMA boxes follow the config's block sizes
    bm, bk, bn = nargs["BM"], nargs["BK"], nargs["BN"]
    nargs["x_desc"].block_shape = [bm, bk]
    nargs["wg_desc"].block_shape = [bn, bk]
    nargs["g_desc"].block_shape = [bm, bn]


def _configs():
    if INTERPRET:
        return [triton.Config({"BM": 32, "BK": 32, "GROUP_M": 4}, num_warps=4, num_stages=1, pre_hook=_set_blocks)]
    # the TwELL gate's TMA configs (kernels/twell/NOTES.md run 6: 16 warps lost everywhere)
    return [triton.Config({"BM": bm, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=s, pre_hook=_set_blocks)
            for bm, bk, w, s in [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3)]]


@triton.autotune(configs=_configs(), key=["M_BUCKET", "D", "H", "BN"], reset_to_zero=["fire_ptr"])
@triton.jit
def _gate_count_kernel(x_desc, wg_desc, g_desc, ccnt_ptr, fire_ptr, M, D, H, n_chunks, M_BUCKET,
                       BN: tl.constexpr, INTERP: tl.constexpr,
                       BM: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    total = tl.cdiv(M, BM) * n_chunks
    for tile_id in tl.range(tl.program_id(0), total, tl.num_programs(0)):
        pid_m, pid_n = grouped_tile_ids(M, n_chunks, BM, GROUP_M, tile_id)
        off_m = pid_m * BM
        off_n = pid_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, D, BK):
            acc = _dot(x_desc.load([off_m, k]), wg_desc.load([off_n, k]).T, acc, INTERP)
        v = acc.to(g_desc.dtype)
        g_desc.store([off_m, off_n], v)               # rows/columns past M, H are clipped
        nz = (v > 0).to(tl.int32)                     # out-of-bounds loads were zero: never counted
        rows = off_m + tl.arange(0, BM)
        cols = off_n + tl.arange(0, BN)
        tl.store(ccnt_ptr + rows.to(tl.int64) * n_chunks + pid_n, tl.sum(nz, axis=1), mask=rows < M)
        colsum = tl.sum(nz, axis=0)
        tl.atomic_add(fire_ptr + cols, colsum, mask=(cols < H) & (colsum > 0))


def gate_count_applies(x: torch.Tensor, w_gate: torch.Tensor) -> bool:
    """True where the kernel runs: CUDA (or the interpreter), 16-bit, TMA-aligned operands and
    output (H a multiple of 8)."""
    g_rows_aligned = w_gate.shape[0] * x.element_size() % 16 == 0     # g's TMA descriptor
    return ((x.is_cuda or INTERPRET) and x.dtype in (torch.bfloat16, torch.float16) and g_rows_aligned
            and _tma_ok(x, w_gate))


def gate_count(x: torch.Tensor, w_gate: torch.Tensor, chunk: int):
    """(g [M, H] in x's dtype, fire [H] int32, counts [M, ceil(H / chunk)] int32): the GEMM and
    pass 1 of the two-pass pack (row_pack.count_pass contract; `chunk` is pass 2's chunk width).
    x [M, D], w_gate [H, D] contiguous, same 16-bit dtype (gate_count_applies)."""
    M, D = x.shape
    H = w_gate.shape[0]
    g = torch.empty(M, H, dtype=x.dtype, device=x.device)
    fire = torch.zeros(H, dtype=torch.int32, device=x.device)
    nc = triton.cdiv(H, chunk)
    ccnt = torch.empty(M, nc, dtype=torch.int32, device=x.device)
    if not (M and H):
        return g, fire, ccnt
    if D == 0:
        return g.zero_(), fire, ccnt.zero_()
    sms = _num_sms(x.device)
    grid = lambda meta: (min(triton.cdiv(M, meta["BM"]) * nc, sms),)  # noqa: E731
    _gate_count_kernel[grid](_desc(x), _desc(w_gate), _desc(g), ccnt, fire, M, D, H, nc, _m_bucket(M),
                             BN=chunk, INTERP=INTERPRET)
    return g, fire, ccnt


def counts_of(g: torch.Tensor, chunk: int):
    """(fire [H], counts [M, ceil(H / chunk)]) of the positive entries of g, in torch."""
    M, H = g.shape
    nz = (g > 0).to(torch.int32)
    pad = torch.nn.functional.pad(nz, (0, -H % chunk))
    return nz.sum(0, dtype=torch.int32), pad.view(M, -1, chunk).sum(2, dtype=torch.int32)


def reference(x: torch.Tensor, w_gate: torch.Tensor, chunk: int):
    """The same three outputs from torch (fp32 math, g rounded to x's dtype before counting)."""
    g = (x.float() @ w_gate.float().t()).to(x.dtype)
    return (g, *counts_of(g, chunk))
