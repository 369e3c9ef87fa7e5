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

Two paths, both in every launch, split by the heavy row's position in the list:
  * the first F heavy rows, F = max(FAST_ROWS, M / 512) rounded up to a whole row block, go
    through a scratch of [F, H]: _heavy_act_kernel spreads (row block, neuron block) tiles over
    the GPU and writes h (forward), or h, du and dg (backward), for the cold active pairs; then
    the output kernels read the scratch. A layer whose ELL width can still grow keeps its heavy
    tokens under M/512 (format.next_auto_width), so F holds them all; only a layer at the largest
    width with more fully dense tokens than that goes past it. Before this path, one program per
    D slice recomputed g and u over all of H, so 16 programs streamed W_g and W_u 16 times over:
    ~1 ms per kernel for any number of heavy rows up to 16, ~3 ms per training step (NOTES.md
    round 7);
  * rows past F keep that recomputing path: a program owns a block of BR heavy rows and a
    slice of D, and recomputes g and u over all of H for them (the work is repeated once per D
    slice). Nothing is stored per row, so there is no capacity to overflow.
The weight-gradient kernel owns a (neuron block, D slice) tile and loops over the heavy rows,
reading the scratch for the first F rows and recomputing the rest, so its tiles are private
(no atomics). Both paths sum in the same order (neuron blocks of BH, in order), so a row gives
the same bits on either path under the interpreter and in fp32 on an H100; in bf16 the H100 put
one element of y in 76,800 one ulp apart, with dx and the weight gradients equal (tests). Without
heavy rows every kernel exits at once.
"""
from __future__ import annotations

import os

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
def _row_block(list_ptr, r0, n, BR: tl.constexpr):
    """Heavy-list positions r0 .. r0 + BR - 1 (valid below n) and their token rows."""
    ri = r0 + tl.arange(0, BR)
    r_ok = ri < n
    return ri, r_ok, tl.load(list_ptr + ri, mask=r_ok, other=0).to(tl.int64)


@triton.jit
def _scratch_tile(ri, r_ok, hj, h_ok, H):
    """Offsets and mask of the scratch tile [list positions ri, neurons hj]."""
    return ri[:, None].to(tl.int64) * H + hj[None, :], r_ok[:, None] & h_ok[None, :]


@triton.jit
def _x_dy_rows(x_ptr, dy_ptr, rows, r_ok, rd, d_ok, D):
    """x and dy of the token rows `rows`, columns rd."""
    off = rows[:, None] * D + rd[None, :]
    m = r_ok[:, None] & d_ok[None, :]
    return tl.load(x_ptr + off, mask=m, other=0.0), tl.load(dy_ptr + off, mask=m, other=0.0)


@triton.jit
def _heavy_act_kernel(x_ptr, wg_ptr, wu_ptr, wdt_ptr, dy_ptr, cold_ptr, list_ptr, nheavy_ptr, scale_ptr,
                      sh_ptr, sdu_ptr, sdg_ptr, sl1_ptr, D, H, NHB, FAST,
                      BR: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, BWD: tl.constexpr,
                      F32: tl.constexpr):
    # Program (row block, neuron block) of the first FAST heavy rows: h (and du, dg) of its tile
    # into the scratch, rows by list position. Forward also writes the tile's L1 per row.
    R = tl.minimum(tl.load(nheavy_ptr), FAST)
    r0 = tl.program_id(0) * BR
    if r0 < R:
        ri, r_ok, rows = _row_block(list_ptr, r0, R, BR)
        hj = tl.program_id(1) * BH + tl.arange(0, BH)
        h_ok = hj < H
        scale = 0.0
        if BWD:
            scale = tl.load(scale_ptr)
        g, u, e = _gate_up(x_ptr, wg_ptr, wu_ptr, dy_ptr, wdt_ptr, rows, r_ok, hj, h_ok, D,
                           BR, BH, BK, BWD, F32)
        h, du, dg = _active(g, u, e, cold_ptr, hj, h_ok, r_ok, scale)
        s_off, s_m = _scratch_tile(ri, r_ok, hj, h_ok, H)
        tl.store(sh_ptr + s_off, h.to(sh_ptr.dtype.element_ty), mask=s_m)
        if BWD:
            tl.store(sdu_ptr + s_off, du.to(sdu_ptr.dtype.element_ty), mask=s_m)
            tl.store(sdg_ptr + s_off, dg.to(sdg_ptr.dtype.element_ty), mask=s_m)
        else:
            tl.store(sl1_ptr + ri * NHB + tl.program_id(1), tl.sum(tl.abs(h), axis=1), mask=r_ok)


@triton.jit
def _heavy_rows_kernel(x_ptr, wg_ptr, wu_ptr, wdt_ptr, dy_ptr, cold_ptr, list_ptr, nheavy_ptr,
                       out_ptr, l1_ptr, scale_ptr, sh_ptr, sdu_ptr, sdg_ptr, sl1_ptr, D, H, NHB, FAST,
                       FAST_PROGS: tl.constexpr, BR: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
                       BD: tl.constexpr, BWD: tl.constexpr, F32: tl.constexpr):
    # Programs 0 .. FAST_PROGS-1 of axis 0: row block p of the first FAST heavy rows, from the
    # scratch. The others: heavy-row blocks past FAST, persistent, recomputing g and u. Each has a
    # [BR, BD] accumulator over all neuron blocks. Forward: out = y, += h W_d^T. Backward:
    # out = dx, += du W_u + dg W_g.
    R = tl.load(nheavy_ptr)
    rd = tl.program_id(1) * BD + tl.arange(0, BD)
    d_ok = rd < D
    pid = tl.program_id(0)
    if pid < FAST_PROGS:
        RF = tl.minimum(R, FAST)
        r0 = pid * BR
        if r0 < RF:
            ri, r_ok, rows = _row_block(list_ptr, r0, RF, BR)
            acc = tl.zeros((BR, BD), dtype=tl.float32)
            l1 = tl.zeros((BR,), dtype=tl.float32)
            for h0 in range(0, H, BH):
                hj = h0 + tl.arange(0, BH)
                h_ok = hj < H
                s_off, s_m = _scratch_tile(ri, r_ok, hj, h_ok, H)
                o_off = hj[:, None] * D + rd[None, :]
                o_m = h_ok[:, None] & d_ok[None, :]
                if BWD:
                    acc = _dot(tl.load(sdu_ptr + s_off, mask=s_m, other=0.0),
                               tl.load(wu_ptr + o_off, mask=o_m, other=0.0), acc, F32)
                    acc = _dot(tl.load(sdg_ptr + s_off, mask=s_m, other=0.0),
                               tl.load(wg_ptr + o_off, mask=o_m, other=0.0), acc, F32)
                else:
                    acc = _dot(tl.load(sh_ptr + s_off, mask=s_m, other=0.0),
                               tl.load(wdt_ptr + o_off, mask=o_m, other=0.0), acc, F32)
            if not BWD:
                for hb in range(0, NHB):   # in neuron-block order, as the slow path sums it
                    l1 += tl.load(sl1_ptr + ri * NHB + hb, mask=r_ok, other=0.0)
            _add_rows(out_ptr, l1_ptr, rows, r_ok, rd, d_ok, acc, l1, D, BWD)
    else:
        scale = 0.0
        if BWD:
            scale = tl.load(scale_ptr)
        for r0 in range(FAST + (pid - FAST_PROGS) * BR, R, (tl.num_programs(0) - FAST_PROGS) * BR):
            ri, r_ok, rows = _row_block(list_ptr, r0, R, BR)
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
            _add_rows(out_ptr, l1_ptr, rows, r_ok, rd, d_ok, acc, l1, D, BWD)


@triton.jit
def _add_rows(out_ptr, l1_ptr, rows, r_ok, rd, d_ok, acc, l1, D, BWD: tl.constexpr):
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
                        scale_ptr, dwg_ptr, dwu_ptr, dwdt_ptr, sh_ptr, sdu_ptr, sdg_ptr, D, H, FAST,
                        BR: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
                        F32: tl.constexpr):
    # Program (neuron block, D slice) owns those tiles of dW_u, dW_g and dW_d^T and loops over
    # the heavy rows: private tiles, no atomics. The first FAST rows' h, du, dg come from the
    # scratch; later rows recompute them. Without heavy rows it touches nothing.
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
        RF = tl.minimum(R, FAST)
        for r0 in range(0, RF, BR):
            ri, r_ok, rows = _row_block(list_ptr, r0, RF, BR)
            s_off, s_m = _scratch_tile(ri, r_ok, hj, h_ok, H)
            xr, dyr = _x_dy_rows(x_ptr, dy_ptr, rows, r_ok, rd, d_ok, D)
            acc_u = _dot(tl.trans(tl.load(sdu_ptr + s_off, mask=s_m, other=0.0)), xr, acc_u, F32)
            acc_g = _dot(tl.trans(tl.load(sdg_ptr + s_off, mask=s_m, other=0.0)), xr, acc_g, F32)
            acc_d = _dot(tl.trans(tl.load(sh_ptr + s_off, mask=s_m, other=0.0)), dyr, acc_d, F32)
        for r0 in range(FAST, R, BR):
            ri, r_ok, rows = _row_block(list_ptr, r0, R, BR)
            g, u, e = _gate_up(x_ptr, wg_ptr, wu_ptr, dy_ptr, wdt_ptr, rows, r_ok, hj, h_ok, D,
                               BR, BH, BK, True, F32)
            h, du, dg = _active(g, u, e, cold_ptr, hj, h_ok, r_ok, scale)
            xr, dyr = _x_dy_rows(x_ptr, dy_ptr, rows, r_ok, rd, d_ok, D)
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
        return dict(BR=_ROW_BLOCK, BH=16, BK=16, BD=16)
    return dict(BR=_ROW_BLOCK, BH=64, BK=64, BD=128)


# Programs per D slice walking the heavy-row blocks past FAST_ROWS (persistent): enough to spread a
# few hundred heavy rows, few enough that the no-heavy-row case is one cheap launch.
ROW_PROGRAMS = 8
# Heavy rows served from the scratch, at least (three [F, H] buffers in backward: 2.1 MB in bf16
# at F=64, H=5632); F also covers M/512 heavy rows, the most a layer keeps while its ELL width can
# grow. A multiple of the row block (16), so the rows past F are blocked as the recomputing path
# alone would block them, and both give the same bits.
# HYBRID_HEAVY_FAST_ROWS=0 gives the recomputing path alone (the design before round 7), to measure.
_ROW_BLOCK = 16


def _fast_rows_setting(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"HYBRID_HEAVY_FAST_ROWS={text!r} must be an integer >= 0 (heavy rows served "
                         f"from the scratch; 0 = the recomputing path alone)") from None
    if n < 0:
        raise ValueError(f"HYBRID_HEAVY_FAST_ROWS={n} must be >= 0 (0 = the recomputing path alone)")
    return -(-n // _ROW_BLOCK) * _ROW_BLOCK


FAST_ROWS = _fast_rows_setting(os.environ.get("HYBRID_HEAVY_FAST_ROWS", "64"))


def fast_rows(m: int) -> int:
    """F for a call of m tokens (0 if FAST_ROWS is 0): see FAST_ROWS."""
    if FAST_ROWS == 0:
        return 0
    f = max(FAST_ROWS, -(-m // 512))
    return min(-(-f // _ROW_BLOCK) * _ROW_BLOCK, m)


def _f32(t):
    return INTERPRET or t.dtype == torch.float32


def _scratch(x, H, bwd, c):
    """(fast rows, h, du, dg, l1 partials, neuron blocks): the scratch for the first fast_rows(M)
    heavy rows. This runs on every call, heavy rows or not, so it is one allocation (views of one
    byte buffer) and no kernel. du and dg are only used in backward, the L1 partials in forward;
    the unused ones are empty views."""
    rows = fast_rows(x.shape[0])
    nhb = triton.cdiv(H, c["BH"])
    n_vals = 3 if bwd else 1
    val_bytes = rows * H * x.element_size()
    l1_at = -(-(n_vals * val_bytes) // 16) * 16            # the fp32 partials start 16-byte aligned
    l1_bytes = 0 if bwd else rows * nhb * 4
    buf = torch.empty(max(l1_at + l1_bytes, 16), dtype=torch.uint8, device=x.device)
    vals = [buf[i * val_bytes:(i + 1) * val_bytes].view(x.dtype).view(rows, H) for i in range(n_vals)]
    empty = buf[:0].view(x.dtype)
    sh, sdu, sdg = vals if bwd else (vals[0], empty, empty)
    sl1 = empty if bwd else buf[l1_at:l1_at + l1_bytes].view(torch.float32).view(rows, nhb)
    return rows, sh, sdu, sdg, sl1, nhb


def _rows_kernels(x, dy, w_gate, w_up, w_down_t, cold_i8, heavy_list, n_heavy, out, l1row, scale, bwd):
    M, D = x.shape
    H = w_gate.shape[0]
    c = _config()
    # the scratch holds h, du, dg in x's dtype, which the dots then meet as the weights' dtype
    if not (x.dtype == dy.dtype == w_gate.dtype == w_up.dtype == w_down_t.dtype):
        raise ValueError(f"heavy rows: x, dy and the weights must share one dtype, got x {x.dtype}, dy {dy.dtype}, "
                         f"w_gate {w_gate.dtype}, w_up {w_up.dtype}, w_down_t {w_down_t.dtype}")
    fast, sh, sdu, sdg, sl1, nhb = _scratch(x, H, bwd, c)
    if M and D and H:
        fast_progs = triton.cdiv(fast, c["BR"])
        if fast_progs:
            _heavy_act_kernel[(fast_progs, nhb)](x, w_gate, w_up, w_down_t, dy, cold_i8, heavy_list, n_heavy, scale,
                                                 sh, sdu, sdg, sl1, D, H, nhb, fast, BR=c["BR"], BH=c["BH"],
                                                 BK=c["BK"], BWD=bwd, F32=_f32(x))
        grid = (fast_progs + ROW_PROGRAMS, triton.cdiv(D, c["BD"]))
        _heavy_rows_kernel[grid](x, w_gate, w_up, w_down_t, dy, cold_i8, heavy_list, n_heavy, out, l1row,
                                 scale, sh, sdu, sdg, sl1, D, H, nhb, fast, FAST_PROGS=fast_progs, **c, BWD=bwd,
                                 F32=_f32(x))
    return c, fast, sh, sdu, sdg


def heavy_forward(x, w_gate, w_up, w_down_t, cold_i8, heavy_list, n_heavy, y, l1row):
    """y[r] += the cold part of heavy row r; l1row[r] += its cold L1 (in place, device count)."""
    _rows_kernels(x, x, w_gate, w_up, w_down_t, cold_i8, heavy_list, n_heavy, y, l1row, l1row, bwd=False)


def heavy_backward(x, dy, w_gate, w_up, w_down_t, cold_i8, heavy_list, n_heavy, scale,
                   dx, dw_gate, dw_up, dw_down_t):
    """Adds the heavy rows' cold part to dx, dW_g, dW_u and dW_d^T in place (device count)."""
    c, fast, sh, sdu, sdg = _rows_kernels(x, dy, w_gate, w_up, w_down_t, cold_i8, heavy_list, n_heavy, dx,
                                          scale, scale, bwd=True)
    M, D = x.shape
    H = w_gate.shape[0]
    if M and D and H:
        grid = (triton.cdiv(H, c["BH"]), triton.cdiv(D, c["BD"]))
        _heavy_wgrad_kernel[grid](x, w_gate, w_up, w_down_t, dy, cold_i8, heavy_list, n_heavy, scale,
                                  dw_gate, dw_up, dw_down_t, sh, sdu, sdg, D, H, fast, **c, F32=_f32(x))


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
