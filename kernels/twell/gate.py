"""Gate kernels: relu(x W_g^T) into TwELL, and the dense gate+up GEMM of the hot columns.

gate_twell's default path is a cuBLAS GEMM plus pack.py (measured faster, NOTES.md run 11). The
fused Triton kernels below run the packing epilogue of epilogue.py on their accumulator.
Two kernels share the GEMM main loop:
  * _gate_twell_kernel: the sparse ("cold") columns [col0, H). One program = BM rows x one TwELL
    tile (BN = T columns). The epilogue applies ReLU, counts nonzeros per row, ranks them with a
    prefix sum and scatters (value, local column) pairs to their slots. The dense gate never
    reaches memory; only real entries are written (no memset). Counts keep the true value, so a
    (row, tile) with more than cap nonzeros is visible as overflow downstream.
  * _gate_up_dense_kernel: the dense ("hot") columns [0, n_hot): the same A tile feeds two dots
    (gate and up), and the epilogue writes h = relu(g) * u densely [M, n_hot] for a cuBLAS down.
Both can add per-neuron fire counts (atomic adds of column sums) for statistics/calibration.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..common import grouped_tile_ids, interpreting
from ._common import m_bucket
from .epilogue import _dot, _twell_epilogue
from .format import pair_dtype
from .pack import pack_twell

_INTERPRET = interpreting()
EPILOGUE = int(os.environ.get("TWELL_GATE_EPILOGUE", "3"))  # see gate_twell
# main-loop implementation of the gate kernels (see gate_twell; NOTES.md has the timings)
# "cublas" (cuBLAS gate + pack.py) measured 0.46 ms against the fused kernel's 0.57 ms for the
# 4096 sparse columns of hot1536 at M=16384 (NOTES.md run 11)
GATE_IMPL = os.environ.get("TWELL_GATE_IMPL", "cublas")
HOT_IMPL = os.environ.get("TWELL_HOT_IMPL", "tma")
# impl="cublas": the dense gate buffer's size bound, so a chunk is CHUNK_MIB / ((H - col0) * 2 B)
# rows of x. 256 MiB makes M=16384 one chunk at every H <= 8192 (a 545M model's prefill), with
# 3 launches fewer per chunk saved, and keeps M=131072 to ~5 chunks. Against 64 MiB (NOTES.md run
# 13, H100): equal on BENCHMARKS.md's generator (hot1536, from graphs: 1.066 vs 1.076 ms at
# M=16384, 8.60 vs 8.70 ms at M=131072), and 5-17% less GPU time on all 8 layers of a trained
# model, whose cold columns (~5400) split M=16384 into 3 uneven 64 MiB chunks.
CHUNK_MIB = int(os.environ.get("TWELL_CHUNK_MIB", "256"))


def _configs():
    if _INTERPRET:  # the interpreter fails with several autotune configs; small tiles keep it quick
        return [triton.Config({"BM": 32, "BK": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    if os.environ.get("TWELL_NO_AUTOTUNE", "0") != "0":  # GPU tests: one config, fewer compiles
        return [triton.Config({"BM": 128, "BK": 64, "GROUP_M": 8}, num_warps=8, num_stages=3)]
    return [triton.Config({"BM": bm, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bk, w, s in [(128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 16, 3), (128, 64, 16, 4),
                                 (64, 64, 8, 4), (256, 64, 16, 3)]]


@triton.autotune(configs=_configs(), key=["M_BUCKET", "D", "H", "BN"], reset_to_zero=["fire_ptr"])
@triton.jit
def _gate_twell_kernel(x_ptr, wg_ptr, cnt_ptr, pair_ptr, fire_ptr, M, D, H, col0, n_tiles,
                       M_BUCKET, CAP: tl.constexpr, BN: tl.constexpr, COUNT_FIRES: tl.constexpr,
                       IEEE: tl.constexpr, INTERPRET: tl.constexpr, EPI: tl.constexpr, PAIR64: tl.constexpr,
                       BM: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile_ids(M, n_tiles, BM, GROUP_M)
    offs_m = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    offs_n = col0 + pid_n * BN + tl.arange(0, BN)          # global (internal) neuron index
    offs_k = tl.arange(0, BK)
    m_ok = offs_m < M
    n_ok = offs_n < H
    a_ptrs = x_ptr + offs_m[:, None] * D + offs_k[None, :]
    b_ptrs = wg_ptr + offs_n.to(tl.int64)[None, :] * D + offs_k[:, None]   # [BK, BN] view of W_g^T
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, D, BK):
        k_ok = (k + offs_k) < D
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(a, b, acc, IEEE, INTERPRET)
        a_ptrs += BK
        b_ptrs += BK
    _twell_epilogue(acc, x_ptr, cnt_ptr, pair_ptr, fire_ptr, pid_m, pid_n, offs_m, offs_n, m_ok, n_ok,
                    col0, n_tiles, CAP, BN, COUNT_FIRES, INTERPRET, EPI, PAIR64, BM)


def _set_blocks(nargs):
    # autotune pre-hook: the TMA boxes follow the config's block sizes
    bm, bk, bn = nargs["BM"], nargs["BK"], nargs["BN"]
    nargs["x_desc"].block_shape = [bm, bk]
    for name in ("wg_desc", "wu_desc"):
        if name in nargs:
            nargs[name].block_shape = [bn, bk]


def _tma_configs():
    if _INTERPRET:
        return [triton.Config({"BM": 32, "BK": 32, "GROUP_M": 4}, num_warps=4, num_stages=1, pre_hook=_set_blocks)]
    if os.environ.get("TWELL_NO_AUTOTUNE", "0") != "0":
        return [triton.Config({"BM": 128, "BK": 64, "GROUP_M": 8}, num_warps=8, num_stages=4, pre_hook=_set_blocks)]
    # measured on an H100 (NOTES.md, run 6): 16 warps lost everywhere (0.77-0.79 ms against 0.58-0.61)
    return [triton.Config({"BM": bm, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=s, pre_hook=_set_blocks)
            for bm, bk, w, s in [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3)]]


@triton.autotune(configs=_tma_configs(), key=["M_BUCKET", "D", "H", "BN", "PERSIST"], reset_to_zero=["fire_ptr"])
@triton.jit
def _gate_twell_tma_kernel(x_desc, wg_desc, x_ptr, cnt_ptr, pair_ptr, fire_ptr, M, D, H, col0, n_tiles,
                           M_BUCKET, CAP: tl.constexpr, BN: tl.constexpr, COUNT_FIRES: tl.constexpr,
                           IEEE: tl.constexpr, INTERPRET: tl.constexpr, EPI: tl.constexpr,
                           PAIR64: tl.constexpr, PERSIST: tl.constexpr,
                           BM: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    # The same GEMM + epilogue as _gate_twell_kernel, but A and B tiles arrive by TMA
    # (tensor descriptors: no per-element address registers, out-of-bounds boxes zero-filled).
    # PERSIST: a grid of about one program per SM walks the tiles (grid chosen on the host).
    # Two 64-row programs per SM and a flattened tile loop were both slower on the H100
    # (NOTES.md run 8, measured at commit 269121b).
    total = tl.cdiv(M, BM) * n_tiles
    for tile_id in tl.range(tl.program_id(0), total, tl.num_programs(0)):
        pid_m, pid_n = grouped_tile_ids(M, n_tiles, BM, GROUP_M, tile_id)
        off_m = pid_m * BM
        off_n = col0 + pid_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, D, BK):
            a = x_desc.load([off_m, k])
            b = wg_desc.load([off_n, k])
            acc = _dot(a, b.T, acc, IEEE, INTERPRET)
        offs_m = (off_m + tl.arange(0, BM)).to(tl.int64)
        offs_n = off_n + tl.arange(0, BN)
        _twell_epilogue(acc, x_ptr, cnt_ptr, pair_ptr, fire_ptr, pid_m, pid_n, offs_m, offs_n, offs_m < M,
                        offs_n < H, col0, n_tiles, CAP, BN, COUNT_FIRES, INTERPRET, EPI, PAIR64, BM)


@triton.autotune(configs=_tma_configs(), key=["M_BUCKET", "D", "N_HOT", "BN"], reset_to_zero=["fire_ptr"])
@triton.jit
def _gate_up_dense_tma_kernel(x_desc, wg_desc, wu_desc, h_ptr, fire_ptr, M, D, N_HOT, M_BUCKET,
                              BN: tl.constexpr, COUNT_FIRES: tl.constexpr, IEEE: tl.constexpr,
                              INTERPRET: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                              GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile_ids(M, tl.cdiv(N_HOT, BN), BM, GROUP_M)
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, D, BK):
        a = x_desc.load([pid_m * BM, k])
        bg = wg_desc.load([pid_n * BN, k])
        bu = wu_desc.load([pid_n * BN, k])
        acc_g = _dot(a, bg.T, acc_g, IEEE, INTERPRET)
        acc_u = _dot(a, bu.T, acc_u, IEEE, INTERPRET)
    offs_m = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_ok = offs_m < M
    n_ok = offs_n < N_HOT
    nz = acc_g > 0
    h = tl.where(nz, acc_g, 0.0) * acc_u
    tl.store(h_ptr + offs_m[:, None] * N_HOT + offs_n[None, :], h.to(h_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])
    if COUNT_FIRES:
        tl.atomic_add(fire_ptr + offs_n, tl.sum(nz.to(tl.int32), axis=0), mask=n_ok)


@triton.autotune(configs=_configs(), key=["M_BUCKET", "D", "N_HOT", "BN"], reset_to_zero=["fire_ptr"])
@triton.jit
def _gate_up_dense_kernel(x_ptr, wg_ptr, wu_ptr, h_ptr, fire_ptr, M, D, N_HOT, M_BUCKET,
                          BN: tl.constexpr, COUNT_FIRES: tl.constexpr, IEEE: tl.constexpr,
                          INTERPRET: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                          GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile_ids(M, tl.cdiv(N_HOT, BN), BM, GROUP_M)
    offs_m = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    m_ok = offs_m < M
    n_ok = offs_n < N_HOT
    a_ptrs = x_ptr + offs_m[:, None] * D + offs_k[None, :]
    boff = offs_n.to(tl.int64)[None, :] * D + offs_k[:, None]
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, D, BK):
        k_ok = (k + offs_k) < D
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        bmask = k_ok[:, None] & n_ok[None, :]
        bg = tl.load(wg_ptr + boff, mask=bmask, other=0.0)
        bu = tl.load(wu_ptr + boff, mask=bmask, other=0.0)
        acc_g = _dot(a, bg, acc_g, IEEE, INTERPRET)
        acc_u = _dot(a, bu, acc_u, IEEE, INTERPRET)
        a_ptrs += BK
        boff += BK
    nz = acc_g > 0
    h = tl.where(nz, acc_g, 0.0) * acc_u
    tl.store(h_ptr + offs_m[:, None] * N_HOT + offs_n[None, :], h.to(h_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])
    if COUNT_FIRES:
        tl.atomic_add(fire_ptr + offs_n, tl.sum(nz.to(tl.int32), axis=0), mask=n_ok)


def _grid(m, n_cols_tiles):
    return lambda meta: (triton.cdiv(m, meta["BM"]) * n_cols_tiles,)


def _tma_ok(*ts: torch.Tensor) -> bool:
    # TMA needs 16-byte aligned bases and row strides (D * itemsize % 16 == 0). fp32 (tests only)
    # keeps the pointer kernel: its configs were sized for it, TMA brings it nothing.
    return ts[0].dtype != torch.float32 and all(t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 for t in ts)


def _desc(t: torch.Tensor) -> TensorDescriptor:
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [16, 16])   # box set by _set_blocks


_SMS: dict = {}


def _num_sms(dev: torch.device) -> int:
    if dev.type != "cuda":
        return 4
    if dev not in _SMS:
        _SMS[dev] = torch.cuda.get_device_properties(dev).multi_processor_count
    return _SMS[dev]


def gate_twell(x: torch.Tensor, w_gate: torch.Tensor, tile: int, cap: int, col0: int = 0,
               fire: torch.Tensor | None = None, epilogue: int | None = None, impl: str | None = None,
               chunk_rows: int | None = None, on_chunk=None):
    """Launch the gate+pack kernel on columns [col0, H). Returns (counts, pairs) (format.py).
    x [M, D] and w_gate [H, D] contiguous, same dtype/device (checked by the caller).
    epilogue: 0 = prefix sum by tl.cumsum, 1 = by a tensor-core product, 2 = counts only (timing
    the GEMM floor; pairs are then NOT written), 3 = as 1 with fewer live registers (16-bit
    activations: nonzero judged on the rounded value); default EPILOGUE. With impl="cublas" it
    pins pack.py's ranking (4 = bitmask select there) and None lets its autotuner choose.
    impl: "ptr" (pointer loads, cp.async), "tma" (tensor descriptors), "tma_persist" (TMA, one
    program per SM walking the tiles): fused GEMM + pack, no dense gate in memory; "cublas": a
    cuBLAS GEMM writes the gate into a buffer of chunk_rows rows (default: CHUNK_MIB of it),
    which pack.py packs (exactly as the fused epilogue would; NOTES.md run 11 has the timing).
    Default GATE_IMPL. TMA falls back to "ptr" for fp32 and misaligned inputs.
    on_chunk(counts, pairs, s, e), if given, is called (on the current stream, after the launches
    that pack rows [s, e)) once per chunk of rows, so a caller can consume a chunk while the next
    chunk's GEMM runs; the fused impls pack all rows in one launch, so they call it once."""
    m, d = x.shape
    h = w_gate.shape[0]
    nt = -(-(h - col0) // tile)
    counts = torch.empty(m, nt, dtype=torch.int32, device=x.device)
    pairs = torch.empty(m, nt, cap, dtype=pair_dtype(x.dtype), device=x.device)
    if m == 0 or nt == 0:
        counts.zero_()
        if on_chunk is not None and m:
            on_chunk(counts, pairs, 0, m)
        return counts, pairs
    impl = impl or GATE_IMPL
    if impl == "cublas":   # epilogue None: the pack kernel's autotuner picks it
        rows = chunk_rows or default_chunk_rows(h - col0, x.element_size())
        _gate_twell_cublas(x, w_gate[col0:], counts, pairs, tile, cap, fire[col0:] if fire is not None else None,
                           epilogue, rows, on_chunk)
        return counts, pairs
    _gate_twell_fused(x, w_gate, counts, pairs, tile, cap, col0, fire, epilogue, impl)
    if on_chunk is not None:
        on_chunk(counts, pairs, 0, m)
    return counts, pairs


def default_chunk_rows(cols: int, element_size: int) -> int:
    """Rows of x per cuBLAS gate chunk: CHUNK_MIB of dense gate buffer."""
    return max(128, (CHUNK_MIB << 20) // (cols * element_size))


def _gate_twell_fused(x, w_gate, counts, pairs, tile, cap, col0, fire, epilogue, impl):
    m, d = x.shape
    h = w_gate.shape[0]
    nt = counts.shape[1]
    epilogue = EPILOGUE if epilogue is None else epilogue
    fire_arg = fire[col0:] if fire is not None else counts
    if impl not in ("ptr", "tma", "tma_persist"):
        raise ValueError(f"gate impl {impl!r}; expected 'ptr', 'tma', 'tma_persist' or 'cublas' (TWELL_GATE_IMPL)")
    flags = dict(CAP=cap, BN=tile, COUNT_FIRES=fire is not None, IEEE=x.dtype == torch.float32,
                 INTERPRET=_INTERPRET, EPI=epilogue, PAIR64=x.dtype == torch.float32)
    if impl.startswith("tma") and _tma_ok(x, w_gate):
        persist = impl == "tma_persist"
        sms = _num_sms(x.device)

        def grid(meta):
            n = triton.cdiv(m, meta["BM"]) * nt
            return (min(n, sms) if persist else n,)
        _gate_twell_tma_kernel[grid](_desc(x), _desc(w_gate), x, counts, pairs, fire_arg, m, d, h, col0, nt,
                                     m_bucket(m), PERSIST=persist, **flags)
        return
    _gate_twell_kernel[_grid(m, nt)](x, w_gate, counts, pairs, fire_arg, m, d, h, col0, nt, m_bucket(m), **flags)


def _gate_twell_cublas(x, w_cold, counts, pairs, tile, cap, fire_cold, epilogue, chunk_rows, on_chunk):
    # g = x W^T chunk by chunk into one reused buffer, each chunk packed before the next GEMM
    # overwrites it (same stream, so in order). Fire counts are taken from g in torch: an atomic
    # in an autotuned kernel would be repeated by the tuner and wiped by a reset between chunks.
    m = x.shape[0]
    rows = max(1, min(m, chunk_rows))
    buf = torch.empty(rows, w_cold.shape[0], dtype=x.dtype, device=x.device)
    for s in range(0, m, rows):
        e = min(m, s + rows)
        g = buf[: e - s]
        torch.mm(x[s:e], w_cold.t(), out=g)
        pack_twell(g, counts[s:e], pairs[s:e], tile, cap, epilogue=epilogue)
        if fire_cold is not None:
            fire_cold += (g > 0).sum(0, dtype=torch.int32)
        if on_chunk is not None:
            on_chunk(counts, pairs, s, e)


def gate_up_dense(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, n_hot: int, tile: int,
                  fire: torch.Tensor | None = None, impl: str | None = None) -> torch.Tensor:
    """h = relu(x W_g[:n_hot]^T) * (x W_u[:n_hot]^T), dense [M, n_hot] in x's dtype."""
    m, d = x.shape
    out = torch.empty(m, n_hot, dtype=x.dtype, device=x.device)
    if m == 0 or n_hot == 0:
        return out
    impl = impl or HOT_IMPL
    if impl.startswith("tma") and _tma_ok(x, w_gate, w_up):
        _gate_up_dense_tma_kernel[_grid(m, -(-n_hot // tile))](
            _desc(x), _desc(w_gate[:n_hot]), _desc(w_up[:n_hot]), out,
            fire[:n_hot] if fire is not None else out, m, d, n_hot, m_bucket(m), BN=tile,
            COUNT_FIRES=fire is not None, IEEE=x.dtype == torch.float32, INTERPRET=_INTERPRET)
        return out
    _gate_up_dense_kernel[_grid(m, -(-n_hot // tile))](
        x, w_gate, w_up, out, fire[:n_hot] if fire is not None else out, m, d, n_hot, m_bucket(m),
        BN=tile, COUNT_FIRES=fire is not None, IEEE=x.dtype == torch.float32, INTERPRET=_INTERPRET)
    return out
