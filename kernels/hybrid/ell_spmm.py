"""Sparse (cold ELL) x dense: out[i] (+)= sum_s c1[i, s] * w1[idx[i, s]] (+ c2[i, s] * w2[idx[i, s]]).

Forward y: c1 = g * u (h, formed on the fly from the two saved ELL arrays), w1 = W_d^T.
Backward dx: c1 = du, w1 = W_u, c2 = dg, w2 = W_g (one pass over the indices for both).
ACCUM adds into `out` (the dense hot-panel GEMM has already written there), saving a pass.

One program per token: the gathered rows are contiguous in D, so each load is one coalesced
segment per slot; the slot loop stops at the token's own count.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, MAX_WALK_D


@triton.jit
def _ell_spmm_kernel(out_ptr, idx_ptr, cnt_ptr, c1_ptr, c3_ptr, w1_ptr, c2_ptr, w2_ptr,
                     D, width,
                     SP: tl.constexpr, BD: tl.constexpr, PRODUCT: tl.constexpr,
                     DUAL: tl.constexpr, ACCUM: tl.constexpr):
    # One program per token walking all of D: a program per (token, D chunk) did only ~2 slot
    # iterations and ran at 1.4 TB/s on H100 (NOTES.md); the long loop keeps loads in flight.
    # The slot-sum stays in a [SP, BD] accumulator and is reduced once per D chunk: putting
    # the slot loop outside and reducing per (slot chunk, D chunk) was 4x slower (NOTES.md).
    row = tl.program_id(0).to(tl.int64)
    n = tl.load(cnt_ptr + row)
    rs = tl.arange(0, SP)
    for d0 in range(0, D, BD):
        rd = d0 + tl.arange(0, BD)
        d_ok = rd < D
        acc = tl.zeros((SP, BD), dtype=tl.float32)
        for s0 in range(0, n, SP):
            s_ok = (s0 + rs) < n
            off = row * width + s0 + rs
            cols = tl.load(idx_ptr + off, mask=s_ok, other=0).to(tl.int64)
            m2 = s_ok[:, None] & d_ok[None, :]
            c1 = tl.load(c1_ptr + off, mask=s_ok, other=0.0)
            if PRODUCT:
                c1 = c1 * tl.load(c3_ptr + off, mask=s_ok, other=0.0)
            w1 = tl.load(w1_ptr + cols[:, None] * D + rd[None, :], mask=m2, other=0.0)
            acc += c1[:, None] * w1.to(tl.float32)
            if DUAL:
                c2 = tl.load(c2_ptr + off, mask=s_ok, other=0.0)
                w2 = tl.load(w2_ptr + cols[:, None] * D + rd[None, :], mask=m2, other=0.0)
                acc += c2[:, None] * w2.to(tl.float32)
        res = tl.sum(acc, axis=0)
        o = out_ptr + row * D + rd
        if ACCUM:
            res += tl.load(o, mask=d_ok, other=0.0).to(tl.float32)
        tl.store(o, res.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _ell_spmm_walk_kernel(out_ptr, idx_ptr, cnt_ptr, c1_ptr, c3_ptr, w1_ptr, c2_ptr, w2_ptr,
                          D, width, BLOCK_D: tl.constexpr, PRODUCT: tl.constexpr,
                          DUAL: tl.constexpr, ACCUM: tl.constexpr):
    # One program per token with the whole output row in registers, one slot per step,
    # pipelined by hand: the weight row(s) and coefficients of slot s+1 and the index of slot
    # s+2 are in flight while slot s is accumulated (the same walk as kernels/twell/updown.py,
    # where it beat the chunked walk by 22% on an H100).
    row = tl.program_id(0).to(tl.int64)
    n = tl.load(cnt_ptr + row)
    rd = tl.arange(0, BLOCK_D)
    d_ok = rd < D
    base = row * width
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    ok = n > 0
    col = tl.load(idx_ptr + base, mask=ok, other=0).to(tl.int64)
    w1c = tl.load(w1_ptr + col * D + rd, mask=d_ok & ok, other=0.0)
    c1c = tl.load(c1_ptr + base, mask=ok, other=0.0)
    if PRODUCT:
        c1c = c1c * tl.load(c3_ptr + base, mask=ok, other=0.0)
    if DUAL:
        w2c = tl.load(w2_ptr + col * D + rd, mask=d_ok & ok, other=0.0)
        c2c = tl.load(c2_ptr + base, mask=ok, other=0.0)
    col_n = tl.load(idx_ptr + base + 1, mask=n > 1, other=0).to(tl.int64)
    for s in range(0, n):
        ok_n = s + 1 < n
        w1n = tl.load(w1_ptr + col_n * D + rd, mask=d_ok & ok_n, other=0.0)
        c1n = tl.load(c1_ptr + base + s + 1, mask=ok_n, other=0.0)
        if PRODUCT:
            c1n = c1n * tl.load(c3_ptr + base + s + 1, mask=ok_n, other=0.0)
        if DUAL:
            w2n = tl.load(w2_ptr + col_n * D + rd, mask=d_ok & ok_n, other=0.0)
            c2n = tl.load(c2_ptr + base + s + 1, mask=ok_n, other=0.0)
        col_n = tl.load(idx_ptr + base + s + 2, mask=s + 2 < n, other=0).to(tl.int64)
        acc += c1c * w1c.to(tl.float32)
        if DUAL:
            acc += c2c * w2c.to(tl.float32)
            w2c, c2c = w2n, c2n
        w1c, c1c = w1n, c1n
    o = out_ptr + row * D + rd
    if ACCUM:
        acc += tl.load(o, mask=d_ok, other=0.0).to(tl.float32)
    tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=d_ok)


# Launch configuration; the benchmark overrides it to sweep. WALK picks the pipelined
# one-slot-per-step walk (rows up to MAX_WALK_D wide), else the chunked kernel (SP, BD).
CONFIG = dict(WALK=True, num_warps=4)
INTERPRET_CONFIG = dict(WALK=False, SP=16, BD=64)


def ell_spmm(out: torch.Tensor, idx, cnt, c1, w1, c3=None, c2=None, w2=None, accumulate=False):
    """Write (or add, with accumulate=True) the cold-ELL product into out [M, D] (contiguous)."""
    M, D = out.shape
    if w1.shape[1] != D or (w2 is not None and w2.shape != w1.shape) or not out.is_contiguous():
        raise ValueError(f"shape/layout mismatch: out {tuple(out.shape)} contiguous={out.is_contiguous()}, "
                         f"w1 {tuple(w1.shape)}, w2 {None if w2 is None else tuple(w2.shape)}")
    cfg = dict(INTERPRET_CONFIG if INTERPRET else CONFIG)
    if not M:
        return out
    args = (out, idx, cnt, c1, c1 if c3 is None else c3, w1, c1 if c2 is None else c2,
            w1 if w2 is None else w2, D, idx.shape[1])
    flags = dict(PRODUCT=c3 is not None, DUAL=c2 is not None, ACCUM=accumulate)
    if cfg.pop("WALK", False) and D <= MAX_WALK_D:
        _ell_spmm_walk_kernel[(M,)](*args, **flags, BLOCK_D=triton.next_power_of_2(D),
                                    num_warps=cfg.get("num_warps", 2))
    else:
        cfg.setdefault("SP", 8)
        cfg.setdefault("BD", 512)
        _ell_spmm_kernel[(M,)](*args, **flags, **cfg)
    return out


def reference(idx, cnt, c1, w1, c3=None, c2=None, w2=None):
    used = torch.arange(idx.shape[1], device=idx.device)[None, :] < cnt[:, None]
    idx = torch.where(used, idx, 0).long()        # slots past cnt are unspecified: never read
    c = c1 if c3 is None else c1 * c3
    out = torch.einsum("ms,msd->md", torch.where(used, c, 0.0), w1.float()[idx])
    if c2 is not None:
        out = out + torch.einsum("ms,msd->md", torch.where(used, c2, 0.0), w2.float()[idx])
    return out
