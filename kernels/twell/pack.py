"""Pack a dense gate pre-activation g [M, N] into TwELL: ReLU, count, rank, scatter.

This is the second half of gate_twell(impl="cublas"): cuBLAS computes g = x W_g[col0:]^T into a
buffer of at most `chunk_rows` rows, and this kernel packs it. It runs the very epilogue the
fused gate kernels run (gate._twell_epilogue), so both paths write the same bits.

Why a separate pass at all: in the fused kernel the pack epilogue runs on the warps that drive
the tensor cores, with the GEMM's registers still live (255 registers, spills), so each tile's
epilogue stalls its main loop: +0.20 ms on a 0.59 ms GEMM at M=16384 (NOTES.md run 6). Here
the epilogue runs at full occupancy and the only cost is reading g once (2 bytes per gate
entry) and cuBLAS writing it. NOTES.md run 11 has the measurement that decides between them.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..common import interpreting
from .epilogue import _twell_epilogue

_INTERPRET = interpreting()


def _configs():
    if _INTERPRET:
        return [triton.Config({"BM": 16, "EPI": 3, "ROW_BLOCKS": 2, "STAGES": 1}, num_warps=4, num_stages=1)]
    if os.environ.get("TWELL_NO_AUTOTUNE", "0") != "0":
        return [triton.Config({"BM": 16, "EPI": 0, "ROW_BLOCKS": 4, "STAGES": 2}, num_warps=4, num_stages=1)]
    # EPI 3 ranks with a tensor-core product, EPI 0 with tl.cumsum (both exact). Larger blocks
    # (64 rows) need 213-255 registers in a local sm_90 compile and spilled with EPI 0.
    return [triton.Config({"BM": bm, "EPI": epi, "ROW_BLOCKS": rb, "STAGES": st}, num_warps=w, num_stages=1)
            for bm, w in ((16, 4), (32, 4), (32, 8)) for epi in (0, 3) for rb, st in ((1, 1), (4, 2), (8, 3))]


@triton.jit
def _pack_body(g_ptr, cnt_ptr, pair_ptr, M, N, n_tiles, CAP: tl.constexpr, BN: tl.constexpr,
               INTERPRET: tl.constexpr, EPI: tl.constexpr, PAIR64: tl.constexpr, BM: tl.constexpr,
               ROW_BLOCKS: tl.constexpr, STAGES: tl.constexpr):
    # One program packs ROW_BLOCKS blocks of BM rows of one column tile; the loop is software
    # pipelined (the next block's load is in flight while this one is ranked and stored), which
    # short one-block programs cannot do: they wait a full memory latency each.
    pid_n = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < N
    for i in tl.range(0, ROW_BLOCKS, num_stages=STAGES):
        pid_m = tl.program_id(0) * ROW_BLOCKS + i
        offs_m = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
        m_ok = offs_m < M
        # masked entries load 0, which is never "nonzero": partial tiles and rows pack correctly
        g = tl.load(g_ptr + offs_m[:, None] * N + offs_n[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        _twell_epilogue(g.to(tl.float32), g_ptr, cnt_ptr, pair_ptr, cnt_ptr, pid_m, pid_n, offs_m, offs_n, m_ok,
                        n_ok, 0, n_tiles, CAP, BN, False, INTERPRET, EPI, PAIR64, BM)


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "BN", "CAP"])
@triton.jit
def _pack_kernel(g_ptr, cnt_ptr, pair_ptr, M, N, n_tiles, M_BUCKET, CAP: tl.constexpr, BN: tl.constexpr,
                 INTERPRET: tl.constexpr, PAIR64: tl.constexpr, BM: tl.constexpr, EPI: tl.constexpr,
                 ROW_BLOCKS: tl.constexpr, STAGES: tl.constexpr):
    _pack_body(g_ptr, cnt_ptr, pair_ptr, M, N, n_tiles, CAP, BN, INTERPRET, EPI, PAIR64, BM, ROW_BLOCKS, STAGES)


@triton.jit
def _pack_kernel_fixed(g_ptr, cnt_ptr, pair_ptr, M, N, n_tiles, CAP: tl.constexpr, BN: tl.constexpr,
                       INTERPRET: tl.constexpr, PAIR64: tl.constexpr, BM: tl.constexpr, EPI: tl.constexpr,
                       ROW_BLOCKS: tl.constexpr, STAGES: tl.constexpr):
    _pack_body(g_ptr, cnt_ptr, pair_ptr, M, N, n_tiles, CAP, BN, INTERPRET, EPI, PAIR64, BM, ROW_BLOCKS, STAGES)


def pack_twell(g: torch.Tensor, counts: torch.Tensor, pairs: torch.Tensor, tile: int, cap: int,
               epilogue: int | None = None, block_rows: int | None = None) -> None:
    """Write TwELL counts [M, n_tiles] and pairs [M, n_tiles, cap] (format.py) for relu(g).
    g [M, N] contiguous, pre-activation (negative entries are dropped). epilogue/block_rows pin
    one launch config (tests, sweeps); by default an autotuned one is used. epilogue 2 writes
    counts only."""
    m, n = g.shape
    nt = counts.shape[1]
    if m == 0 or nt == 0:
        return
    flags = dict(CAP=cap, BN=tile, INTERPRET=_INTERPRET, PAIR64=g.dtype == torch.float32)
    if epilogue is None and block_rows is None:
        grid = lambda meta: (triton.cdiv(m, meta["BM"] * meta["ROW_BLOCKS"]), nt)  # noqa: E731
        _pack_kernel[grid](g, counts, pairs, m, n, nt, 1 << max(m - 1, 1).bit_length(), **flags)
        return
    bm = block_rows or 16
    _pack_kernel_fixed[(triton.cdiv(m, 2 * bm), nt)](g, counts, pairs, m, n, nt, BM=bm, ROW_BLOCKS=2, STAGES=1,
                                                     EPI=3 if epilogue is None else epilogue, num_warps=4, **flags)
