"""SparseGatedMLPFunction: the training autograd.Function over the hybrid format, and its reference.

Forward (x [M, D], W_g/W_u [H, D], W_d [D, H]):
  gate GEMM + pack (cuBLAS + Triton row pack, or the fused Triton epilogue) -> HybridPattern
  (the hot-panel size K is remembered from an earlier call: no host sync, see format.py)
  hot panel:   g_h = the hot columns of the gate (copied by the pack pass), u_h = x W_u[hot]^T
               (cuBLAS; [g_h | u_h] in one GEMM when the packer gives no g_h), h_h = relu(g_h) u_h
               y = h_h W_d[:, hot]^T                      (cuBLAS)
  cold ELL:    u = SDDMM(x, W_u) at the pattern            (Triton)
               y += (g u) W_d^T via gathered rows           (Triton, accumulates into y)
  heavy rows:  recomputed densely over cold neurons in forward and backward by Triton kernels
               that read the heavy-row count on the device (heavy_rows.py; usually none)
Backward: the hot panel's four GEMMs (cuBLAS, its elementwise part in one kernel), du/dg at the
cold slots (SDDMM), dx (SpMM), then the coefficients and tokens put in CSC order once and the
three weight gradients walked per neuron (csc_wgrad.py).
Saved for backward: x and W_g, W_u (the caller holds them anyway), W_d^T (a transposed copy,
cheaper to keep than to redo); kept on ctx (data-dependent shapes, see forward): the cold ELL
(idx, g, u), the CSC view, the heavy-row list, the hot panel g_h, u_h [M, K] and the hot rows
of the weights. Never dense
g, u or h [M, H]. No host sync in forward (after a layer's first call) or backward: the L1 scale
g_l1 / M stays a device tensor read by the kernels.
"""
from __future__ import annotations

import torch

from ._common import check_matrix
from .csc_wgrad import csc_order, csc_wgrad
from .ell_sddmm import ell_sddmm, ell_sddmm_bwd
from .ell_spmm import ell_spmm
from .format import HybridPattern, build_pattern
from .heavy_rows import heavy_backward, heavy_forward
from .hot_panel import gather_hot_rows, hot_backward, hot_forward
from .transpose import transpose

# epilogue capacity per token; heavier tokens take the dense backup. "auto": per layer, the
# smallest of format.AUTO_WIDTHS (256 ... 2048) that held the previous call's heaviest token
DEFAULT_ELL_WIDTH = "auto"
DEFAULT_HOT_FRAC = 0.01   # neurons firing on > 1% of the tokens take the dense hot panel (NOTES.md)


# (Tried and removed, NOTES.md: the hot panel's GEMMs on a side stream beside the gathers,
# variants 7 and 18; the SDDMM and SpMM of each direction fused into one walk, variant 19.)


def _hot_panel_forward(x, w_gate, w_up, w_down_t, pat, l1row):
    """The dense hot panel: (what backward needs, y_h [M, D], l1row with the hot L1 added, or new)."""
    hot, K = pat.hot, pat.hot.numel()
    w_gu_h, wdt_h = gather_hot_rows(hot, w_gate, w_up, w_down_t)  # [2K, D] and [K, D], kept for backward
    if pat.g_hot is not None:     # the pack pass copied g's hot columns: u only
        g_h, u_h = pat.g_hot, x @ w_gu_h[K:].t()
    else:
        gu = x @ w_gu_h.t()                                       # [M, 2K] = [g_h | u_h]
        g_h, u_h = gu[:, :K], gu[:, K:]
    h_h, l1row = hot_forward(g_h, u_h, l1row)
    return (g_h, u_h, w_gu_h, wdt_h), h_h @ wdt_h, l1row


class SparseGatedMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, ell_width=DEFAULT_ELL_WIDTH, hot_frac=DEFAULT_HOT_FRAC):
        M, D = x.shape
        pat: HybridPattern = build_pattern(x, w_gate, ell_width, hot_frac)
        K = pat.hot.numel()
        w_down_t = transpose(w_down)                # [H, D]: row j of W_d^T is contiguous
        hot_saved = (None,) * 4
        # cold u and each token's cold L1 first: the hot panel and heavy rows add to that L1 row
        u, l1row = ell_sddmm(x, w_up, pat.idx, pat.cnt, g=pat.g)
        if K:    # accumulate the cold part straight into the hot result
            hot_saved, y, _ = _hot_panel_forward(x, w_gate, w_up, w_down_t, pat, l1row)
            ell_spmm(y, pat.idx, pat.cnt, pat.g, w_down_t, c3=u, accumulate=True)
        else:
            y = ell_spmm(torch.empty_like(x), pat.idx, pat.cnt, pat.g, w_down_t, c3=u)
        # heavy tokens: their y rows and l1row entries; no-op if none
        heavy_forward(x, w_gate, w_up, w_down_t, pat.cold_mask, pat.heavy, pat.n_heavy, y, l1row)
        l1 = l1row.mean() if M else l1row.sum()     # (one reduction kernel, not a sum and a divide)
        # W_d^T is saved (23 MB at H=5632) rather than re-transposed in backward (~50 us).
        ctx.save_for_backward(x, w_gate, w_up, w_down_t)
        # The pattern and the values on it have data-dependent shapes (K follows the remembered
        # hot count), so a recompute under activation checkpointing may size them
        # differently and torch.utils.checkpoint would reject the mismatch. They are kept on
        # ctx instead of going through the saved-tensor hooks: checkpointing then never
        # recomputes them, and backward always uses the exact pattern the forward's y came from.
        # They are small next to the dense activations checkpointing frees ([M, width] and
        # [M, 2K] against [M, H]).
        ctx.pattern = (pat.cnt, pat.idx, pat.g, u, pat.csc_ptr, pat.csc_slot, pat.hot, pat.heavy,
                       pat.n_heavy, pat.cold_mask, pat.hot_pos) + hot_saved
        ctx.mark_non_differentiable(pat.fire)
        return y, l1, pat.fire

    @staticmethod
    def backward(ctx, dy, dl1, _dfire):
        x, w_gate, w_up, w_down_t = ctx.saved_tensors
        if ctx.pattern is None:
            raise RuntimeError("backward ran twice through the hybrid sparse MLP; retain_graph=True "
                               "is not supported by this op (its pattern is freed by the first "
                               "backward). Use mlp_backend=torch for double backward.")
        (cnt, idx, g, u, csc_ptr, csc_slot, hot, heavy, n_heavy, cold_mask, hot_pos,
         g_h, u_h, w_gu_h, wdt_h) = ctx.pattern
        ctx.pattern = None   # free it now, not when the caller drops the graph (e.g. next step)
        M, D = x.shape
        H = w_gate.shape[0]
        K, Wc = hot.numel(), idx.shape[1]
        dy = torch.zeros_like(x) if dy is None else dy.contiguous().to(x.dtype)
        scale = (torch.zeros((), device=x.device) if dl1 is None else dl1.float()) / max(M, 1)
        scale = scale.reshape(()).contiguous()
        if K:
            dgdu_h, h_h = hot_backward(g_h, u_h, dy @ wdt_h.t(), scale)      # [M, 2K] = [dg | du]
            dx = dgdu_h @ w_gu_h                                            # w_gu_h = [W_g; W_u][hot]
            dwgu = dgdu_h.t() @ x                                           # [2K, D]
            dwd_h = h_h.t() @ dy                                            # [K, D]
        else:
            dx = torch.empty_like(x)
        # dh, du, dg on the cold slots (L1 term and gating folded in), and their dx
        du, dg = ell_sddmm_bwd(dy, w_down_t, idx, cnt, g, u, scale)
        ell_spmm(dx, idx, cnt, du, w_up, c2=dg, w2=w_gate, accumulate=K > 0)
        # the cold rows through the CSC view (coefficients reordered once, h = g u formed
        # there); the hot rows copied from the panel's GEMMs
        tok, h_c, du_c, dg_c = csc_order(csc_ptr, csc_slot, Wc, (g, u), du, dg)
        del du, dg, g, u, idx, cnt, csc_slot     # the ELL side is done: free it before the [H, D] grads
        dw_up, dw_gate = csc_wgrad(x, csc_ptr, tok, H, du_c, dg_c, out_dtype=w_up.dtype,
                                   hot=(hot, hot_pos, dwgu[K:], dwgu[:K]) if K else None)
        dw_down_t = csc_wgrad(dy, csc_ptr, tok, H, h_c, out_dtype=w_down_t.dtype,
                              hot=(hot, hot_pos, dwd_h, None) if K else None)
        heavy_backward(x, dy, w_gate, w_up, w_down_t, cold_mask, heavy, n_heavy, scale,
                       dx, dw_gate, dw_up, dw_down_t)
        return dx, dw_gate, dw_up, dw_down_t.t(), None, None


def sparse_gated_mlp(x, w_gate, w_up, w_down, *, ell_width: int | str = DEFAULT_ELL_WIDTH,
                     hot_frac: float | None = DEFAULT_HOT_FRAC):
    """(y [M, D], l1 0-dim fp32, fire_counts [H] int32): the hybrid-sparse training MLP.

    ell_width: per-token capacity of the gate epilogue; tokens with more nonzeros go to the dense
    backup (never truncated). "auto" (default): each layer grows or shrinks it between calls to
    hold its heaviest token (format.py). hot_frac: neurons firing on more than this fraction of the tokens
    go to the dense hot panel (None: none). Both change speed only, never the result.
    fire_counts may be a view into a larger int32 buffer of the layer's counters: copy it
    (e.g. torch.stack, .clone()) before keeping or saving it on its own.
    """
    if ell_width != "auto" and (isinstance(ell_width, bool) or not isinstance(ell_width, int) or ell_width < 1):
        raise ValueError(f"ell_width={ell_width!r}; expected a positive int or 'auto'")
    M, D = x.shape if x.dim() == 2 else (None, None)
    x = check_matrix("x", x)
    H = w_gate.shape[0] if w_gate.dim() == 2 else None
    w_gate = check_matrix("w_gate", w_gate, cols=D)
    w_up = check_matrix("w_up", w_up, rows=H, cols=D)
    w_down = check_matrix("w_down", w_down, rows=D, cols=H)
    for name, t in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(f"{name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}; "
                            "cast the weights and activations to one dtype/device")
    return SparseGatedMLPFunction.apply(x, w_gate, w_up, w_down, ell_width, hot_frac)


def sparse_gated_mlp_reference(x, w_gate, w_up, w_down):
    """Pure-torch reference (fp32 math, outputs in x.dtype): same signature and semantics."""
    g = x.float() @ w_gate.float().t()
    u = x.float() @ w_up.float().t()
    h = torch.relu(g) * u
    y = (h @ w_down.float().t()).to(x.dtype)
    l1 = h.abs().sum(1).mean() if x.shape[0] else h.sum()
    fire = (g > 0).sum(0).to(torch.int32)
    return y, l1, fire
