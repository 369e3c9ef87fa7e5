"""Elementwise kernels of the dense hot panel (neurons too popular for the gather path).

The panel's GEMMs are cuBLAS; what is left is elementwise over [M, K]. In torch that is ~10
kernels per step (relu, mul, sign, scale, add, cat, ...), each a pass over M x K and a launch
after the layer's host sync. One kernel each way:
  forward : g, u [M, K] (views of one [g | u] GEMM output, or g from the pack pass and u from
            its own GEMM)  ->  h = relu(g) * u [M, K] and l1row[i] = sum_j |h_ij| (fp32)
  backward: dh [M, K] (= dy W_d[:, hot]), scale = g_l1 / M  ->  [du | dg] [M, 2K] with the L1
            term folded in: dh' = dh + scale * sign(h), du = dh' relu(g), dg = dh' u 1[g > 0],
            stored [dg | du] so that one GEMM with the forward's [W_g; W_u][hot] gives dx;
            and h again, for dW_d (so the forward's h need not be kept for backward).
And `gather_hot_rows`: the panel's weight rows [W_g; W_u][hot] and W_d^T[hot] in one launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET


@triton.jit
def _hot_fwd_kernel(g_ptr, u_ptr, h_ptr, l1_ptr, K, sg, su, BK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BK)
    tot = tl.zeros((BK,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ok = (k0 + c) < K
        g = tl.load(g_ptr + row * sg + k0 + c, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * su + k0 + c, mask=ok, other=0.0).to(tl.float32)
        h = tl.maximum(g, 0.0) * u
        hq = h.to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * K + k0 + c, hq, mask=ok)
        tot += tl.abs(hq.to(tl.float32))       # L1 of the h that y actually used
    l1 = tl.sum(tot, axis=0)
    if ACC:    # add to the cold L1 the SDDMM wrote for this row
        l1 += tl.load(l1_ptr + row)
    tl.store(l1_ptr + row, l1)


@triton.jit
def _hot_bwd_kernel(g_ptr, u_ptr, dh_ptr, scale_ptr, out_ptr, h_ptr, K, sg, su, BK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BK)
    s = tl.load(scale_ptr)
    for k0 in range(0, K, BK):
        ok = (k0 + c) < K
        g = tl.load(g_ptr + row * sg + k0 + c, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * su + k0 + c, mask=ok, other=0.0).to(tl.float32)
        dh = tl.load(dh_ptr + row * K + k0 + c, mask=ok, other=0.0).to(tl.float32)
        on = g > 0
        sgn = tl.where(on & (u > 0), 1.0, tl.where(on & (u < 0), -1.0, 0.0))
        dh = dh + s * sgn
        du = tl.where(on, dh * g, 0.0)
        dg = tl.where(on, dh * u, 0.0)
        ty = out_ptr.dtype.element_ty
        tl.store(out_ptr + row * 2 * K + k0 + c, dg.to(ty), mask=ok)       # [dg | du]: pairs
        tl.store(out_ptr + row * 2 * K + K + k0 + c, du.to(ty), mask=ok)   # with [W_g; W_u][hot]
        # h again (for dW_d = h^T dy), rounded as the forward rounded it: no separate pass
        tl.store(h_ptr + row * K + k0 + c, (tl.maximum(g, 0.0) * u).to(h_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gather_hot_rows_kernel(hot_ptr, wg_ptr, wu_ptr, wdt_ptr, gu_ptr, dt_ptr, K, D, BD: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    j = tl.load(hot_ptr + i).to(tl.int64)
    rd = tl.program_id(1) * BD + tl.arange(0, BD)
    ok = rd < D
    tl.store(gu_ptr + i * D + rd, tl.load(wg_ptr + j * D + rd, mask=ok), mask=ok)
    tl.store(gu_ptr + (i + K) * D + rd, tl.load(wu_ptr + j * D + rd, mask=ok), mask=ok)
    tl.store(dt_ptr + i * D + rd, tl.load(wdt_ptr + j * D + rd, mask=ok), mask=ok)


def gather_hot_rows(hot: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor):
    """([W_g; W_u][hot] [2K, D], W_d^T[hot] [K, D]) in one launch (it was three index kernels
    and a cat); the weights contiguous [H, D]."""
    K, D = hot.numel(), w_gate.shape[1]
    w_gu_h = torch.empty(2 * K, D, dtype=w_gate.dtype, device=w_gate.device)
    wdt_h = torch.empty(K, D, dtype=w_down_t.dtype, device=w_down_t.device)
    if K and D:
        bd = 64 if INTERPRET else min(triton.next_power_of_2(D), 2048)
        _gather_hot_rows_kernel[(K, triton.cdiv(D, bd))](hot, w_gate, w_up, w_down_t, w_gu_h, wdt_h, K, D, BD=bd)
    return w_gu_h, wdt_h


def _bk(K):
    return 64 if INTERPRET else min(1024, triton.next_power_of_2(max(K, 16)))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A [M, K] operand with unit column stride (a column slice of [g | u] is fine)."""
    return t if t.stride(1) == 1 else t.contiguous()


def hot_forward(g: torch.Tensor, u: torch.Tensor, l1row: torch.Tensor | None = None):
    """g, u [M, K] -> (h [M, K] in g.dtype, l1row [M] fp32); a given l1row is added to in place."""
    g, u = _rows(g), _rows(u)
    M, K = g.shape
    h = torch.empty(M, K, dtype=g.dtype, device=g.device)
    acc = l1row is not None
    if not acc:
        l1row = torch.empty(M, dtype=torch.float32, device=g.device)
    if M and K:
        _hot_fwd_kernel[(M,)](g, u, h, l1row, K, g.stride(0), u.stride(0), BK=_bk(K), ACC=acc)
    return h, l1row


def hot_backward(g: torch.Tensor, u: torch.Tensor, dh: torch.Tensor, scale: torch.Tensor):
    """-> ([dg | du] [M, 2K], h [M, K]) in g.dtype; scale is a 0-dim fp32 device tensor (g_l1 / M)."""
    g, u = _rows(g), _rows(u)
    M, K = g.shape
    out = torch.empty(M, 2 * K, dtype=g.dtype, device=g.device)
    h = torch.empty(M, K, dtype=g.dtype, device=g.device)
    if M and K:
        _hot_bwd_kernel[(M,)](g, u, dh.contiguous(), scale, out, h, K, g.stride(0), u.stride(0), BK=_bk(K))
    return out, h


def reference_forward(g, u):
    h = (torch.relu(g.float()) * u.float()).to(g.dtype)
    return h, h.float().abs().sum(1)


def reference_backward(g, u, dh, scale):
    dt = g.dtype
    g, u = g.float(), u.float()
    on = g > 0
    dh = dh.float() + scale.float() * torch.sign(u) * on
    return torch.cat([torch.where(on, dh * u, 0.0), torch.where(on, dh * g, 0.0)], 1).to(dt)   # [dg | du]
