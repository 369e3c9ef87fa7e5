"""The hot panel's first GEMM of each direction, with hot_panel.py's elementwise work in its
epilogue (Triton, TMA loads and stores).

  forward : [g | u] = x [W_g; W_u][hot]^T, and in the epilogue h = relu(g) u and
            l1row += sum_j |h_j| (one fp32 atomic per row and column tile);
  backward: dh = dy W_d^T[hot]^T, and in the epilogue (g, u loaded by TMA) the L1 term and the
            gating: [dg | du] and h again, as hot_panel.hot_backward computes them (dh stays
            fp32 here, where the unfused path rounds it to 16 bits first).
Each replaces a cuBLAS GEMM plus a pass over [M, K] (the forward writes g and u once and h
once, instead of writing [g | u], reading it back and writing h). The rounding follows
hot_panel.py: h from the stored 16-bit g and u; the L1 of the h that y uses.
The L1 atomics make the row sums' order of addition vary from run to run (last-bit
differences), like the CSC segments' atomic order (split_pack.py).
Applies to 16-bit inputs with TMA-aligned rows (`applies`); the caller takes the cuBLAS +
hot_panel path otherwise.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import grouped_tile_ids
from ..twell.gate import _desc, _m_bucket
from ._common import INTERPRET

# Off: take the cuBLAS GEMMs + hot_panel.py kernels (the benchmark's A/B switch).
CONFIG = {"fused": True}


@triton.jit
def _dot(a, b, acc, INTERP: tl.constexpr):
    if INTERP:   # the interpreter's 16-bit dot is wrong: do it in fp32
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


def _set_blocks(nargs):
    # autotune pre-hook: every TMA box follows the config's block sizes
    bm, bn, bk = nargs["BM"], nargs["BN"], nargs["BK"]
    nargs["a_desc"].block_shape = [bm, bk]
    for name in ("b1_desc", "b2_desc"):
        nargs[name].block_shape = [bn, bk]
    for name in ("o1_desc", "o2_desc", "o3_desc", "i1_desc", "i2_desc"):
        nargs[name].block_shape = [bm, bn]


def _configs():
    if INTERPRET:
        return [triton.Config({"BM": 32, "BN": 32, "BK": 32, "GROUP_M": 4}, num_warps=4, num_stages=1,
                              pre_hook=_set_blocks)]
    return [triton.Config({"BM": 128, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=8, num_stages=s,
                          pre_hook=_set_blocks)
            for bn, bk, s in [(128, 64, 3), (128, 64, 4), (64, 64, 4), (128, 128, 3)]]


@triton.autotune(configs=_configs(), key=["M_BUCKET", "D", "K", "BWD"], restore_value=["l1_ptr"])
@triton.jit
def _hot_gemm_kernel(a_desc, b1_desc, b2_desc, o1_desc, o2_desc, o3_desc, i1_desc, i2_desc,
                     l1_ptr, scale_ptr, M, D, K, M_BUCKET,
                     BWD: tl.constexpr, INTERP: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    # forward (BWD=0): a = x, b1/b2 = W_g[hot] / W_u[hot]; o1/o2/o3 = g, u, h; l1 row sums.
    # backward (BWD=1): a = dy, b1 = W_d^T[hot]; i1/i2 = g, u; o1/o2/o3 = dg, du, h.
    pid_m, pid_n = grouped_tile_ids(M, tl.cdiv(K, BN), BM, GROUP_M)
    off_m = pid_m * BM
    off_n = pid_n * BN
    acc1 = tl.zeros((BM, BN), dtype=tl.float32)
    acc2 = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, D, BK):
        a = a_desc.load([off_m, k])
        acc1 = _dot(a, b1_desc.load([off_n, k]).T, acc1, INTERP)
        if not BWD:
            acc2 = _dot(a, b2_desc.load([off_n, k]).T, acc2, INTERP)
    ty = o1_desc.dtype
    if BWD:
        g = i1_desc.load([off_m, off_n]).to(tl.float32)      # out-of-bounds boxes read 0
        u = i2_desc.load([off_m, off_n]).to(tl.float32)
        on = g > 0
        sgn = tl.where(on & (u > 0), 1.0, tl.where(on & (u < 0), -1.0, 0.0))
        dh = acc1 + tl.load(scale_ptr) * sgn
        o1_desc.store([off_m, off_n], tl.where(on, dh * u, 0.0).to(ty))   # dg
        o2_desc.store([off_m, off_n], tl.where(on, dh * g, 0.0).to(ty))   # du
        o3_desc.store([off_m, off_n], (tl.maximum(g, 0.0) * u).to(ty))    # h, for dW_d
    else:
        g16 = acc1.to(ty)
        u16 = acc2.to(ty)
        o1_desc.store([off_m, off_n], g16)
        o2_desc.store([off_m, off_n], u16)
        h = (tl.maximum(g16.to(tl.float32), 0.0) * u16.to(tl.float32)).to(ty)
        o3_desc.store([off_m, off_n], h)
        rows = off_m + tl.arange(0, BM)
        # columns past K came from zero-filled weight boxes: h = 0 there
        tl.atomic_add(l1_ptr + rows, tl.sum(tl.abs(h.to(tl.float32)), axis=1), mask=rows < M)


def _aligned(*ts: torch.Tensor) -> bool:
    return all(t.data_ptr() % 16 == 0 and t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0
               for t in ts)


def applies(x: torch.Tensor, K: int, *operands: torch.Tensor) -> bool:
    """Whether the fused kernels run: enabled, CUDA (or the interpreter), 16-bit, K and D
    multiples of 8 (TMA rows and the [g | u] column split 16-byte aligned), and the given
    operands (x included) with unit column stride and 16-byte aligned rows."""
    return (CONFIG["fused"] and (x.is_cuda or INTERPRET) and x.dtype in (torch.bfloat16, torch.float16)
            and K % 8 == 0 and x.shape[1] % 8 == 0 and K > 0 and x.shape[0] > 0
            and _aligned(x, *operands))


def _launch(a, b1, b2, outs, ins, l1row, scale, K, bwd):
    M, D = a.shape
    if not _aligned(a, b1, b2, *outs, *ins):
        raise ValueError("hot_gemm: operands are not 16-byte aligned for TMA (check applies())")
    grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(K, meta["BN"]),)  # noqa: E731
    _hot_gemm_kernel[grid](_desc(a), _desc(b1), _desc(b2), *(_desc(t) for t in outs), *(_desc(t) for t in ins),
                           l1row, scale, M, D, K, _m_bucket(M), BWD=bwd, INTERP=INTERPRET)


def hot_forward_gemm(x: torch.Tensor, w_gu_h: torch.Tensor, l1row: torch.Tensor):
    """x [M, D], w_gu_h = [W_g; W_u][hot] [2K, D] -> (g_h, u_h: views of one [M, 2K] buffer, h [M, K]);
    adds each row's sum |h| to l1row [M] fp32 in place."""
    M = x.shape[0]
    K = w_gu_h.shape[0] // 2
    gu = torch.empty(M, 2 * K, dtype=x.dtype, device=x.device)
    h = torch.empty(M, K, dtype=x.dtype, device=x.device)
    g_h, u_h = gu[:, :K], gu[:, K:]
    _launch(x, w_gu_h[:K], w_gu_h[K:], (g_h, u_h, h), (g_h, u_h), l1row, l1row, K, bwd=False)
    return g_h, u_h, h


def hot_backward_gemm(dy: torch.Tensor, wdt_h: torch.Tensor, g_h: torch.Tensor, u_h: torch.Tensor,
                      scale: torch.Tensor):
    """dy [M, D], W_d^T[hot] [K, D], the forward's g_h, u_h [M, K], scale (0-dim fp32 g_l1 / M)
    -> ([dg | du] [M, 2K], h [M, K]), as hot_panel.hot_backward(g_h, u_h, dy @ wdt_h.t(), scale)."""
    M = dy.shape[0]
    K = wdt_h.shape[0]
    out = torch.empty(M, 2 * K, dtype=dy.dtype, device=dy.device)
    h = torch.empty(M, K, dtype=dy.dtype, device=dy.device)
    _launch(dy, wdt_h, wdt_h, (out[:, :K], out[:, K:], h), (g_h, u_h), scale, scale, K, bwd=True)
    return out, h
