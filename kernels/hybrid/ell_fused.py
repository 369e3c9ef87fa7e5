"""The token-major cold products of one direction in one walk (D up to MAX_FUSED_D).

Forward : u[i, s] = x_i . W_u[j],  y_i (+)= sum_s g u W_d^T[j],  l1row[i] (+)= sum_s |g u|
Backward: dh = dy_i . W_d^T[j] + scale * sign(u), du = dh g, dg = dh u (stored for the weight
          gradients), dx_i (+)= sum_s du W_u[j] + dg W_g[j]
with j = idx[i, s]. The separate kernels (ell_sddmm then ell_spmm) read the token's slots twice,
round-trip u (or du, dg) through memory in between and need two launches; here one program per
token keeps its row of x (or dy) and its output row in registers and walks its slots once, with
the weight rows of slot s+1 and the index of slot s+2 in flight while slot s computes (the
pipelining of ell_spmm._ell_spmm_walk_kernel).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Whole rows live in registers: the backward walk holds 8 rows of D (x-side row, accumulator,
# three weight rows and their three prefetches). Wider layers take the separate kernels.
MAX_FUSED_D = 4096


@triton.jit
def _fused_walk_kernel(a_ptr, wa_ptr, wb_ptr, wc_ptr, idx_ptr, cnt_ptr, g_ptr, u_ptr,
                       o1_ptr, o2_ptr, out_ptr, scale_ptr, l1_ptr, D, width,
                       BLOCK_D: tl.constexpr, BWD: tl.constexpr, ACCUM: tl.constexpr):
    # forward : a = x,  wa = W_u (the dot), wb = W_d^T (the sum); o1 = u; l1_ptr = l1row
    # backward: a = dy, wa = W_d^T (the dot), wb = W_u, wc = W_g (the sum); o1 = du, o2 = dg
    row = tl.program_id(0).to(tl.int64)
    n = tl.load(cnt_ptr + row)
    rd = tl.arange(0, BLOCK_D)
    d_ok = rd < D
    base = row * width
    a = tl.load(a_ptr + row * D + rd, mask=d_ok, other=0.0).to(tl.float32)
    o = out_ptr + row * D + rd
    if ACCUM:
        acc = tl.load(o, mask=d_ok, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    ok = n > 0
    col = tl.load(idx_ptr + base, mask=ok, other=0).to(tl.int64)
    wa_c = tl.load(wa_ptr + col * D + rd, mask=d_ok & ok, other=0.0)
    wb_c = tl.load(wb_ptr + col * D + rd, mask=d_ok & ok, other=0.0)
    g_c = tl.load(g_ptr + base, mask=ok, other=0.0)
    if BWD:
        wc_c = tl.load(wc_ptr + col * D + rd, mask=d_ok & ok, other=0.0)
        u_c = tl.load(u_ptr + base, mask=ok, other=0.0)
        scale = tl.load(scale_ptr)
    col_n = tl.load(idx_ptr + base + 1, mask=n > 1, other=0).to(tl.int64)
    l1 = 0.0
    for s in range(0, n):
        ok_n = s + 1 < n
        wa_n = tl.load(wa_ptr + col_n * D + rd, mask=d_ok & ok_n, other=0.0)
        wb_n = tl.load(wb_ptr + col_n * D + rd, mask=d_ok & ok_n, other=0.0)
        g_n = tl.load(g_ptr + base + s + 1, mask=ok_n, other=0.0)
        if BWD:
            wc_n = tl.load(wc_ptr + col_n * D + rd, mask=d_ok & ok_n, other=0.0)
            u_n = tl.load(u_ptr + base + s + 1, mask=ok_n, other=0.0)
        col_n = tl.load(idx_ptr + base + s + 2, mask=s + 2 < n, other=0).to(tl.int64)
        dot = tl.sum(wa_c.to(tl.float32) * a, axis=0)
        if BWD:
            # sign(h) = sign(u) since g > 0; d|h|/dh at h == 0 is taken as 0, like torch.abs
            dh = dot + scale * tl.where(u_c > 0, 1.0, tl.where(u_c < 0, -1.0, 0.0))
            du = dh * g_c
            dg = dh * u_c
            tl.store(o1_ptr + base + s, du)
            tl.store(o2_ptr + base + s, dg)
            acc += du * wb_c.to(tl.float32) + dg * wc_c.to(tl.float32)
            wc_c, u_c = wc_n, u_n
        else:
            tl.store(o1_ptr + base + s, dot)
            h = g_c * dot
            l1 += tl.abs(h)
            acc += h * wb_c.to(tl.float32)
        wa_c, wb_c, g_c = wa_n, wb_n, g_n
    tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=d_ok)
    if not BWD:
        if ACCUM:
            l1 += tl.load(l1_ptr + row)
        tl.store(l1_ptr + row, l1)


CONFIG = dict(num_warps=4)


def fused_ok(D: int) -> bool:
    return D <= MAX_FUSED_D


def _check(a, out, idx, cnt):
    M, D = a.shape
    if out.shape != (M, D) or not out.is_contiguous() or idx.shape[0] != M or cnt.shape != (M,):
        raise ValueError(f"shape/layout mismatch: a {tuple(a.shape)}, out {tuple(out.shape)} "
                         f"contiguous={out.is_contiguous()}, idx {tuple(idx.shape)}, cnt {tuple(cnt.shape)}")
    if D > MAX_FUSED_D:
        raise ValueError(f"D={D} > MAX_FUSED_D={MAX_FUSED_D}: use ell_sddmm + ell_spmm")


def fused_forward(x, w_up, w_down_t, idx, cnt, g, y, l1row, accumulate: bool):
    """u [M, width] fp32 (slots >= cnt unspecified); y and l1row written (or added to, with
    accumulate) in place."""
    _check(x, y, idx, cnt)
    M, D = x.shape
    u = torch.empty(idx.shape, dtype=torch.float32, device=x.device)
    if M:
        _fused_walk_kernel[(M,)](x, w_up, w_down_t, w_down_t, idx, cnt, g, u, u, u, y, u, l1row, D,
                                 idx.shape[1], BLOCK_D=triton.next_power_of_2(D), BWD=False,
                                 ACCUM=accumulate, **CONFIG)
    return u


def fused_backward(dy, w_down_t, w_up, w_gate, idx, cnt, g, u, scale, dx, accumulate: bool):
    """(du, dg) [M, width] fp32 at the cold slots (others unspecified); dx written (or added to)
    in place. `scale` is a 0-dim fp32 tensor g_l1 / M."""
    _check(dy, dx, idx, cnt)
    M, D = dy.shape
    du = torch.empty(idx.shape, dtype=torch.float32, device=dy.device)
    dg = torch.empty_like(du)
    if M:
        _fused_walk_kernel[(M,)](dy, w_down_t, w_up, w_gate, idx, cnt, g, u, du, dg, dx, scale, du, D,
                                 idx.shape[1], BLOCK_D=triton.next_power_of_2(D), BWD=True,
                                 ACCUM=accumulate, **CONFIG)
    return du, dg
