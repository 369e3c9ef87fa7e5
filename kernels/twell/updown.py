"""Sparse up/down kernel over TwELL: y[m] = sum over active j of relu(g_mj) * (x_m . W_u[j]) * W_d[:, j].

One program per token. It loads the token's per-tile counts once, turns them into a prefix sum,
and walks the token's entries E at a time: each step gathers E rows of W_u and E rows of
W_d^T (contiguous 2*D-byte rows, 16-byte vector loads), so E independent row loads are in
flight per program instead of one dependent chain per entry. x_m and the y_m accumulator stay
in registers for the whole token: y is written once, no atomics.

PF (software pipelining by hand, the default on an H100): step i computes while the rows of
step i+1 and the pairs of step i+2 are already in flight. With E=1 and 2 warps it measured
0.58 ms against 0.75 for the plain walk (all 5632 neurons sparse, M=16384; NOTES.md run 8):
the plain walk waited for a pair, then for its rows, at every step.

Overflow: a (row, tile) whose count exceeds cap is processed densely instead of from its
slots: every column of the tile becomes an entry, its gate is recomputed from W_g (relu(x.W_g[j]))
and inactive ones contribute zero. The branch is skipped when the token has no overflow, so
the common case pays only a predicate. Nothing is ever truncated. twell_ffn's default lists
overflowed tokens before this kernel and zeroes their counts (overflow_rows.py), so only tokens
beyond that list's capacity (and overflow="walk") come here: a fully dense row is a serial walk.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..common import interpreting


@triton.jit
def _entry_slots(e, total, cinc, cexc, ovf_i, t_idx, m, n_tiles, CAP: tl.constexpr):
    """For entry numbers e [E] of one token: (valid, slot index, tile, slot within tile, overflowed)."""
    e_ok = e < total
    # entry e lives in the tile whose inclusive prefix first exceeds e
    t_e = tl.sum((cinc[None, :] <= e[:, None]).to(tl.int32), axis=1)
    sel = t_idx[None, :] == t_e[:, None]
    s = e - tl.sum(tl.where(sel, cexc[None, :], 0), axis=1)
    o_e = tl.sum(tl.where(sel, ovf_i[None, :], 0), axis=1) > 0
    slot = (m * n_tiles + t_e) * CAP + s
    return e_ok, slot, t_e, s, o_e


@triton.jit
def _decode(p, x_ptr, PAIR64: tl.constexpr):
    """packed pair -> (gate value in fp32, local column)."""
    if PAIR64:
        lc = (p & 0xFFFFFFFF).to(tl.int32)
        g = (p >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    else:
        lc = p & 0xFFFF
        g = (p >> 16).to(tl.int16).to(x_ptr.dtype.element_ty, bitcast=True).to(tl.float32)
    return g, lc


@triton.jit
def _updown_kernel(x_ptr, wg_ptr, wu_ptr, wdt_ptr, cnt_ptr, pair_ptr, y_ptr,
                   D, H, col0, n_tiles,
                   CAP: tl.constexpr, TILE: tl.constexpr, NT_P: tl.constexpr,
                   BLOCK_D: tl.constexpr, E: tl.constexpr, ACCUM: tl.constexpr,
                   PAIR64: tl.constexpr, ACC2D: tl.constexpr, PF: tl.constexpr = False,
                   EO: tl.constexpr = 0):
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
    ar_e = tl.arange(0, E)

    if PF and any_ovf == 0:
        # Software-pipelined walk (no overflow in this token): the weight rows of step i+1 and
        # the pairs of step i+2 are in flight while step i computes, so neither the pair ->
        # column -> row chain nor the row loads stall each step. Rows stay 16-bit until used.
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        ok_c, slot, t_c, _s, _o = _entry_slots(ar_e, total, cinc, cexc, ovf_i, t_idx, m, n_tiles, CAP)
        p_c = tl.load(pair_ptr + slot, mask=ok_c, other=0)
        ok_n, slot, t_n, _s, _o = _entry_slots(E + ar_e, total, cinc, cexc, ovf_i, t_idx, m, n_tiles, CAP)
        p_n = tl.load(pair_ptr + slot, mask=ok_n, other=0)
        _g, lc = _decode(p_c, x_ptr, PAIR64)
        wp = (col0 + t_c * TILE + lc).to(tl.int64)[:, None] * D + offs_d[None, :]
        wmask = ok_c[:, None] & d_ok[None, :]
        wu_c = tl.load(wu_ptr + wp, mask=wmask, other=0.0)
        wd_c = tl.load(wdt_ptr + wp, mask=wmask, other=0.0)
        for e0 in range(0, total, E):
            _g, lc = _decode(p_n, x_ptr, PAIR64)
            wp = (col0 + t_n * TILE + lc).to(tl.int64)[:, None] * D + offs_d[None, :]
            wmask = ok_n[:, None] & d_ok[None, :]
            wu_n = tl.load(wu_ptr + wp, mask=wmask, other=0.0)
            wd_n = tl.load(wdt_ptr + wp, mask=wmask, other=0.0)
            ok_nn, slot, t_nn, _s, _o = _entry_slots(e0 + 2 * E + ar_e, total, cinc, cexc, ovf_i, t_idx, m,
                                                     n_tiles, CAP)
            p_nn = tl.load(pair_ptr + slot, mask=ok_nn, other=0)
            g, _lc = _decode(p_c, x_ptr, PAIR64)
            h = tl.where(ok_c, g * tl.sum(wu_c.to(tl.float32) * x[None, :], axis=1), 0.0)
            acc += tl.sum(h[:, None] * wd_c.to(tl.float32), axis=0)
            p_c, ok_c, wu_c, wd_c = p_n, ok_n, wu_n, wd_n
            p_n, ok_n, t_n = p_nn, ok_nn, t_nn
        out = acc
    else:
        # ACC2D: an [E, BLOCK_D] accumulator reduced over E once at the end (no per-step
        # reduction over E) against a [BLOCK_D] one (fewer registers, more programs per SM).
        # EO: entries per step of this walk when it differs from E (PF configs come here only for
        # tokens with an overflowed tile: a fully dense row walks all H columns, so wider steps)
        EW: tl.constexpr = EO if EO > 0 else E
        if ACC2D:
            acc2 = tl.zeros((EW, BLOCK_D), dtype=tl.float32)
        else:
            acc2 = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for e0 in range(0, total, EW):
            e_ok, slot, t_e, s, o_e = _entry_slots(e0 + tl.arange(0, EW), total, cinc, cexc, ovf_i, t_idx, m,
                                                   n_tiles, CAP)
            from_slot = e_ok & (o_e == 0)
            p = tl.load(pair_ptr + slot, mask=from_slot, other=0)    # packed (value, column)
            g, lc = _decode(p, x_ptr, PAIR64)
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
            if ACC2D:
                acc2 += h[:, None] * wd
            else:
                acc2 += tl.sum(h[:, None] * wd, axis=0)
        if ACC2D:
            out = tl.sum(acc2, axis=0)
        else:
            out = acc2
    if ACCUM:
        out += tl.load(y_ptr + m * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * D + offs_d, out.to(y_ptr.dtype.element_ty), mask=d_ok)


MAX_D = 16384


def _ud_configs():
    # (E, num_warps, PF, EO): the candidates that won in the H100 sweeps (tools/sweep_twell.py,
    # NOTES.md runs 8-9). PF configs walk overflowed tokens EO entries per step: with EO=0 (one
    # entry) 16 fully dense rows in 16384 tokens cost 11.4 ms in the up/down, with EO=4 5.0 ms.
    # The interpreter and GPU tests get one config.
    if interpreting():
        return [triton.Config({"E": 4, "ACC2D": False, "PF": False, "EO": 0}, num_warps=4)]
    if os.environ.get("TWELL_NO_AUTOTUNE", "0") != "0":
        return [triton.Config({"E": 1, "ACC2D": False, "PF": True, "EO": 4}, num_warps=2)]
    return [triton.Config({"E": e, "ACC2D": False, "PF": pf, "EO": eo}, num_warps=w)
            for e, w, pf, eo in [(1, 2, True, 4), (1, 2, True, 2), (2, 4, False, 0)]]


# Tuned once per (D, tile layout); y is only written (ACCUM=False in twell_ffn), so re-running a
# config while tuning is harmless; with ACCUM=True y is restored between trials.
_updown_tuned = triton.autotune(configs=_ud_configs(), key=["D", "n_tiles", "CAP", "TILE", "ACCUM"],
                                restore_value=["y_ptr"])(_updown_kernel)


def updown(x, w_gate, w_up, w_down_t, counts, pairs, y, *, tile: int, cap: int, col0: int,
           accumulate: bool = False, entries: int | None = None, num_warps: int | None = None,
           acc2d: bool = False, prefetch: bool = False, overflow_entries: int = 0):
    """Launch the sparse up/down kernel; writes (or adds into, if accumulate) y [M, D].
    entries/num_warps/acc2d/prefetch/overflow_entries pick one config instead of the autotuned one
    (tests, sweeps)."""
    m, d = x.shape
    h = w_gate.shape[0]
    nt = counts.shape[1]
    if d > MAX_D:
        raise ValueError(f"D={d} > {MAX_D}: the up/down kernel keeps a token's row in registers; "
                         f"use kernels.twell.twell_ffn_reference for such widths")
    if m == 0:
        return y
    block_d = triton.next_power_of_2(d)
    args = (x, w_gate, w_up, w_down_t, counts, pairs, y, d, h, col0, nt)
    meta = dict(CAP=cap, TILE=tile, NT_P=max(2, triton.next_power_of_2(nt)), BLOCK_D=block_d,
                ACCUM=accumulate, PAIR64=x.dtype == torch.float32)
    if entries is None and block_d <= 4096:
        _updown_tuned[(m,)](*args, **meta)
        return y
    if entries is None:  # very wide D: E rows per step bounded so they fit in registers
        entries = max(1, 4096 // block_d)
    _updown_kernel[(m,)](*args, **meta, E=entries, ACC2D=acc2d, PF=prefetch, EO=overflow_entries,
                         num_warps=num_warps or 4)
    return y
