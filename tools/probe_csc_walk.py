#!/usr/bin/env python3
"""What bounds the CSC weight-gradient walk (kernels/hybrid/csc_wgrad.py) on the GPU?

The walk moves the same bytes per step as the row walks (ell_sddmm/ell_spmm: one 4 KB row per
activation) but ran at about half their rate. This probe times, in one process, the walk as it
was before commit c6eda80 ("copy": DUAL, dW_u + dW_g, reading each step's slot, its token as
slot // width and du, dg at the ELL slot) against copies of it with one ingredient removed:
  no_coef : coefficients are the constant 1 (no random 4-byte loads of du/dg at the slot);
  no_row  : the gathered row is always row 0 (no random 4 KB gathers: L1/L2-resident);
  csc_order: the production walk, on token ids and coefficients put in CSC order first
             (csc_order, contiguous per neuron; its own time is listed apart);
  sorted  : slots sorted by token within each neuron (locality of the gathers across programs);
  capped  : segments cut to at most 48 tokens (a shorter dependent chain per program);
and the row walk (ell_spmm with two weight streams, the backward dx) on the same pattern.
Prints JSON; writes $BENCH_RESULTS_DIR/probe_csc_walk.json if set.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels.hybrid.csc_wgrad import csc_order, csc_wgrad  # noqa: E402
from kernels.hybrid.ell_sddmm import ell_sddmm, ell_sddmm_bwd  # noqa: E402
from kernels.hybrid.ell_spmm import ell_spmm  # noqa: E402
from kernels.hybrid.format import build_pattern  # noqa: E402
from bench_common import add_ffn_case_args, ffn_training_case  # noqa: E402


@triton.jit
def _walk(a_ptr, ptr_ptr, slot_ptr, c1_ptr, c2_ptr, out1_ptr, out2_ptr, D, width,
          BLOCK_D: tl.constexpr, NO_COEF: tl.constexpr, NO_ROW: tl.constexpr):
    j = tl.program_id(0).to(tl.int64)
    rd = tl.arange(0, BLOCK_D)
    d_ok = rd < D
    start = tl.load(ptr_ptr + j)
    n = tl.load(ptr_ptr + j + 1) - start
    acc1 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    slot = tl.load(slot_ptr + start, mask=n > 0, other=0).to(tl.int64)
    tok = slot // width
    if NO_ROW:
        tok = tok * 0
    ac = tl.load(a_ptr + tok * D + rd, mask=d_ok & (n > 0), other=0.0)
    if NO_COEF:
        c1c = tl.full((), 1.0, tl.float32)
        c2c = tl.full((), 1.0, tl.float32)
    else:
        c1c = tl.load(c1_ptr + slot, mask=n > 0, other=0.0)
        c2c = tl.load(c2_ptr + slot, mask=n > 0, other=0.0)
    slot_n = tl.load(slot_ptr + start + 1, mask=n > 1, other=0).to(tl.int64)
    for i in range(0, n):
        ok_n = i + 1 < n
        tok_n = slot_n // width
        if NO_ROW:
            tok_n = tok_n * 0
        an = tl.load(a_ptr + tok_n * D + rd, mask=d_ok & ok_n, other=0.0)
        if NO_COEF:
            c1n = tl.full((), 1.0, tl.float32)
            c2n = tl.full((), 1.0, tl.float32)
        else:
            c1n = tl.load(c1_ptr + slot_n, mask=ok_n, other=0.0)
            c2n = tl.load(c2_ptr + slot_n, mask=ok_n, other=0.0)
        slot_n = tl.load(slot_ptr + start + i + 2, mask=i + 2 < n, other=0).to(tl.int64)
        av = ac.to(tl.float32)
        acc1 += c1c * av
        acc2 += c2c * av
        ac, c1c, c2c = an, c1n, c2n
    o = j * D + rd
    tl.store(out1_ptr + o, acc1.to(out1_ptr.dtype.element_ty), mask=d_ok)
    tl.store(out2_ptr + o, acc2.to(out2_ptr.dtype.element_ty), mask=d_ok)


def main():
    ap = argparse.ArgumentParser()
    add_ffn_case_args(ap, steps=0)     # (--steps unused here)
    args = ap.parse_args()
    M, D, H = args.M, args.D, args.H
    params, dy = ffn_training_case(args)
    x, wg, wu, wd = (t.detach() for t in params)
    pat = build_pattern(x, wg, 256, 0.01)
    wdt = wd.t().contiguous()
    u, _ = ell_sddmm(x, wu, pat.idx, pat.cnt, g=pat.g)
    scale = torch.tensor(1e-6, device="cuda")
    du, dg = ell_sddmm_bwd(dy, wdt, pat.idx, pat.cnt, pat.g, u, scale)
    W = pat.width
    ptr, slot = pat.csc_ptr, pat.csc_slot
    seg = (ptr[1:] - ptr[:-1]).long()
    out1, out2 = torch.empty(H, D, device="cuda", dtype=torch.bfloat16), torch.empty(H, D, device="cuda", dtype=torch.bfloat16)
    # token-sorted slots within each neuron
    nnz = int(ptr[-1])
    owner = torch.repeat_interleave(torch.arange(H, device="cuda"), seg)
    s = slot[:nnz].long()
    order = torch.argsort(owner * (M * W) + s)
    slot_sorted = slot.clone()
    slot_sorted[:nnz] = s[order].to(slot.dtype)
    # segments capped at 48 tokens (fewer activations: reported per step)
    cap = 48
    seg_c = seg.clamp(max=cap)
    ptr_c = torch.zeros_like(ptr)
    ptr_c[1:] = torch.cumsum(seg_c, 0).to(ptr.dtype)
    keep = (torch.arange(nnz, device="cuda") - ptr[:-1].long()[owner]) < cap
    slot_c = slot.clone()
    slot_c[:int(ptr_c[-1])] = slot[:nnz][keep]

    def walk(p, sl, no_coef=False, no_row=False):
        return lambda: _walk[(H,)](x, p, sl, du, dg, out1, out2, D, W, BLOCK_D=triton.next_power_of_2(D), NO_COEF=no_coef,
                                   NO_ROW=no_row, num_warps=4)

    tok_csc, du_csc, dg_csc = csc_order(ptr, slot, W, du, dg)
    y = torch.empty_like(x)
    t = {
        "csc_order": lambda: csc_wgrad(x, ptr, tok_csc, H, du_csc, dg_csc),
        "csc_order's reordering alone": lambda: csc_order(ptr, slot, W, du, dg),
        "copy": walk(ptr, slot),
        "no_coef": walk(ptr, slot, no_coef=True),
        "no_row": walk(ptr, slot, no_row=True),
        "no_coef_no_row": walk(ptr, slot, True, True),
        "sorted": walk(ptr, slot_sorted),
        "capped48": walk(ptr_c, slot_c),
        "row walk ell_spmm dx (2 streams)": lambda: ell_spmm(y, pat.idx, pat.cnt, du, wu, c2=dg, w2=wg),
        "row walk ell_sddmm fwd": lambda: ell_sddmm(x, wu, pat.idx, pat.cnt),
    }
    out = {"gpu": torch.cuda.get_device_name(), "steps": nnz, "steps_capped": int(ptr_c[-1]),
           "max_segment": int(seg.max()), "ms": {}}
    for k, f in t.items():
        out["ms"][k] = triton.testing.do_bench(f, return_mode="median")
        print(k, round(out["ms"][k], 4), flush=True)
    ref1, ref2 = csc_wgrad(x, ptr, tok_csc, H, du_csc, dg_csc)
    t["copy"]()
    out["csc_order_vs_copy_max_abs_diff"] = max(float((ref1.float() - out1.float()).abs().max()),
                                                float((ref2.float() - out2.float()).abs().max()))
    print(json.dumps(out, indent=1))
    if os.environ.get("BENCH_RESULTS_DIR"):
        Path(os.environ["BENCH_RESULTS_DIR"], "probe_csc_walk.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
