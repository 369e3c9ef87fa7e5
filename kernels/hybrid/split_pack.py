"""Split the gate epilogue's ELL into the cold ELL and build its per-neuron (CSC) view.

Two small kernels replace ~20 torch ops (a sort and several scatters cost ~1.2 ms at M=16384,
NOTES.md):
  _split_kernel:   per token, drop hot-neuron entries (and every entry of a heavy token),
                   compact the rest to the front of a [M, Wc] ELL, count each neuron's cold
                   entries with int32 atomics (colcount), and append heavy tokens to a device
                   list (one atomic on a counter each), so nobody needs their number on the host.
  _csc_fill_kernel: after csc_ptr = exclusive cumsum(colcount), each cold entry takes the next
                   free position of its neuron with an atomic cursor and writes its flat slot.
The order of tokens inside a neuron's segment follows atomic arrival: sums over a segment are
deterministic only up to fp32 reassociation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl



@triton.jit
def _split_kernel(cnt0_ptr, idx0_ptr, val0_ptr, coldm_ptr, cnt_ptr, idx_ptr, g_ptr, colcount_ptr,
                  list_ptr, nheavy_ptr, W0, Wc, WP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    n0 = tl.load(cnt0_ptr + row)
    s = tl.arange(0, WP)
    valid = (s < n0) & (n0 <= W0)          # heavy tokens (n0 > W0) keep nothing here
    j = tl.load(idx0_ptr + row * W0 + s, mask=valid, other=0)
    v = tl.load(val0_ptr + row * W0 + s, mask=valid, other=0.0)
    cold = valid & (tl.load(coldm_ptr + j, mask=valid, other=0) != 0)
    ci = cold.to(tl.int32)
    total = tl.sum(ci, axis=0)
    # A token whose cold count exceeds the capacity Wc keeps nothing here either: it is listed
    # heavy and takes the dense backup (never truncated). With Wc = W0 this never happens.
    fits = total <= Wc
    keep = cold & fits
    pos = tl.cumsum(ci, axis=0) - 1
    tl.store(idx_ptr + row * Wc + pos, j, mask=keep)
    tl.store(g_ptr + row * Wc + pos, v, mask=keep)
    tl.store(cnt_ptr + row, tl.where(fits, total, 0))
    heavy = (n0 > W0) | (total > Wc)
    at = tl.atomic_add(nheavy_ptr, 1, mask=heavy)
    tl.store(list_ptr + at, row.to(tl.int32), mask=heavy)
    tl.atomic_add(colcount_ptr + j, ci, mask=keep)


@triton.jit
def _csc_fill_kernel(cnt_ptr, idx_ptr, ptr_ptr, cursor_ptr, slot_ptr, Wc, WP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    n = tl.load(cnt_ptr + row)
    s = tl.arange(0, WP)
    ok = s < n
    j = tl.load(idx_ptr + row * Wc + s, mask=ok, other=0)
    base = tl.load(ptr_ptr + j, mask=ok, other=0)
    k = tl.atomic_add(cursor_ptr + j, tl.full((WP,), 1, tl.int32), mask=ok)
    tl.store(slot_ptr + base + k, (row * Wc + s).to(tl.int32), mask=ok)


def split_pack(cnt0, idx0, val0, cold, Wc: int, n_heavy=None, counters=None):
    """(cnt [M] int32, idx [M, Wc] int32, g [M, Wc] fp32, csc_ptr [H+1] int32, csc_slot [M*Wc] int32,
    heavy [M] int32, n_heavy [1] int32); cold [H] int8 is 1 for neurons outside the hot set.

    Wc is a capacity: a light token with more than Wc cold entries is stored empty (cnt 0) and
    listed heavy, like a token with cnt0 > W0 (its cold part is then not in the ELL). The first
    n_heavy[0] entries of heavy are those tokens, in no particular order; the count stays on the
    device. `n_heavy` may be a caller's zeroed int32 [1] view (e.g. a slot of the layer's stats,
    copied back to the host in one piece), and `counters` a zeroed int32 [3H + 1] one. Slots past
    a token's count are unspecified (never read).
    """
    M, W0 = idx0.shape
    H = cold.numel()
    dev = idx0.device
    cnt = torch.empty(M, dtype=torch.int32, device=dev)
    # only used slots (s < cnt) are ever read: no memset of the [M, Wc] arrays
    idx = torch.empty(M, Wc, dtype=torch.int32, device=dev)
    g = torch.empty(M, Wc, dtype=torch.float32, device=dev)
    if counters is None:   # (or a caller's zeroed int32 [3H + 1]): one memset for all three
        counters = torch.zeros(3 * H + 1, dtype=torch.int32, device=dev)
    colcount, cursor, csc_ptr = counters[:H], counters[H:2 * H], counters[2 * H:]
    heavy = torch.empty(M, dtype=torch.int32, device=dev)
    if n_heavy is None:
        n_heavy = torch.zeros(1, dtype=torch.int32, device=dev)
    if M:
        _split_kernel[(M,)](cnt0, idx0, val0, cold, cnt, idx, g, colcount, heavy, n_heavy, W0, Wc,
                            WP=triton.next_power_of_2(W0))
    torch.cumsum(colcount, 0, out=csc_ptr[1:])
    csc_slot = torch.empty(M * Wc, dtype=torch.int32, device=dev)   # tail past csc_ptr[H] unused
    if M:
        _csc_fill_kernel[(M,)](cnt, idx, csc_ptr, cursor, csc_slot, Wc, WP=triton.next_power_of_2(Wc))
    return cnt, idx, g, csc_ptr, csc_slot, heavy, n_heavy


def reference(cnt0, idx0, val0, hot_mask, Wc: int):
    """Pure-torch split_pack (CSC segments sorted by flat slot; the kernel's order may differ)."""
    M, W0 = idx0.shape
    H = hot_mask.numel()
    dev = idx0.device
    slot = torch.arange(W0, device=dev)
    valid = (slot[None, :] < cnt0[:, None]) & (cnt0 <= W0)[:, None]
    idx0 = torch.where(valid, idx0, 0)
    cold = valid & ~hot_mask[idx0.long()]
    dest = torch.where(cold, torch.cumsum(cold, 1) - 1, Wc)
    idx = torch.zeros(M, Wc + 1, dtype=torch.int32, device=dev).scatter_(1, dest, idx0)[:, :Wc].contiguous()
    g = torch.zeros(M, Wc + 1, dtype=torch.float32, device=dev).scatter_(
        1, dest, torch.where(cold, val0, 0.0))[:, :Wc].contiguous()
    cnt = cold.sum(1).to(torch.int32)
    keys = torch.where(torch.arange(Wc, device=dev)[None, :] < cnt[:, None], idx, H).flatten().long()
    csc_slot = torch.argsort(keys, stable=True).to(torch.int32)
    counts = torch.zeros(H + 1, dtype=torch.int64, device=dev).scatter_add_(0, keys, torch.ones_like(keys))
    csc_ptr = torch.zeros(H + 1, dtype=torch.int64, device=dev)
    csc_ptr[1:] = torch.cumsum(counts[:H], 0)
    return cnt, idx, g, csc_ptr.to(torch.int32), csc_slot
