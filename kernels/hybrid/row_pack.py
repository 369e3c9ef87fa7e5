"""Pack a dense gate output g [M, H] (from cuBLAS) into the per-token ELL.

Why this exists next to the fused epilogue (gate_pack.py): on H100 our Triton gate GEMM with
the packing epilogue runs 1.30-1.37 ms at M=16384, D=2048, H=5632, against 0.65 ms for cuBLAS
(NOTES.md). cuBLAS writing bf16 g (184 MB, freed right after) plus this pass (one read of g)
is faster until the fused kernel's main loop is fixed. Same output contract as gate_pack.

Default (CONFIG TWO_PASS): two loop-free kernels over (row block, column chunk) tiles: pass 1
counts each row's nonzeros per chunk (and the per-column fire counts, one int32 atomic per
column), a cumsum over the chunks gives each row's chunk offsets, pass 2 ranks each nonzero
inside its chunk.
Column-ordered, deterministic ELL.
(A one-pass version of the same tiles, claiming each row's slots with one atomic per (row,
chunk), lost to it: 0.86-1.05 vs 0.79 ms gate+pack; commit 2b623a2 has it.)
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
def _chunk_pack_kernel(g_ptr, incl_ptr, cnt_ptr, idx_ptr, val_ptr, hot_pos_ptr, g_hot_ptr, M, H, width,
                       n_chunks, K, BR: tl.constexpr, BH: tl.constexpr, HOT: tl.constexpr):
    # Pass 2: each nonzero's slot = the row's nonzeros in earlier chunks (the inclusive prefix
    # over chunks, one int per row) + its rank inside the chunk; column order, deterministic,
    # like SCAN. Chunk 0's program also writes the row totals. (Summing the earlier chunks'
    # counts here instead read [BR, n_chunks] per program, 44x the needed bytes at H=5632.)
    pid_c = tl.program_id(1)
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    c = pid_c * BH + tl.arange(0, BH)
    r_ok = rows < M
    c_ok = c < H
    rows64 = rows.to(tl.int64)
    base = tl.load(incl_ptr + rows64 * n_chunks + pid_c - 1, mask=r_ok & (pid_c > 0), other=0)
    if pid_c == 0:
        tl.store(cnt_ptr + rows, tl.load(incl_ptr + rows64 * n_chunks + n_chunks - 1, mask=r_ok), mask=r_ok)
    v = tl.load(g_ptr + rows64[:, None] * H + c[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.0)
    on = v > 0
    pos = base[:, None] + tl.cumsum(on.to(tl.int32), axis=1) - 1
    keep = on & (pos < width)
    off = rows64[:, None] * width + pos
    tl.store(idx_ptr + off, c[None, :] + tl.zeros((BR, BH), dtype=tl.int32), mask=keep)
    tl.store(val_ptr + off, v.to(tl.float32), mask=keep)
    if HOT:
        # the hot panel's g columns (all values, the panel is dense), so its GEMM computes u only
        hp = tl.load(hot_pos_ptr + c, mask=c_ok, other=-1)
        tl.store(g_hot_ptr + rows64[:, None] * K + hp[None, :], v,
                 mask=r_ok[:, None] & (hp >= 0)[None, :])


# Launch configuration (one config under the interpreter).
# BR=64, BH=128, 8 warps: 0.903 ms gate+pack vs 0.994 for BR=16/BH=256/4 warps (H100 sweep, NOTES.md).
# TWO_PASS, BR=32, BH=128, 4 warps: 0.838 ms gate+pack vs 0.920 for the one-pass BR=64/BH=128/8
# warps (H100 sweep, bench/results/ffn_train_sweep2_h100.md). SCAN picks the one-pass variant
# when TWO_PASS is off. COUNT_BR / COUNT_WARPS: rows per program and warps of pass 1 alone
# (taller tiles mean fewer fire atomics per column); BH is shared, both passes use its chunks.
# COUNT_BR=64: gate+pack 0.789 vs 0.819 ms with 32 (H100 sweep of this round, NOTES.md).
CONFIG = dict(TWO_PASS=True, BR=32, BH=128, num_warps=4, COUNT_BR=64, COUNT_WARPS=4, SCAN=True)


def _two_pass_config():
    if INTERPRET:
        return 16, 64, 16, {}, {}
    nw = {"num_warps": CONFIG.get("num_warps", 4)}
    return (CONFIG["BR"], CONFIG["BH"], CONFIG.get("COUNT_BR", CONFIG["BR"]), nw,
            {"num_warps": CONFIG.get("COUNT_WARPS", nw["num_warps"])})


def count_pass(g: torch.Tensor, fire: torch.Tensor | None = None):
    """Two-pass pack, pass 1: (fire [H] int32, per-(row, chunk) nonzero counts [M, n_chunks]).
    `fire` may be a caller's zeroed int32 [H] (a slice of one memset for several counters)."""
    M, H = g.shape
    br, bh, cbr, _, cnw = _two_pass_config()
    if fire is None:
        fire = torch.zeros(H, dtype=torch.int32, device=g.device)
    nc = triton.cdiv(H, bh)
    ccnt = torch.empty(M, nc, dtype=torch.int32, device=g.device)
    if M and H:
        _chunk_count_kernel[(triton.cdiv(M, cbr), nc)](g, fire, ccnt, M, H, nc, BR=cbr, BH=bh, **cnw)
    return fire, ccnt


