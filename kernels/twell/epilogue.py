"""The gate kernels' shared pieces: a dtype-aware tl.dot and the TwELL-packing epilogue.

The fused gate GEMMs (gate.py) run the epilogue on their accumulator; pack.py runs it on a dense
gate that cuBLAS wrote. Sharing it means both paths pack the same bits.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr, INTERPRET: tl.constexpr):
    if INTERPRET:  # the interpreter's bf16/fp16 dot is wrong: do it in fp32
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif IEEE:     # fp32 inputs: exact fp32, not tf32 (tests compare with fp32 references)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _twell_epilogue(acc, x_ptr, cnt_ptr, pair_ptr, fire_ptr, pid_m, pid_n, offs_m, offs_n, m_ok, n_ok,
                    col0, n_tiles, CAP: tl.constexpr, BN: tl.constexpr, COUNT_FIRES: tl.constexpr,
                    INTERPRET: tl.constexpr, EPI: tl.constexpr, PAIR64: tl.constexpr, BM: tl.constexpr):
    # ReLU + pack. Masked rows/columns loaded zeros, so they are never "nonzero".
    if EPI == 3:
        # Lean variant of EPI=1: the packed pair is formed first, so the fp32 accumulator is dead
        # before the prefix product needs its own [BM, BN] accumulator (fewer live registers).
        # For 16-bit activations "nonzero" is judged on the rounded value (what is stored).
        local3 = tl.arange(0, BN)[None, :]
        if PAIR64:
            nz = acc > 0
            pair = (acc.to(tl.int32, bitcast=True).to(tl.int64) << 32) | local3.to(tl.int64)
        else:
            v16 = acc.to(x_ptr.dtype.element_ty).to(tl.int16, bitcast=True)
            nz = v16 > 0
            pair = (v16.to(tl.int32) << 16) | local3
        nzf = nz.to(tl.float16)
        nzi = nz.to(tl.int32)
        cnt = tl.sum(nzi, axis=1)
        tl.store(cnt_ptr + offs_m * n_tiles + pid_n, cnt, mask=m_ok)
        r = tl.arange(0, BN)
        tri = (r[:, None] <= r[None, :]).to(tl.float16)
        pos = _dot(nzf, tri, tl.zeros((BM, BN), dtype=tl.float32), False, INTERPRET).to(tl.int32) - 1
        base = (pid_m * BM).to(tl.int64) * n_tiles * CAP + pid_n * CAP
        slot = tl.arange(0, BM)[:, None] * (n_tiles * CAP) + pos
        tl.store(pair_ptr + base + slot, pair, mask=nz & (pos < CAP) & m_ok[:, None])
        if COUNT_FIRES:
            tl.atomic_add(fire_ptr + (offs_n - col0), tl.sum(nzi, axis=0), mask=n_ok)
        return
    nz = acc > 0
    nzi = nz.to(tl.int32)
    cnt = tl.sum(nzi, axis=1)                       # true count, may exceed CAP (overflow)
    tl.store(cnt_ptr + offs_m * n_tiles + pid_n, cnt, mask=m_ok)
    if EPI < 2:
        if EPI == 0:
            pos = tl.cumsum(nzi, axis=1) - 1        # slot of each nonzero, in column order
        else:
            # The same prefix sum as a tensor-core product with an upper-triangular ones
            # matrix: it stays in the accumulator's layout (no layout conversion for a scan).
            r = tl.arange(0, BN)
            tri = (r[:, None] <= r[None, :]).to(tl.float16)
            pos = _dot(nz.to(tl.float16), tri, tl.zeros((BM, BN), dtype=tl.float32), False, INTERPRET)
            pos = pos.to(tl.int32) - 1
        # 32-bit offsets inside this program's block of slots (BM * n_tiles * CAP < 2^31),
        # one 64-bit base: [BM, BN] int64 offsets would cost registers the epilogue needs.
        base = (pid_m * BM).to(tl.int64) * n_tiles * CAP + pid_n * CAP
        slot = tl.arange(0, BM)[:, None] * (n_tiles * CAP) + pos
        smask = nz & (pos < CAP) & m_ok[:, None]
        local = tl.arange(0, BN)[None, :]
        if PAIR64:   # fp32 activations: value bits << 32 | column
            pair = (acc.to(tl.int32, bitcast=True).to(tl.int64) << 32) | local.to(tl.int64)
        else:        # 16-bit activations: value bits << 16 | column
            v16 = acc.to(x_ptr.dtype.element_ty).to(tl.int16, bitcast=True)
            pair = (v16.to(tl.int32) << 16) | local
        tl.store(pair_ptr + base + slot, pair, mask=smask)
    if COUNT_FIRES:
        # fire_ptr is the [H - col0] slice of the counts, so autotune's reset_to_zero cannot
        # wipe counts that the hot kernel already added
        tl.atomic_add(fire_ptr + (offs_n - col0), tl.sum(nzi, axis=0), mask=n_ok)
