"""Pack a dense gate pre-activation g [M, N] into TwELL: ReLU, count, rank, store.

This is the second half of gate_twell(impl="cublas"): cuBLAS computes g = x W_g[col0:]^T into a
buffer of at most `chunk_rows` rows, and this kernel packs it.

Why a separate pass at all: in the fused kernel the pack epilogue runs on the warps that drive
the tensor cores, with the GEMM's registers still live (255 registers, spills), so each tile's
epilogue stalls its main loop: +0.20 ms on a 0.59 ms GEMM at M=16384 (NOTES.md run 6). Here
the pack runs at full occupancy; reading g once costs 0.078 ms at M=16384, H=5632 (counts only,
NOTES.md run 11). kernels/hybrid/row_pack.py made the same choice for training's ELL.

Two ways to rank (the `epilogue` of pack_twell), both exact and equal bit for bit:
  0, 3  the fused kernels' epilogue (epilogue.py): a prefix sum over every one of the T columns
        (tl.cumsum, or a tensor-core product), then one masked scattered store per column;
  4     bitmask select: a (row, tile)'s nonzeros become T/32 32-bit words; slot s then finds
        the s-th set bit (popcounts, then a 5-step binary search) and loads its value. The work
        is per slot, not per column, and only up to the block's largest count: at 29 nonzeros
        per 5632 columns a 128-column tile holds ~0.7 on average.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..common import interpreting
from ._common import m_bucket
from .epilogue import _twell_epilogue

_INTERPRET = interpreting()
SELECT = 4   # pack_twell's epilogue number for the bitmask select


def _configs():
    if _INTERPRET:
        return [triton.Config({"BM": 16, "EPI": SELECT, "SB": 16}, num_warps=4, num_stages=1)]  # few loop trips
    if os.environ.get("TWELL_NO_AUTOTUNE", "0") != "0":
        return [triton.Config({"BM": 32, "EPI": SELECT, "SB": 8}, num_warps=4, num_stages=1)]
    # the scan (EPI 0) is the reference point: 0.175 ms at M=16384, H=5632 (run 11); 64-row
    # blocks spilled in a local sm_90 compile, and looping over row blocks in one program lost
    return ([triton.Config({"BM": bm, "EPI": 0, "SB": 8}, num_warps=4, num_stages=1) for bm in (16, 32)]
            + [triton.Config({"BM": bm, "EPI": SELECT, "SB": sb}, num_warps=w, num_stages=1)
               for bm in (16, 32, 64) for sb in (4, 8) for w in (4, 8)])


@triton.jit
def _popc(x, INTERPRET: tl.constexpr):
    # x uint32 -> number of set bits (int32)
    if INTERPRET:
        x = x - ((x >> 1) & 0x55555555)
        x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F
        return ((x * 0x01010101) >> 24).to(tl.int32)
    else:
        return tl.inline_asm_elementwise("popc.b32 $0, $1;", "=r,r", [x], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _nth_set_bit(w, r, WB: tl.constexpr, INTERPRET: tl.constexpr):
    # position of the r-th (0-based) set bit of the WB-bit word w (r < popcount(w)): halve the
    # window WB/2, WB/4, ..., 1 bits at a time, skipping the low half when r lies beyond it
    pos = tl.zeros(r.shape, dtype=tl.int32)
    for i in tl.static_range(1, 6):          # WB <= 32: at most 5 halvings
        if (WB >> i) >= 1:
            c = _popc(w & ((1 << (WB >> i)) - 1), INTERPRET)
            up = r >= c
            r = tl.where(up, r - c, r)
            w = tl.where(up, w >> (WB >> i), w)
            pos = tl.where(up, pos + (WB >> i), pos)
    return pos


@triton.jit
def _select_pack(g, g_ptr, cnt_ptr, pair_ptr, pid_m, pid_n, offs_m, m_ok, N, n_tiles, CAP: tl.constexpr,
                 BN: tl.constexpr, PAIR64: tl.constexpr, BM: tl.constexpr, SB: tl.constexpr,
                 INTERPRET: tl.constexpr):
    WB: tl.constexpr = 32 if BN > 32 else BN     # bits per word
    NW: tl.constexpr = BN // WB                  # words per (row, tile)
    # "nonzero after ReLU" on the bits: positive values (and +NaN, which relu keeps) only
    if PAIR64:
        nz = g.to(tl.int32, bitcast=True) > 0
    else:
        nz = g.to(tl.int16, bitcast=True) > 0
    col = tl.arange(0, BN)
    bits = nz.to(tl.uint32) << (col % WB).to(tl.uint32)[None, :]
    words = tl.sum(tl.reshape(bits, (BM, NW, WB)), axis=2)          # distinct bits: sum == or
    widx = tl.arange(0, NW)[None, :]
    cnt = tl.sum(_popc(words, INTERPRET), axis=1)                   # true count, may exceed CAP
    tl.store(cnt_ptr + offs_m * n_tiles + pid_n, cnt, mask=m_ok)
    n_slots = tl.minimum(tl.max(tl.where(m_ok, cnt, 0)), CAP)
    row_base = (offs_m * n_tiles + pid_n) * CAP                     # int64 [BM]
    for s0 in range(0, n_slots, SB):
        s = s0 + tl.arange(0, SB)[None, :]                          # [1, SB] slots
        pre = tl.zeros((BM, 1), dtype=tl.int32)
        wsel = tl.zeros((BM, SB), dtype=tl.uint32)
        rsel = tl.zeros((BM, SB), dtype=tl.int32)
        csel = tl.zeros((BM, SB), dtype=tl.int32)
        for k in tl.static_range(NW):                               # which word holds slot s
            wk = tl.sum(tl.where(widx == k, words, 0), axis=1)[:, None]
            ck = _popc(wk, INTERPRET)
            inw = (s >= pre) & (s < pre + ck)
            wsel = tl.where(inw, wk, wsel)
            rsel = tl.where(inw, s - pre, rsel)
            csel = tl.where(inw, k * WB, csel)
            pre += ck
        c = csel + _nth_set_bit(wsel, rsel, WB, INTERPRET)          # local column
        ok = (s < tl.minimum(cnt, CAP)[:, None]) & m_ok[:, None]
        v = tl.load(g_ptr + offs_m[:, None] * N + pid_n * BN + c, mask=ok, other=0.0)
        if PAIR64:
            pair = (v.to(tl.int32, bitcast=True).to(tl.int64) << 32) | c.to(tl.int64)
        else:
            pair = (v.to(tl.int16, bitcast=True).to(tl.int32) << 16) | c
        tl.store(pair_ptr + row_base[:, None] + s, pair, mask=ok)


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "BN", "CAP"])
@triton.jit
def _pack_kernel(g_ptr, cnt_ptr, pair_ptr, M, N, n_tiles, M_BUCKET, CAP: tl.constexpr, BN: tl.constexpr,
                 INTERPRET: tl.constexpr, PAIR64: tl.constexpr, BM: tl.constexpr, EPI: tl.constexpr,
                 SB: tl.constexpr):
    # one program = BM rows x one TwELL tile; pack_twell launches _pack_kernel.fn for a pinned config
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_ok = offs_m < M
    n_ok = offs_n < N
    # masked entries load 0, which is never "nonzero": partial tiles and rows pack correctly
    g = tl.load(g_ptr + offs_m[:, None] * N + offs_n[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
    if EPI == 4:   # SELECT
        _select_pack(g, g_ptr, cnt_ptr, pair_ptr, pid_m, pid_n, offs_m, m_ok, N, n_tiles, CAP, BN, PAIR64, BM, SB,
                     INTERPRET)
    else:
        _twell_epilogue(g.to(tl.float32), g_ptr, cnt_ptr, pair_ptr, cnt_ptr, pid_m, pid_n, offs_m, offs_n, m_ok,
                        n_ok, 0, n_tiles, CAP, BN, False, INTERPRET, EPI, PAIR64, BM)


def pack_twell(g: torch.Tensor, counts: torch.Tensor, pairs: torch.Tensor, tile: int, cap: int,
               epilogue: int | None = None, block_rows: int | None = None, slot_block: int = 4,
               num_warps: int = 4) -> None:
    """Write TwELL counts [M, n_tiles] and pairs [M, n_tiles, cap] (format.py) for relu(g).
    g [M, N] contiguous, pre-activation (entries <= 0 are dropped). epilogue (0, 3: scan; 4:
    bitmask select; 2: counts only) and block_rows pin one launch config (tests, probes); by
    default the autotuner picks one."""
    m, n = g.shape
    nt = counts.shape[1]
    if m == 0 or nt == 0:
        return
    flags = dict(CAP=cap, BN=tile, INTERPRET=_INTERPRET, PAIR64=g.dtype == torch.float32)
    if epilogue is None and block_rows is None:
        grid = lambda meta: (triton.cdiv(m, meta["BM"]), nt)  # noqa: E731
        _pack_kernel[grid](g, counts, pairs, m, n, nt, m_bucket(m), **flags)
        return
    bm = block_rows or 16
    _pack_kernel.fn[(triton.cdiv(m, bm), nt)](g, counts, pairs, m, n, nt, m_bucket(m), BM=bm, SB=slot_block,
                                              EPI=SELECT if epilogue is None else epilogue,
                                              num_warps=num_warps, **flags)