def pack_pass(g: torch.Tensor, ccnt: torch.Tensor, width: int, hot: tuple | None = None):
    """Two-pass pack, pass 2: (cnt [M], idx [M, width], val [M, width], g_hot [M, K] or None).

    With hot = (pos [H] int32: a hot neuron's column in the panel or -1, K) it also copies
    those columns of g into a dense [M, K] panel (g's dtype), in the same read of g."""
    M, H = g.shape
    br, bh, _, nw, _ = _two_pass_config()
    dev = g.device
    # chunk 0's programs write every row's total (only an empty g leaves cnt to this fill)
    cnt = (torch.empty if M and H else torch.zeros)(M, dtype=torch.int32, device=dev)
    idx = torch.empty(M, width, dtype=torch.int32, device=dev)
    val = torch.empty(M, width, dtype=torch.float32, device=dev)
    hot_pos, K = (cnt, 0) if hot is None else hot
    g_hot = None if hot is None else torch.empty(M, K, dtype=g.dtype, device=dev)
    if M and H:
        nc = ccnt.shape[1]
        incl = torch.cumsum(ccnt, 1, dtype=torch.int32)
        _chunk_pack_kernel[(triton.cdiv(M, br), nc)](g, incl, cnt, idx, val, hot_pos,
                                                     g_hot if K else val, M, H, width, nc, K,
                                                     BR=br, BH=bh, HOT=K > 0, **nw)
    return cnt, idx, val, g_hot


def row_pack(g: torch.Tensor, width: int):
    """(fire [H] int32, cnt [M] int32, idx [M, width] int32, val [M, width] fp32) from dense g."""
    M, H = g.shape
    g = g.contiguous()
    if CONFIG.get("TWO_PASS"):
        fire, ccnt = count_pass(g)
        cnt, idx, val, _ = pack_pass(g, ccnt, width)
        return fire, cnt, idx, val
    dev = g.device
    fire = torch.zeros(H, dtype=torch.int32, device=dev)
    cnt = torch.zeros(M, dtype=torch.int32, device=dev)
    idx = torch.empty(M, width, dtype=torch.int32, device=dev)
    val = torch.empty(M, width, dtype=torch.float32, device=dev)
    if M and H:
        cfg = dict(BR=16, BH=128, SCAN=CONFIG["SCAN"], INTERP=True) if INTERPRET else dict(CONFIG)
        for k in ("TWO_PASS", "COUNT_BR", "COUNT_WARPS"):
            cfg.pop(k, None)
        _row_pack_kernel[(triton.cdiv(M, cfg["BR"]),)](g, fire, cnt, idx, val, M, H, width, **cfg)
    return fire, cnt, idx, val


def cublas_gate_pack(x: torch.Tensor, w_gate: torch.Tensor, width: int):
    """gate_pack through a cuBLAS GEMM + row_pack (the transient dense g is freed on return)."""
    return row_pack(x @ w_gate.t(), width)
