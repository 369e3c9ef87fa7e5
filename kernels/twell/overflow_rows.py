"""Overflowed tokens, recomputed in parallel with their count read on the device (no host sync).

A token with any (row, tile) over cap has no complete TwELL entry list. The up/down kernel used
to walk such a token's overflowed tiles column by column in its own program: exact, but a fully
dense row (a BOS token, say) became one serial walk over all H columns, and 16 such rows in
16384 tokens made the whole FFN 4x slower than dense (NOTES.md run 9).

Now, in three launches after the gate kernel, none of which needs a count on the host:

  list_overflowed (before the up/down kernel): each token with at least MIN_TILES overflowed
      tiles gets a slot in a device list (one atomic per program on a counter, ranks by a
      cumsum), its counts are set to 0 so the up/down kernel walks nothing for it (it writes
      zeros), and its fp32 accumulator row is zeroed. A token with a single overflowed tile is
      left to the walk: one extra tile (T entries) costs its program less than recomputing all of
      H, and such mild overflows (a popular tile) must not take the slots of dense rows. (Listing
      inside the up/down kernel instead cost its pipelined walk on clean inputs: +0.05 ms at
      hot1536 on an H100.)
  overflow_rows compute: programs own (a block of BR listed tokens, a chunk of BH neurons) and
      compute g = x W_g^T and u = x W_u^T for them with tensor-core dots over all of D,
      h = relu(g) * u, and add h W_d^T[chunk] into the accumulator rows (fp32 atomics: the
      chunks of one token meet there). The work spreads over all neuron chunks, so 16 dense rows
      cost a few tens of microseconds instead of a 4 ms serial tail.
  overflow_rows add: y[token] += accumulator row.

The last two read the count from memory: with no overflow they exit at once, and the FFN stays
free of host syncs. At most `row_cap` tokens are listed (the accumulator is [row_cap, D]); tokens
beyond that keep their counts and take the up/down kernel's serial walk, which is exact too.
Nothing is dropped.

The header is int32 [HEADER]: header[0] = number of tokens that qualified (may exceed row_cap).

Two differences from the walk, both within the bf16 error budget: the fp32 atomics land in any
order, so a listed token's output is not bit-identical from run to run; and h is rounded to the
input dtype before the down product (as the dense hot path does), where the walk keeps it fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import interpreting
from .epilogue import _dot   # interpreter- and fp32-aware tl.dot, shared with the gate kernels

HEADER = 16          # int32 words before the list, so the list and accumulator stay 64-byte aligned
MIN_TILES = 2        # overflowed tiles that make a token worth listing (see above)
_INTERPRET = interpreting()


class OverflowList:
    """Device buffers for one FFN call: the counter, the token list and the fp32 accumulator."""

    def __init__(self, row_cap: int, d: int, device: torch.device):
        if row_cap * d >= 2**31:
            raise ValueError(f"overflow_row_cap={row_cap} x D={d} must stay under 2^31 accumulator elements")
        self.row_cap = row_cap
        self.header = torch.zeros(HEADER, dtype=torch.int32, device=device)   # the only memset
        self.rows = torch.empty(max(row_cap, 1), dtype=torch.int32, device=device)
        self.acc = torch.empty(max(row_cap, 1), d, dtype=torch.float32, device=device)  # rows zeroed when listed


@triton.jit
def _list_overflowed_kernel(cnt_ptr, hdr_ptr, list_ptr, acc_ptr, M, D, n_tiles, CAP, ROW_CAP, MIN_T, row0,
                            BM: tl.constexpr, NT_P: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    r_ok = rows < M
    t = tl.arange(0, NT_P)
    c_off = rows.to(tl.int64)[:, None] * n_tiles + t[None, :]
    c_m = r_ok[:, None] & (t < n_tiles)[None, :]
    n_over = tl.sum((tl.load(cnt_ptr + c_off, mask=c_m, other=0) > CAP).to(tl.int32), axis=1)
    over = (n_over >= MIN_T) & r_ok
    oi = over.to(tl.int32)
    n = tl.sum(oi, axis=0)
    if n > 0:
        base = tl.atomic_add(hdr_ptr, n)                  # one atomic per program: a run of slots
        at = base + tl.cumsum(oi, axis=0) - 1
        listed = over & (at < ROW_CAP)
        tl.store(list_ptr + at, row0 + rows, mask=listed)
        tl.store(cnt_ptr + c_off, tl.zeros((BM, NT_P), dtype=tl.int32), mask=c_m & listed[:, None])
        for d0 in range(0, D, BLOCK_D):
            rd = d0 + tl.arange(0, BLOCK_D)
            tl.store(acc_ptr + at[:, None] * D + rd[None, :], tl.zeros((BM, BLOCK_D), dtype=tl.float32),
                     mask=listed[:, None] & (rd < D)[None, :])


@triton.jit
def _overflow_rows_kernel(x_ptr, wg_ptr, wu_ptr, wdt_ptr, hdr_ptr, list_ptr, acc_ptr, D, H, col0, ROW_CAP,
                          BR: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
                          IEEE: tl.constexpr, INTERPRET: tl.constexpr):
    n = tl.minimum(tl.load(hdr_ptr), ROW_CAP)
    hj = col0 + tl.program_id(0) * BH + tl.arange(0, BH)
    h_ok = hj < H
    hj64 = hj.to(tl.int64)
    for r0 in range(tl.program_id(1) * BR, n, tl.num_programs(1) * BR):
        s = r0 + tl.arange(0, BR)
        s_ok = s < n
        rows = tl.load(list_ptr + s, mask=s_ok, other=0).to(tl.int64)
        g = tl.zeros((BR, BH), dtype=tl.float32)
        u = tl.zeros((BR, BH), dtype=tl.float32)
        for k0 in range(0, D, BK):
            rk = k0 + tl.arange(0, BK)
            k_ok = rk < D
            xa = tl.load(x_ptr + rows[:, None] * D + rk[None, :], mask=s_ok[:, None] & k_ok[None, :], other=0.0)
            w_off = hj64[None, :] * D + rk[:, None]                     # [BK, BH] view of W^T
            w_m = k_ok[:, None] & h_ok[None, :]
            g = _dot(xa, tl.load(wg_ptr + w_off, mask=w_m, other=0.0), g, IEEE, INTERPRET)
            u = _dot(xa, tl.load(wu_ptr + w_off, mask=w_m, other=0.0), u, IEEE, INTERPRET)
        # masked rows and neurons loaded zeros, so their g is 0 and they add nothing
        h = (tl.where(g > 0, g, 0.0) * u).to(x_ptr.dtype.element_ty)
        for d0 in range(0, D, BD):
            rd = d0 + tl.arange(0, BD)
            d_ok = rd < D
            wd = tl.load(wdt_ptr + hj64[:, None] * D + rd[None, :], mask=h_ok[:, None] & d_ok[None, :], other=0.0)
            part = _dot(h, wd, tl.zeros((BR, BD), dtype=tl.float32), IEEE, INTERPRET)
            tl.atomic_add(acc_ptr + s.to(tl.int64)[:, None] * D + rd[None, :], part,
                          mask=s_ok[:, None] & d_ok[None, :])


@triton.jit
def _overflow_rows_add_kernel(y_ptr, hdr_ptr, list_ptr, acc_ptr, D, ROW_CAP, BLOCK_D: tl.constexpr):
    n = tl.minimum(tl.load(hdr_ptr), ROW_CAP)
    for s in range(tl.program_id(0), n, tl.num_programs(0)):
        row = tl.load(list_ptr + s).to(tl.int64)
        for d0 in range(0, D, BLOCK_D):
            rd = d0 + tl.arange(0, BLOCK_D)
            ok = rd < D
            yv = tl.load(y_ptr + row * D + rd, mask=ok, other=0.0).to(tl.float32)
            av = tl.load(acc_ptr + s * D + rd, mask=ok, other=0.0)   # row_cap * D < 2^31 (OverflowList)
            tl.store(y_ptr + row * D + rd, (yv + av).to(y_ptr.dtype.element_ty), mask=ok)


# (neuron chunks of BLOCK_H) x (ROW_BLOCKS in parallel per chunk) programs; with no overflow each
# reads the counter and exits. Chosen on an H100 (tools/probe_overflow_rows.py, 48 shapes): 16 / 64
# listed rows of the benchmark layer take 0.083 / 0.099 ms against 0.109 / 0.118 with 128-neuron
# chunks and 4 warps; 8 warps won for 16 rows everywhere, one row block per chunk lost at 64 rows.
BLOCK_H, BLOCK_D, ROW_BLOCKS, NUM_WARPS = 64, 64, 4, 8


def list_overflowed(counts: torch.Tensor, cap: int, ovf: OverflowList, row0: int = 0) -> None:
    """List the tokens with at least MIN_TILES (row, tile)s over cap (all of them if there are fewer
    tiles) in `ovf`, up to its row_cap, and zero their counts in place, so the up/down kernel skips
    them. Run between the gate and up/down kernels. counts may be the rows [row0, row0 + M) of a
    larger batch: the list records batch rows, and calls for several chunks share `ovf`."""
    m, nt = counts.shape
    if ovf.row_cap == 0 or m == 0 or nt == 0:
        return
    nt_p = max(2, triton.next_power_of_2(nt))
    bm = 16 if _INTERPRET else max(2, min(64, 4096 // nt_p))   # [BM, NT_P] counts stay in registers
    _list_overflowed_kernel[(triton.cdiv(m, bm),)](counts, ovf.header, ovf.rows, ovf.acc, m, ovf.acc.shape[1], nt,
                                                   cap, ovf.row_cap, min(MIN_TILES, nt), row0, BM=bm, NT_P=nt_p,
                                                   BLOCK_D=32 if _INTERPRET else 256, num_warps=4)


def overflow_rows(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor,
                  ovf: OverflowList, y: torch.Tensor, col0: int, *, block_h: int | None = None,
                  block_d: int | None = None, row_blocks: int | None = None,
                  num_warps: int | None = None) -> torch.Tensor:
    """Add the cold part (columns [col0, H)) of every listed token into y. Launch after the
    up/down kernel (list_overflowed filled `ovf`); x, weights and y as for that kernel. block_h / block_d /
    row_blocks / num_warps override the launch shape (tools/probe_overflow_rows.py)."""
    if ovf.row_cap == 0:
        return y
    m, d = x.shape
    h = w_gate.shape[0]
    if h == col0 or m == 0:
        return y
    small = _INTERPRET
    bh = block_h or (32 if small else BLOCK_H)
    flags = dict(BR=16, BH=bh, BK=32 if small else 64, BD=block_d or (32 if small else BLOCK_D),
                 IEEE=x.dtype == torch.float32, INTERPRET=_INTERPRET)
    grid = (triton.cdiv(h - col0, bh), row_blocks or (1 if small else ROW_BLOCKS))
    _overflow_rows_kernel[grid](x, w_gate, w_up, w_down_t, ovf.header, ovf.rows, ovf.acc, d, h, col0, ovf.row_cap,
                                **flags, num_warps=num_warps or (4 if small else NUM_WARPS))
    _overflow_rows_add_kernel[(min(ovf.row_cap, 2 if small else 32),)](
        y, ovf.header, ovf.rows, ovf.acc, d, ovf.row_cap, BLOCK_D=min(1024, triton.next_power_of_2(d)), num_warps=4)
    return y
