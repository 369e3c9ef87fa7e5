"""Sparse up/down kernel over TwELL: y[m] = sum over active j of relu(g_mj) * (x_m . W_u[j]) * W_d[:, j].

One program per token. It loads the token's per-tile counts once, turns them into a prefix sum,
and walks the token's entries E at a time: each step gathers E rows of W_u and E rows of
W_d^T (contiguous 2*D-byte rows, 16-byte vector loads), so E independent row loads are in
flight per program instead of one dependent chain per entry. x_m and the y_m accumulator stay
in registers for the whole token: y is written once, no atomics.

Overflow: a (row, tile) whose count exceeds cap is processed densely instead of from its
slots: every column of the tile becomes an entry, its gate is recomputed from W_g (relu(x.W_g[j]))
and inactive ones contribute zero. The branch is skipped when the token has no overflow, so
the common case pays only a predicate. Nothing is ever truncated.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _updown_kernel(x_ptr, wg_ptr, wu_ptr, wdt_ptr, cnt_ptr, val_ptr, col_ptr, y_ptr,
                   D, H, col0, n_tiles,
                   CAP: tl.constexpr, TILE: tl.constexpr, NT_P: tl.constexpr,
                   BLOCK_D: tl.constexpr, E: tl.constexpr, ACCUM: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    x = tl.load(x_ptr + m * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)

    t_idx = tl.arange(0, NT_P)
    t_ok = t_idx < n_tiles
    cnt = tl.load(cnt_ptr + m * n_tiles + t_idx, mask=t_ok, other=0)
    ovf = (cnt > CAP) & t_ok
    width = tl.minimum(H - col0 - t_idx * TILE, TILE)        # last tile may be partial
    n_t = tl.where(ovf, width, tl.where(t_ok, cnt, 0))       # entries to walk in each tile
    cinc = tl.cumsum(n_t, axis=0)
    cexc = cinc - n_t
    total = tl.sum(n_t, axis=0)
    any_ovf = tl.max(ovf.to(tl.int32), axis=0)
    ovf_i = ovf.to(tl.int32)

    # [E, BLOCK_D] accumulator, reduced over E once at the end: a per-step sum over E would be
    # a cross-warp reduction through shared memory whenever warps split that axis.
    acc = tl.zeros((E, BLOCK_D), dtype=tl.float32)
    for e0 in range(0, total, E):
        e = e0 + tl.arange(0, E)
        e_ok = e < total
        # entry e lives in the tile whose inclusive prefix first exceeds e
        t_e = tl.sum((cinc[None, :] <= e[:, None]).to(tl.int32), axis=1)
        sel = t_idx[None, :] == t_e[:, None]
        s = e - tl.sum(tl.where(sel, cexc[None, :], 0), axis=1)
        o_e = tl.sum(tl.where(sel, ovf_i[None, :], 0), axis=1) > 0
        slot = (m * n_tiles + t_e) * CAP + s
        from_slot = e_ok & (o_e == 0)
        lc = tl.load(col_ptr + slot, mask=from_slot, other=0).to(tl.int32)
        g = tl.load(val_ptr + slot, mask=from_slot, other=0.0).to(tl.float32)
        lc = tl.where(o_e, s, lc)                             # overflowed tile: entry s = column s
        col = (col0 + t_e * TILE + lc).to(tl.int64)
        wmask = e_ok[:, None] & d_ok[None, :]
        wp = col[:, None] * D + offs_d[None, :]
        if any_ovf > 0:  # rare path: recompute the gate of overflowed tiles from W_g
            wg = tl.load(wg_ptr + wp, mask=wmask & o_e[:, None], other=0.0).to(tl.float32)
            g = tl.where(o_e, tl.maximum(tl.sum(wg * x[None, :], axis=1), 0.0), g)
        wu = tl.load(wu_ptr + wp, mask=wmask, other=0.0).to(tl.float32)
        wd = tl.load(wdt_ptr + wp, mask=wmask, other=0.0).to(tl.float32)
        h = tl.where(e_ok, g * tl.sum(wu * x[None, :], axis=1), 0.0)
        acc += h[:, None] * wd
    out = tl.sum(acc, axis=0)
    if ACCUM:
        out += tl.load(y_ptr + m * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * D + offs_d, out.to(y_ptr.dtype.element_ty), mask=d_ok)


MAX_D = 16384


def updown(x, w_gate, w_up, w_down_t, counts, values, cols, y, *, tile: int, cap: int, col0: int,
           accumulate: bool = False, entries: int | None = None, num_warps: int | None = None):
    """Launch the sparse up/down kernel; writes (or adds into, if accumulate) y [M, D]."""
    m, d = x.shape
    h = w_gate.shape[0]
    nt = counts.shape[1]
    if d > MAX_D:
        raise ValueError(f"D={d} > {MAX_D}: the up/down kernel keeps a token's row in registers; "
                         f"use kernels.twell.twell_ffn_reference for such widths")
    if m == 0:
        return y
    block_d = triton.next_power_of_2(d)
    if entries is None:  # E rows of W_u and W_d^T per step, bounded so they fit in registers
        entries = max(1, min(4, 4096 // block_d))
    if num_warps is None:
        num_warps = 4
    _updown_kernel[(m,)](x, w_gate, w_up, w_down_t, counts, values, cols, y, d, h, col0, nt,
                         CAP=cap, TILE=tile, NT_P=max(2, triton.next_power_of_2(nt)), BLOCK_D=block_d,
                         E=entries, ACCUM=accumulate, num_warps=num_warps)
    return y
