"""Weight gradients of the cold part through the per-neuron (CSC) view.

out1[j] = sum over the cold activations p of neuron j of k1[p] * a[tok[p]]  (and out2 with k2, DUAL).
  dW_u, dW_g: a = x, k1 = du, k2 = dg   (one gather of each x row feeds both gradients);
  dW_d^T:     a = dy, k1 = g * u = h.
Two steps:
  csc_order: the token ids and the coefficients in CSC order (contiguous per neuron), gathered
             once from the ELL-ordered arrays by a flat, fully parallel kernel;
  csc_wgrad: the walks, which then read their coefficients contiguously like the row walks do.
Reading du/dg at each ELL slot inside the walk (a random 4-byte load per step on the walk's
dependent chain) took 0.232 ms for dW_u+dW_g on an H100 against 0.204 ms in CSC order, plus
0.017 ms for the reordering (tools/probe_csc_walk.py, NOTES.md).
Rows of neurons with no cold activation are written as 0, except hot neurons' rows, which are
copied from the dense panel's GEMM results when the caller passes them (`hot`). Neuron-major
order makes each output row a private accumulator: no atomics, no race, deterministic up to
the fixed slot order. The segment length is bounded by hot_frac * M (hot neurons are dense).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, MAX_WALK_D, ceil_div


@triton.jit
def _csc_order_kernel(ptr_ptr, slot_ptr, tok_ptr, x1_ptr, y1_ptr, o1_ptr, x2_ptr, o2_ptr, x3_ptr, o3_ptr,
                      H, width, BLOCK: tl.constexpr, N: tl.constexpr, PROD1: tl.constexpr):
    # position p of the CSC view -> its token and coefficients; the grid covers the capacity
    # (M * width positions) and the programs past the real count (csc_ptr[H], read here, so
    # the host never needs it) return after that one load
    n = tl.load(ptr_ptr + H)
    if tl.program_id(0) * BLOCK >= n:
        return
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = p < n
    slot = tl.load(slot_ptr + p, mask=ok, other=0)
    tl.store(tok_ptr + p, slot // width, mask=ok)
    v = tl.load(x1_ptr + slot, mask=ok, other=0.0)
    if PROD1:
        v = v * tl.load(y1_ptr + slot, mask=ok, other=0.0)
    tl.store(o1_ptr + p, v, mask=ok)
    if N >= 2:
        tl.store(o2_ptr + p, tl.load(x2_ptr + slot, mask=ok, other=0.0), mask=ok)
    if N >= 3:
        tl.store(o3_ptr + p, tl.load(x3_ptr + slot, mask=ok, other=0.0), mask=ok)


@triton.jit
def _csc_wgrad_kernel(a_ptr, ptr_ptr, tok_ptr, k1_ptr, k2_ptr, out1_ptr, out2_ptr,
                      H, D,
                      NB: tl.constexpr, KT: tl.constexpr, BD: tl.constexpr, DUAL: tl.constexpr):
    # NB neurons per program as a [NB, KT, BD] tile: the loop runs to the longest of the NB
    # segments (shorter ones are masked). NB > 1 exists for the CPU interpreter, whose cost is
    # per program; on the GPU the sweep picks NB (NOTES.md).
    j = tl.program_id(0) * NB + tl.arange(0, NB)
    j_ok = j < H
    rd = tl.program_id(1) * BD + tl.arange(0, BD)
    d_ok = rd < D
    start = tl.load(ptr_ptr + j, mask=j_ok, other=0)
    end = tl.load(ptr_ptr + j + 1, mask=j_ok, other=0)
    longest = tl.max(end - start, axis=0)
    rt = tl.arange(0, KT)
    acc1 = tl.zeros((NB, KT, BD), dtype=tl.float32)
    acc2 = tl.zeros((NB, KT, BD), dtype=tl.float32)
    for t0 in range(0, longest, KT):
        t = start[:, None] + t0 + rt[None, :]                     # [NB, KT]
        t_ok = t < end[:, None]
        tok = tl.load(tok_ptr + t, mask=t_ok, other=0).to(tl.int64)
        av = tl.load(a_ptr + tok[:, :, None] * D + rd[None, None, :],
                     mask=t_ok[:, :, None] & d_ok[None, None, :], other=0.0).to(tl.float32)
        acc1 += tl.load(k1_ptr + t, mask=t_ok, other=0.0)[:, :, None] * av
        if DUAL:
            acc2 += tl.load(k2_ptr + t, mask=t_ok, other=0.0)[:, :, None] * av
    o = j.to(tl.int64)[:, None] * D + rd[None, :]
    m = j_ok[:, None] & d_ok[None, :]
    tl.store(out1_ptr + o, tl.sum(acc1, axis=1).to(out1_ptr.dtype.element_ty), mask=m)
    if DUAL:
        tl.store(out2_ptr + o, tl.sum(acc2, axis=1).to(out2_ptr.dtype.element_ty), mask=m)


@triton.jit
def _csc_wgrad_walk_kernel(a_ptr, ptr_ptr, tok_ptr, k1_ptr, k2_ptr, out1_ptr, out2_ptr,
                           hotpos_ptr, s1_ptr, s2_ptr,
                           D, BLOCK_D: tl.constexpr, DUAL: tl.constexpr, HOT: tl.constexpr):
    # One program per neuron with its whole output row(s) in registers, one token per step,
    # pipelined by hand: the row a[token] and coefficients of step i+1 and the token of step i+2
    # are in flight while step i accumulates (the walk of ell_spmm._ell_spmm_walk_kernel).
    j = tl.program_id(0).to(tl.int64)
    rd = tl.arange(0, BLOCK_D)
    d_ok = rd < D
    start = tl.load(ptr_ptr + j)
    n = tl.load(ptr_ptr + j + 1) - start
    acc1 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    tok = tl.load(tok_ptr + start, mask=n > 0, other=0).to(tl.int64)
    ac = tl.load(a_ptr + tok * D + rd, mask=d_ok & (n > 0), other=0.0)
    c1c = tl.load(k1_ptr + start, mask=n > 0, other=0.0)
    c2c = tl.load(k2_ptr + start, mask=(n > 0) & DUAL, other=0.0)
    tok_n = tl.load(tok_ptr + start + 1, mask=n > 1, other=0).to(tl.int64)
    for i in range(0, n):
        ok_n = i + 1 < n
        an = tl.load(a_ptr + tok_n * D + rd, mask=d_ok & ok_n, other=0.0)
        c1n = tl.load(k1_ptr + start + i + 1, mask=ok_n, other=0.0)
        c2n = tl.load(k2_ptr + start + i + 1, mask=ok_n & DUAL, other=0.0)
        tok_n = tl.load(tok_ptr + start + i + 2, mask=i + 2 < n, other=0).to(tl.int64)
        av = ac.to(tl.float32)
        acc1 += c1c * av
        if DUAL:
            acc2 += c2c * av
        ac, c1c, c2c = an, c1n, c2n
    if HOT:
        # a hot neuron has no cold slot: its row is the dense panel's, copied here instead of by
        # an index_copy per gradient afterwards
        hp = tl.load(hotpos_ptr + j)
        if hp >= 0:
            acc1 = tl.load(s1_ptr + hp * D + rd, mask=d_ok, other=0.0).to(tl.float32)
            if DUAL:
                acc2 = tl.load(s2_ptr + hp * D + rd, mask=d_ok, other=0.0).to(tl.float32)
    o = j * D + rd
    tl.store(out1_ptr + o, acc1.to(out1_ptr.dtype.element_ty), mask=d_ok)
    if DUAL:
        tl.store(out2_ptr + o, acc2.to(out2_ptr.dtype.element_ty), mask=d_ok)


# Launch configuration; the benchmark overrides it to sweep. WALK picks the pipelined
# one-token-per-step walk (rows up to MAX_WALK_D wide), else the chunked kernel (NB, KT, BD).
CONFIG = dict(WALK=True, num_warps=4)
INTERPRET_CONFIG = dict(WALK=False, NB=32, KT=16, BD=64)
ORDER_BLOCK = 1024


def csc_order(csc_ptr, csc_slot, width: int, *coefs):
    """(tok, k1, k2, ...) in CSC order: tok [M*width] int32 the token of each position, and per
    coefficient one fp32 [M*width] array. A coefficient is an ELL-ordered [M, width] tensor or a
    pair of them (multiplied: g, u -> h); a pair may only come first. At most three; positions
    past csc_ptr[-1] are unspecified (never read by the walks)."""
    if not 1 <= len(coefs) <= 3 or any(isinstance(c, tuple) for c in coefs[1:]):
        raise ValueError("csc_order takes 1-3 coefficients, only the first may be a (a, b) product pair")
    H = csc_ptr.numel() - 1
    n = csc_slot.numel()
    for c in (t for x in coefs for t in (x if isinstance(x, tuple) else (x,))):
        # the kernel reads each coefficient as a flat array indexed by ELL slot
        if not c.is_contiguous() or c.numel() != n:
            raise ValueError(f"csc_order: a coefficient has shape {tuple(c.shape)} (contiguous: "
                             f"{c.is_contiguous()}); expected a contiguous ELL array of {n} slots "
                             "([M, width], as csc_slot)")
    dev = csc_slot.device
    tok = torch.empty(n, dtype=torch.int32, device=dev)
    outs = [torch.empty(n, dtype=torch.float32, device=dev) for _ in coefs]
    first = coefs[0] if isinstance(coefs[0], tuple) else (coefs[0], None)
    ins = [first[0], *coefs[1:]] + [first[0]] * (3 - len(coefs))
    o = outs + [outs[0]] * (3 - len(outs))
    if n:
        _csc_order_kernel[(triton.cdiv(n, ORDER_BLOCK),)](
            csc_ptr, csc_slot, tok, ins[0], first[1] if first[1] is not None else ins[0], o[0],
            ins[1], o[1], ins[2], o[2], H, width, BLOCK=ORDER_BLOCK, N=len(coefs), PROD1=first[1] is not None)
    return (tok, *outs)


def csc_wgrad(a: torch.Tensor, csc_ptr, tok, H: int, k1, k2=None, out_dtype=None, hot=None):
    """Returns out1 [H, D] (and out2 when k2 is given) in out_dtype (default a.dtype); tok, k1,
    k2 in CSC order (csc_order).

    hot = (ids [K] int64, pos [H] int32: row in the sources or -1, src1 [K, D], src2 [K, D] or
    None): the rows of the hot neurons are taken from the sources (the dense panel's gradients)."""
    M, D = a.shape
    if csc_ptr.shape != (H + 1,):
        raise ValueError(f"csc_ptr has shape {tuple(csc_ptr.shape)}, expected ({H + 1},)")
    dt = out_dtype or a.dtype
    out1 = torch.empty(H, D, dtype=dt, device=a.device)
    out2 = torch.empty(H, D, dtype=dt, device=a.device) if k2 is not None else out1
    cfg = dict(INTERPRET_CONFIG if INTERPRET else CONFIG)
    args = (a, csc_ptr, tok, k1, k1 if k2 is None else k2, out1, out2)
    dual = k2 is not None
    if H and D and cfg.pop("WALK", False) and D <= MAX_WALK_D:
        hot_args = (hot[1], hot[2], hot[2] if hot[3] is None else hot[3]) if hot is not None else (csc_ptr,) * 3
        _csc_wgrad_walk_kernel[(H,)](*args, *hot_args, D, BLOCK_D=triton.next_power_of_2(D), DUAL=dual,
                                     HOT=hot is not None, num_warps=cfg.get("num_warps", 4))
    elif H and D:
        cfg = {"NB": 1, "KT": 16, "BD": 512, **cfg}
        grid = (ceil_div(H, cfg["NB"]), ceil_div(D, cfg["BD"]))
        _csc_wgrad_kernel[grid](*args, H, D, DUAL=dual, **cfg)
        if hot is not None:
            out1.index_copy_(0, hot[0], hot[2].to(dt))
            if dual:
                out2.index_copy_(0, hot[0], hot[3].to(dt))
    return (out1, out2) if dual else out1


def reference(a, idx, cnt, H, c1, c3=None):
    """Scatter-add formulation straight from the token ELL (no CSC), fp32 [H, D]."""
    m = torch.arange(idx.shape[1], device=idx.device)[None, :] < cnt[:, None]
    c = c1 if c3 is None else c1 * c3
    rows, slots = m.nonzero(as_tuple=True)
    out = torch.zeros(H, a.shape[1], dtype=torch.float32, device=a.device)
    out.index_add_(0, idx[rows, slots].long(), c[rows, slots, None] * a.float()[rows])
    return out
