"""Pack a dense gate output g [M, H] (from cuBLAS) into the per-token ELL.

Why this exists next to the fused epilogue (gate_pack.py): on H100 our Triton gate GEMM with
the packing epilogue runs 1.30-1.37 ms at M=16384, D=2048, H=5632, against 0.65 ms for cuBLAS
(NOTES.md). cuBLAS writing bf16 g (184 MB, freed right after) plus this pass (one read of g)
is faster until the fused kernel's main loop is fixed. Same output contract as gate_pack.

Default (CONFIG TWO_PASS): two loop-free kernels over (row block, column chunk) tiles: pass 1
counts each row's nonzeros per chunk (and the per-column fire counts, one int32 atomic per
column), pass 2 sums the row's earlier chunks and ranks each nonzero inside its chunk.
Column-ordered, deterministic ELL.
One-pass alternative: a program owns whole rows and walks the chunks; with SCAN slots come from
a running scan in column order, without, from one int32 atomic per nonzero (order may vary).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET


@triton.jit
def _row_pack_kernel(g_ptr, fire_ptr, cnt_ptr, idx_ptr, val_ptr, M, H, width,
                     BR: tl.constexpr, BH: tl.constexpr, SCAN: tl.constexpr,
                     INTERP: tl.constexpr = False):
    # BR rows per program: one row per program (first version) ran 0.63 ms at M=16384,
    # H=5632 (~0.3 TB/s): 6 dependent scan iterations per program and too little in flight.
    # Addresses are one 64-bit base per program plus 32-bit offsets inside its block (BR*H and
    # BR*width < 2^31): [BR, BH] 64-bit address tensors made the kernel spill (ptxas, sm_90a).
    pid = tl.program_id(0)
    rows = pid * BR + tl.arange(0, BR)
    r_ok = rows < M
    g_blk = g_ptr + pid.to(tl.int64) * BR * H
    out_base = pid.to(tl.int64) * BR * width
    r_g = tl.arange(0, BR)[:, None] * H
    r_o = tl.arange(0, BR)[:, None] * width
    cols = tl.arange(0, BH)
    n = tl.zeros((BR,), dtype=tl.int32)
    if SCAN == 2:
        r = tl.arange(0, BH)
        # (the CPU interpreter's fp16 dot is wrong: it gets the same 0/1 product in fp32)
        tri = (r[:, None] <= r[None, :]).to(tl.float32 if INTERP else tl.float16)
    for h0 in range(0, H, BH):
        c = h0 + cols
        c_ok = c < H
        v = tl.load(g_blk + r_g + c[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.0)
        on = v > 0
        oi = on.to(tl.int32)
        if SCAN == 2:   # column-ordered slots by a tensor-core product with a triangular ones matrix
            pos = n[:, None] + tl.dot(on.to(tri.dtype), tri).to(tl.int32) - 1
        elif SCAN:      # column-ordered, deterministic slots
            pos = n[:, None] + tl.cumsum(oi, axis=1) - 1
        else:      # one atomic per nonzero (~1 per row and chunk): no [BR, BH] scan
            pos = tl.atomic_add(cnt_ptr + rows[:, None] + tl.zeros((BR, BH), dtype=tl.int32),
                                tl.full((BR, BH), 1, tl.int32), mask=on & r_ok[:, None])
        keep = on & (pos < width)
        off = r_o + pos
        tl.store(idx_ptr + out_base + off, c[None, :] + tl.zeros((BR, BH), dtype=tl.int32), mask=keep)
        tl.store(val_ptr + out_base + off, v.to(tl.float32), mask=keep)
        colsum = tl.sum(oi, axis=0)
        tl.atomic_add(fire_ptr + c, colsum, mask=colsum > 0)
        n += tl.sum(oi, axis=1)
    if SCAN:
        tl.store(cnt_ptr + rows, n, mask=r_ok)


@triton.jit
def _chunk_count_kernel(g_ptr, fire_ptr, ccnt_ptr, M, H, n_chunks, BR: tl.constexpr, BH: tl.constexpr):
    # Two-pass pack, pass 1: nonzeros of each (row, BH-column chunk) and the fire counts.
    # One program per (row block, chunk) and no loop: many independent loads in flight, where
    # the one-pass kernel walks 44 chunks serially per program (latency-bound, NOTES.md).
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BH + tl.arange(0, BH)
    r_ok = rows < M
    c_ok = c < H
    v = tl.load(g_ptr + rows.to(tl.int64)[:, None] * H + c[None, :], mask=r_ok[:, None] & c_ok[None, :],
                other=0.0)
    oi = (v > 0).to(tl.int32)
    tl.store(ccnt_ptr + rows.to(tl.int64) * n_chunks + tl.program_id(1), tl.sum(oi, axis=1), mask=r_ok)
    colsum = tl.sum(oi, axis=0)
    tl.atomic_add(fire_ptr + c, colsum, mask=colsum > 0)


@triton.jit
def _chunk_pack_kernel(g_ptr, ccnt_ptr, cnt_ptr, idx_ptr, val_ptr, M, H, width, n_chunks,
                       BR: tl.constexpr, BH: tl.constexpr, NC_P: tl.constexpr):
    # Pass 2: each nonzero's slot = the row's nonzeros in earlier chunks (summed here from pass
    # 1's counts, so no torch cumsum launches in between) + its rank inside the chunk; column
    # order, deterministic, like SCAN. Chunk 0's program also writes the row totals.
    pid_c = tl.program_id(1)
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    c = pid_c * BH + tl.arange(0, BH)
    r_ok = rows < M
    c_ok = c < H
    rows64 = rows.to(tl.int64)
    k = tl.arange(0, NC_P)
    counts = tl.load(ccnt_ptr + rows64[:, None] * n_chunks + k[None, :],
                     mask=r_ok[:, None] & (k < n_chunks)[None, :], other=0)
    base = tl.sum(tl.where(k[None, :] < pid_c, counts, 0), axis=1)
    if pid_c == 0:
        tl.store(cnt_ptr + rows, tl.sum(counts, axis=1), mask=r_ok)
    v = tl.load(g_ptr + rows64[:, None] * H + c[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.0)
    on = v > 0
    pos = base[:, None] + tl.cumsum(on.to(tl.int32), axis=1) - 1
    keep = on & (pos < width)
    off = rows64[:, None] * width + pos
    tl.store(idx_ptr + off, c[None, :] + tl.zeros((BR, BH), dtype=tl.int32), mask=keep)
    tl.store(val_ptr + off, v.to(tl.float32), mask=keep)


# Launch configuration (one config under the interpreter).
# BR=64, BH=128, 8 warps: 0.903 ms gate+pack vs 0.994 for BR=16/BH=256/4 warps (H100 sweep, NOTES.md).
# TWO_PASS, BR=32, BH=128, 4 warps: 0.838 ms gate+pack vs 0.920 for the one-pass BR=64/BH=128/8
# warps (H100 sweep, bench/results/ffn_train_sweep2_h100.md). SCAN picks the one-pass variant
# when TWO_PASS is off.
CONFIG = dict(TWO_PASS=True, BR=32, BH=128, num_warps=4, SCAN=True)


def row_pack(g: torch.Tensor, width: int):
    """(fire [H] int32, cnt [M] int32, idx [M, width] int32, val [M, width] fp32) from dense g."""
    M, H = g.shape
    g = g.contiguous()
    dev = g.device
    fire = torch.zeros(H, dtype=torch.int32, device=dev)
    cnt = torch.zeros(M, dtype=torch.int32, device=dev)
    idx = torch.empty(M, width, dtype=torch.int32, device=dev)
    val = torch.empty(M, width, dtype=torch.float32, device=dev)
    if M and H and CONFIG.get("TWO_PASS"):
        br, bh = (16, 64) if INTERPRET else (CONFIG["BR"], CONFIG["BH"])
        nw = {} if INTERPRET else {"num_warps": CONFIG.get("num_warps", 4)}
        nc = triton.cdiv(H, bh)
        grid = (triton.cdiv(M, br), nc)
        ccnt = torch.empty(M, nc, dtype=torch.int32, device=dev)
        _chunk_count_kernel[grid](g, fire, ccnt, M, H, nc, BR=br, BH=bh, **nw)
        _chunk_pack_kernel[grid](g, ccnt, cnt, idx, val, M, H, width, nc, BR=br, BH=bh,
                                 NC_P=max(2, triton.next_power_of_2(nc)), **nw)
    elif M and H:
        cfg = dict(BR=16, BH=128, SCAN=CONFIG["SCAN"], INTERP=True) if INTERPRET else dict(CONFIG)
        cfg.pop("TWO_PASS", None)
        _row_pack_kernel[(triton.cdiv(M, cfg["BR"]),)](g, fire, cnt, idx, val, M, H, width, **cfg)
    return fire, cnt, idx, val


def cublas_gate_pack(x: torch.Tensor, w_gate: torch.Tensor, width: int):
    """gate_pack through a cuBLAS GEMM + row_pack (the transient dense g is freed on return)."""
    return row_pack(x @ w_gate.t(), width)
