"""Choosing the hot neurons on the device: the count over the threshold, and the K most popular.

torch needed a compare + sum for the count, a top-k (~36 us on an H100 for H=5632: a radix select
in several kernels) and a fill + scatter for the mask. One program does it all here: it keeps the
[H] fire counts in registers, finds by bisection the value T with count(fire >= T) >= K >
count(fire > T), and takes every neuron above T plus the first ones equal to T (by index). So
exactly K neurons are hot, ties are broken by neuron index (deterministic), and the list comes
out in index order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET

MAX_H = 1 << 16   # one program holds [H] vectors in registers; wider layers use torch.topk


@triton.jit
def _hot_count_kernel(fire_ptr, H, threshold, out_ptr, BLOCK: tl.constexpr):
    n = tl.zeros((BLOCK,), dtype=tl.int32)
    for h0 in range(0, H, BLOCK):
        h = h0 + tl.arange(0, BLOCK)
        n += (tl.load(fire_ptr + h, mask=h < H, other=0) > threshold).to(tl.int32)
    tl.store(out_ptr, tl.sum(n, axis=0))


@triton.jit
def _select_hot_kernel(fire_ptr, H, K, threshold, hot_ptr, cold_ptr, pos_ptr, count_ptr,
                       BLOCK: tl.constexpr, ROUNDS: tl.constexpr):
    h = tl.arange(0, BLOCK)
    ok = h < H
    f = tl.load(fire_ptr + h, mask=ok, other=-1)
    tl.store(count_ptr, tl.sum((f > threshold).to(tl.int32), axis=0))
    # bisection on the value: invariant count(f >= lo) >= K > count(f >= hi)
    hi = tl.max(f, axis=0) + 1
    lo = hi * 0
    for _ in range(ROUNDS):
        mid = (lo + hi) // 2
        enough = tl.sum((f >= mid).to(tl.int32), axis=0) >= K
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid)
    above = f > lo
    tie = (f == lo) & ok
    need = K - tl.sum(above.to(tl.int32), axis=0)
    take = above | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= need))
    pos = tl.cumsum(take.to(tl.int32), axis=0) - 1
    tl.store(hot_ptr + pos, h.to(tl.int64), mask=take)
    tl.store(cold_ptr + h, (~take).to(tl.int8), mask=ok)
    tl.store(pos_ptr + h, tl.where(take, pos, -1), mask=ok)


def hot_count(fire: torch.Tensor, threshold: int, out: torch.Tensor) -> None:
    """out[0] = number of neurons with fire > threshold (int32, on the device)."""
    _hot_count_kernel[(1,)](fire, fire.numel(), threshold, out, BLOCK=256 if INTERPRET else 1024)


def select_hot(fire: torch.Tensor, K: int, threshold: int, count_out: torch.Tensor):
    """(hot [K] int64, cold [H] int8 = 1 outside the hot set, pos [H] int32 = index in hot or -1):
    the K most-firing neurons, ties by index; also count_out[0] = neurons with fire > threshold."""
    H = fire.numel()
    dev = fire.device
    if K == 0 or H > MAX_H:
        hot_count(fire, threshold, count_out)
        hot = (torch.topk(fire, K, sorted=False).indices if K
               else torch.zeros(0, dtype=torch.int64, device=dev))
        cold = torch.ones(H, dtype=torch.int8, device=dev)
        pos = torch.full((H,), -1, dtype=torch.int32, device=dev)
        if K:
            cold.index_fill_(0, hot, 0)   # (x[i] = 0 would copy the scalar host->device)
            pos.index_copy_(0, hot, torch.arange(K, dtype=torch.int32, device=dev))
        return hot, cold, pos
    hot = torch.empty(K, dtype=torch.int64, device=dev)
    cold = torch.empty(H, dtype=torch.int8, device=dev)
    pos = torch.empty(H, dtype=torch.int32, device=dev)
    block = triton.next_power_of_2(H)
    _select_hot_kernel[(1,)](fire, H, K, threshold, hot, cold, pos, count_out, BLOCK=block,
                             ROUNDS=32, num_warps=1 if INTERPRET else min(16, max(4, block // 1024)))
    return hot, cold, pos


def reference(fire: torch.Tensor, K: int):
    """The same set with torch: sort by (count descending, index ascending), take K."""
    H = fire.numel()
    key = fire.long() * (H + 1) + (H - torch.arange(H, device=fire.device))
    return torch.sort(torch.topk(key, K).indices).values
