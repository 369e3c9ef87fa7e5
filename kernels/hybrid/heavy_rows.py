"""The dense backup for heavy tokens, with the row count read on the device (no host sync).

A heavy token has more gate nonzeros than the epilogue's per-token capacity (`ell_width`), so
its cold activations are not in the ELL (its cnt is 0). These kernels recompute its cold part
densely from x and the weights. The list of heavy rows (`heavy_list`, first `n_heavy[0]`
entries valid) is written on the device by the split kernel, and every kernel reads the count
from memory: when there are no heavy rows they exit at once, and the layer never needs the
count on the host, so the forward+backward stays free of host syncs (CUDA-graph capturable).

  forward : y[r] += sum_{j cold, g_rj > 0} g_rj u_rj W_d^T[j];  l1row[r] += sum_j |h_rj|
  dx      : dx[r] += sum_j du_rj W_u[j] + dg_rj W_g[j]
  dW      : dW_u[j] += sum_r du_rj x_r,  dW_g[j] += sum_r dg_rj x_r,  dW_d^T[j] += sum_r h_rj dy_r
  with dh = dy_r . W_d^T[j] + scale * sign(h), du = dh g, dg = dh u on active (j, r), as the
  cold ELL kernels and the reference do.

Nothing is stored per heavy row, so there is no capacity to overflow: a program owns a block of
BR heavy rows and a slice of D, and recomputes g and u over all of H for them (the work is
repeated once per D slice). That costs about 1 ms per kernel on an H100 whenever heavy rows
exist (one program streams all of W_g and W_u; 4 dense rows in 16384 tokens take the training
step from 2.7 to 5.6 ms), against one empty launch when there are none; the
weight-gradient kernel instead owns a (neuron block, D slice) tile and loops over the heavy
rows, so its tiles are private (no atomics) and only touched when heavy rows exist.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET


@triton.jit
def _dot(a, b, acc, F32: tl.constexpr):
    if F32:    # fp32 operands (fp32 inputs, and the interpreter, whose 16-bit dot is wrong)
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _gate_up(x_ptr, wg_ptr, wu_ptr, dy_ptr, wdt_ptr, rows, r_ok, hj, h_ok, D,
             BR: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, WITH_E: tl.constexpr,
             F32: tl.constexpr):
    """[BR, BH] fp32 each: g = x W_g^T, u = x W_u^T and (WITH_E) e = dy W_d, for the token rows
    `rows` and the neurons `hj`, accumulated over all of D (weights read as [BK, BH] tiles)."""
    g = tl.zeros((BR, BH), dtype=tl.float32)
    u = tl.zeros((BR, BH), dtype=tl.float32)
    e = tl.zeros((BR, BH), dtype=tl.float32)
    for k0 in range(0, D, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < D
        a_m = r_ok[:, None] & k_ok[None, :]
        w_off = hj[None, :] * D + rk[:, None]
        w_m = k_ok[:, None] & h_ok[None, :]
        xa = tl.load(x_ptr + rows[:, None] * D + rk[None, :], mask=a_m, other=0.0)
        g = _dot(xa, tl.load(wg_ptr + w_off, mask=w_m, other=0.0), g, F32)
        u = _dot(xa, tl.load(wu_ptr + w_off, mask=w_m, other=0.0), u, F32)
        if WITH_E:
            da = tl.load(dy_ptr + rows[:, None] * D + rk[None, :], mask=a_m, other=0.0)
            e = _dot(da, tl.load(wdt_ptr + w_off, mask=w_m, other=0.0), e, F32)
    return g, u, e


@triton.jit
def _active(g, u, e, cold_ptr, hj, h_ok, r_ok, scale):
    """h on the cold active (row, neuron) pairs, and du, dg with the L1 term folded in."""
    cold = tl.load(cold_ptr + hj, mask=h_ok, other=0) != 0
    on = (g > 0) & cold[None, :] & r_ok[:, None]
    h = tl.where(on, g * u, 0.0)
    # sign(h) = sign(u) where g > 0; d|h|/dh at h == 0 is 0, like torch.abs
    sgn = tl.where(u > 0, 1.0, tl.where(u < 0, -1.0, 0.0))
    dh = e + scale * sgn
    return h, tl.where(on, dh * g, 0.0), tl.where(on, dh * u, 0.0)


@triton.jit
def _heavy_rows_kernel(x_ptr, wg_ptr, wu_ptr, wdt_ptr, dy_ptr, cold_ptr, list_ptr, nheavy_ptr,
                       out_ptr, l1_ptr, scale_ptr, D, H,
                       BR: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
                       BWD: tl.constexpr, F32: tl.constexpr):
    # Program (p, d slice): heavy-row blocks p, p + P, ...; for each, a [BR, BD] accumulator
    # over all neuron blocks. Forward: out = y, += h W_d^T. Backward: out = dx, += du W_u + dg W_g.
    R = tl.load(nheavy_ptr)
    rd = tl.program_id(1) * BD + tl.arange(0, BD)
    d_ok = rd < D
    scale = 0.0
    if BWD:
        scale = tl.load(scale_ptr)
    for r0 in range(tl.program_id(0) * BR, R, tl.num_programs(0) * BR):
        ri = r0 + tl.arange(0, BR)
        r_ok = ri < R
        rows = tl.load(list_ptr + ri, mask=r_ok, other=0).to(tl.int64)
        acc = tl.zeros((BR, BD), dtype=tl.float32)
        l1 = tl.zeros((BR,), dtype=tl.float32)
        for h0 in range(0, H, BH):
            hj = h0 + tl.arange(0, BH)
            h_ok = hj < H
            g, u, e = _gate_up(x_ptr, wg_ptr, wu_ptr, dy_ptr, wdt_ptr, rows, r_ok, hj, h_ok, D,
                               BR, BH, BK, BWD, F32)
            h, du, dg = _active(g, u, e, cold_ptr, hj, h_ok, r_ok, scale)
            o_off = hj[:, None] * D + rd[None, :]
            o_m = h_ok[:, None] & d_ok[None, :]
            if BWD:
                wu = tl.load(wu_ptr + o_off, mask=o_m, other=0.0)
                wg = tl.load(wg_ptr + o_off, mask=o_m, other=0.0)
                acc = _dot(du.to(wu.dtype), wu, acc, F32)
                acc = _dot(dg.to(wg.dtype), wg, acc, F32)
            else:
                wd = tl.load(wdt_ptr + o_off, mask=o_m, other=0.0)
                acc = _dot(h.to(wd.dtype), wd, acc, F32)
                l1 += tl.sum(tl.abs(h), axis=1)
        o = out_ptr + rows[:, None] * D + rd[None, :]
        m = r_ok[:, None] & d_ok[None, :]
        acc += tl.load(o, mask=m, other=0.0).to(tl.float32)
        tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=m)
        if not BWD:
            # every D slice computes the same l1; slice 0 adds it (to the hot panel's part)
            l1_m = r_ok & (tl.program_id(1) == 0)
            tl.store(l1_ptr + rows, l1 + tl.load(l1_ptr + rows, mask=l1_m, other=0.0), mask=l1_m)


@triton.jit
def _heavy_wgrad_kernel(x_ptr, wg_ptr, wu_ptr, wdt_ptr, dy_ptr, cold_ptr, list_ptr, nheavy_ptr,
                        scale_ptr, dwg_ptr, dwu_ptr, dwdt_ptr, D, H,
                        BR: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
                        F32: tl.constexpr):
    # Program (neuron block, D slice) owns those tiles of dW_u, dW_g and dW_d^T and loops over
    # the heavy rows: private tiles, no atomics. Without heavy rows it touches nothing.
    R = tl.load(nheavy_ptr)
    if R > 0:
        hj = tl.program_id(0) * BH + tl.arange(0, BH)
        h_ok = hj < H
        rd = tl.program_id(1) * BD + tl.arange(0, BD)
        d_ok = rd < D
        scale = tl.load(scale_ptr)
        acc_u = tl.zeros((BH, BD), dtype=tl.float32)
        acc_g = tl.zeros((BH, BD), dtype=tl.float32)
        acc_d = tl.zeros((BH, BD), dtype=tl.float32)
        for r0 in range(0, R, BR):
            ri = r0 + tl.arange(0, BR)
            r_ok = ri < R
            rows = tl.load(list_ptr + ri, mask=r_ok, other=0).to(tl.int64)
            g, u, e = _gate_up(x_ptr, wg_ptr, wu_ptr, dy_ptr, wdt_ptr, rows, r_ok, hj, h_ok, D,
                               BR, BH, BK, True, F32)
            h, du, dg = _active(g, u, e, cold_ptr, hj, h_ok, r_ok, scale)
            a_off = rows[:, None] * D + rd[None, :]
            a_m = r_ok[:, None] & d_ok[None, :]
            xr = tl.load(x_ptr + a_off, mask=a_m, other=0.0)
            dyr = tl.load(dy_ptr + a_off, mask=a_m, other=0.0)
            acc_u = _dot(tl.trans(du).to(xr.dtype), xr, acc_u, F32)
            acc_g = _dot(tl.trans(dg).to(xr.dtype), xr, acc_g, F32)
            acc_d = _dot(tl.trans(h).to(dyr.dtype), dyr, acc_d, F32)
        o_off = hj[:, None] * D + rd[None, :]
        o_m = h_ok[:, None] & d_ok[None, :]
        _add_tile(dwu_ptr + o_off, acc_u, o_m)
        _add_tile(dwg_ptr + o_off, acc_g, o_m)
        _add_tile(dwdt_ptr + o_off, acc_d, o_m)


@triton.jit
def _add_tile(ptrs, acc, mask):
    cur = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, (cur + acc).to(ptrs.dtype.element_ty), mask=mask)


def _config():
    if INTERPRET:
        return dict(BR=16, BH=16, BK=16, BD=16)
    return dict(BR=16, BH=64, BK=64, BD=128)


# Programs per D slice walking the heavy-row blocks (persistent): enough to spread a few
# hundred heavy rows, few enough that the no-heavy-row case is one cheap launch.
ROW_PROGRAMS = 8


def _f32(t):
    return INTERPRET or t.dtype == torch.float32


def _rows_kernel(x, dy, w_gate, w_up, w_down_t, cold_i8, heavy_list, n_heavy, out, l1row, scale, bwd):
    M, D = x.shape
    H = w_gate.shape[0]
    c = _config()
    grid = (ROW_PROGRAMS, triton.cdiv(D, c["BD"]))
    if M and D and H:
        _heavy_rows_kernel[grid](x, w_gate, w_up, w_down_t, dy, cold_i8, heavy_list, n_heavy, out, l1row,
                                 scale, D, H, **c, BWD=bwd, F32=_f32(x))
    return c


def heavy_forward(x, w_gate, w_up, w_down_t, cold_i8, heavy_list, n_heavy, y, l1row):
    """y[r] += the cold part of heavy row r; l1row[r] += its cold L1 (in place, device count)."""
    _rows_kernel(x, x, w_gate, w_up, w_down_t, cold_i8, heavy_list, n_heavy, y, l1row, l1row, bwd=False)


def heavy_backward(x, dy, w_gate, w_up, w_down_t, cold_i8, heavy_list, n_heavy, scale,
                   dx, dw_gate, dw_up, dw_down_t):
    """Adds the heavy rows' cold part to dx, dW_g, dW_u and dW_d^T in place (device count)."""
    c = _rows_kernel(x, dy, w_gate, w_up, w_down_t, cold_i8, heavy_list, n_heavy, dx, scale, scale, bwd=True)
    M, D = x.shape
    H = w_gate.shape[0]
    if M and D and H:
        grid = (triton.cdiv(H, c["BH"]), triton.cdiv(D, c["BD"]))
        _heavy_wgrad_kernel[grid](x, w_gate, w_up, w_down_t, dy, cold_i8, heavy_list, n_heavy, scale,
                                  dw_gate, dw_up, dw_down_t, D, H, **c, F32=_f32(x))


def reference(x, dy, w_gate, w_up, w_down_t, cold_mask, rows, scale):
    """fp32 (y_add [R, D], l1 [R], dx_add [R, D], dW_g, dW_u, dW_d^T [H, D]) of the rows `rows`."""
    xr, dyr = x[rows].float(), dy[rows].float()
    g, u = xr @ w_gate.float().t(), xr @ w_up.float().t()
    on = (g > 0) & cold_mask[None, :]
    h = torch.where(on, g * u, 0.0)
    dh = dyr @ w_down_t.float().t() + scale.float() * torch.sign(u)
    du, dg = torch.where(on, dh * g, 0.0), torch.where(on, dh * u, 0.0)
    return (h @ w_down_t.float(), h.abs().sum(1), du @ w_up.float() + dg @ w_gate.float(),
            dg.t() @ xr, du.t() @ xr, h.t() @ dyr)
