"""TwELL kernels against their pure-torch references (CPU: TRITON_INTERPRET=1, set in conftest).

Grids are kept near 100 programs: the interpreter costs ~2.5 ms per program-iteration.
"""
import os

import pytest
import torch

from conftest import kernel_device
from kernels import twell
from kernels.synthetic import make_ffn_inputs
from kernels.twell.gate import gate_twell

DEV = kernel_device()
# bf16 outputs are rounded (truncated by the interpreter) once for g and once for y: ~2 ulps
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 1.5e-2}


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def inputs(m, d, h, nnz, dtype, dense_rows=0, seed=0):
    return make_ffn_inputs(m, d, h, target_nnz=nnz, dense_rows=dense_rows, dtype=dtype, device=DEV, seed=seed)


def check_ffn(f, w, dtype, **kw):
    y, fire = twell.twell_ffn(f.x, w, return_fire_counts=True, **kw)
    ref = twell.ffn_reference(f.x, f.w_gate, f.w_up, f.w_down)
    assert y.shape == f.x.shape and y.dtype == dtype
    assert torch.isfinite(y).all()
    err = rel(y, ref)
    assert err < TOL[dtype], f"rel err {err:.2e} >= {TOL[dtype]:.0e}"
    fire_ref = (f.x.float() @ f.w_gate.float().t() > 0).sum(0)
    assert (fire.long() - fire_ref).abs().max() <= 1   # a gate within rounding of 0 may flip
    return y


# ---------------------------------------------------------------- format (pure torch)
def test_pack_unpack_roundtrip_and_overflow():
    torch.manual_seed(0)
    g = torch.relu(torch.randn(6, 300)) * (torch.rand(6, 300) < 0.1)
    g[3] = torch.rand(300) + 0.1                       # fully dense row: overflows cap
    a = twell.pack_reference(g, tile=128, cap=16)
    assert a.counts.shape == (6, 3) and a.counts[3].tolist() == [128, 128, 44]
    assert a.pairs.dtype == torch.int64                 # fp32 values pack into 64-bit pairs
    gb = g.to(torch.bfloat16)
    ab = twell.pack_reference(gb, tile=128, cap=16)
    assert ab.pairs.dtype == torch.int32 and torch.equal(twell.unpack_reference(ab, dense_fill=gb), gb)
    assert a.overflowed()[3].all() and not a.overflowed()[[0, 1, 2, 4, 5]].any()
    with pytest.raises(ValueError, match="overflowed"):
        twell.unpack_reference(a)
    assert torch.equal(twell.unpack_reference(a, dense_fill=g), g)
    sub = g[[0, 1, 2, 4, 5]]
    assert torch.equal(twell.unpack_reference(twell.pack_reference(sub, 64, 24)), sub)
    a = twell.pack_reference(sub, 64, 24, col0=64)       # hot columns [0, 64) are not stored
    expect = sub.clone()
    expect[:, :64] = 0
    assert torch.equal(twell.unpack_reference(a), expect)
    assert (a.cols[a.valid()] < 64).all() and (a.values[a.valid()] > 0).all()


# ---------------------------------------------------------------- gate kernel
@pytest.mark.parametrize("m,d,h,tile,cap,dtype", [
    (70, 128, 355, 64, 8, torch.float32),     # M, H not multiples of the tiles
    (33, 64, 1408, 128, 32, torch.bfloat16),  # the tp=4 local width
    (45, 96, 200, 64, 16, torch.float16),     # D not a power of two
])
@pytest.mark.parametrize("impl,epilogue", [("tma_persist", 1), ("cublas", None)])
def test_gate_kernel_writes_twell(m, d, h, tile, cap, dtype, impl, epilogue):
    f = inputs(m, d, h, nnz=0.04 * h, dtype=dtype, dense_rows=1)
    counts, pairs = gate_twell(f.x, f.w_gate.contiguous(), tile, cap, epilogue=epilogue, impl=impl)
    values, cols = twell.decode_pairs(pairs, dtype)
    ref = twell.gate_twell_reference(f.x, f.w_gate, tile, cap)
    mism = (counts != ref.counts).sum().item()
    assert mism <= (0 if dtype == torch.float32 else 2), f"{mism} counts differ"
    assert (counts > cap).any(), "the dense row should overflow"
    same = (counts == ref.counts).unsqueeze(2)
    valid = (torch.arange(cap, device=DEV) < counts.clamp(max=cap).unsqueeze(2)) & same
    assert torch.equal(cols[valid], ref.cols[valid])
    assert (cols[valid] < tile).all() and (cols[valid] >= 0).all()
    v, rv = values[valid].float(), ref.values[valid].float()
    assert (v > 0).all()
    assert torch.allclose(v, rv, rtol=TOL[dtype], atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tma_gate_and_hot_kernels_match_pointer_kernels(dtype):
    # TMA main loops (non-persistent and persistent grid) and the lean epilogue 3 must pack
    # exactly like the pointer kernel with epilogue 1; a misaligned x falls back to pointers.
    from kernels.twell.gate import gate_up_dense
    f = inputs(40, 64, 300, nnz=12.0, dtype=dtype, dense_rows=1)
    c0, p0 = gate_twell(f.x, f.w_gate, 64, 8, epilogue=1, impl="ptr")
    valid = torch.arange(8, device=DEV) < c0.clamp(max=8).unsqueeze(2)
    buf = torch.empty(f.x.numel() + 1, dtype=dtype, device=DEV)
    xm = buf[1:].view_as(f.x)
    xm.copy_(f.x)
    for impl, epi, x in [("tma", 3, f.x), ("tma_persist", 3, f.x), ("tma_persist", 1, f.x), ("tma", 3, xm),
                         ("ptr", 3, f.x)]:
        c1, p1 = gate_twell(x, f.w_gate, 64, 8, col0=0, epilogue=epi, impl=impl)
        assert (c1 != c0).sum() <= 1, (impl, epi)      # epilogue 3 judges zero after rounding
        same = valid & (c1 == c0).unsqueeze(2)
        assert torch.equal(p0[same], p1[same]), (impl, epi)
    c0, _ = gate_twell(f.x, f.w_gate, 64, 8, col0=128, impl="ptr")
    c1, _ = gate_twell(f.x, f.w_gate, 64, 8, col0=128, impl="tma_persist")
    assert (c1 != c0).sum() <= 1 and c1.shape == (40, 3)
    h0 = gate_up_dense(f.x, f.w_gate, f.w_up, 128, 64, impl="ptr")
    h1 = gate_up_dense(f.x, f.w_gate, f.w_up, 128, 64, impl="tma")
    assert torch.allclose(h0.float(), h1.float(), rtol=TOL[dtype], atol=1e-3)
    w0 = twell.prepare_weights(f.w_gate, f.w_up, f.w_down, tile=64, cap=8)
    _, fire = twell.twell_ffn(f.x, w0, return_fire_counts=True)
    check_ffn(f, twell.calibrate(w0, fire, 40, n_hot=128), dtype)


def test_gate_kernel_scan_epilogue():
    # epilogue 0 (tl.cumsum prefix) must pack exactly like the default tensor-core prefix
    f = inputs(40, 64, 300, nnz=12.0, dtype=torch.float32, dense_rows=1)
    c1, p1 = gate_twell(f.x, f.w_gate, 64, 8, epilogue=1, impl="ptr")
    c0, p0 = gate_twell(f.x, f.w_gate, 64, 8, epilogue=0, impl="ptr")
    valid = torch.arange(8, device=DEV) < c1.clamp(max=8).unsqueeze(2)
    assert torch.equal(c0, c1) and torch.equal(p0[valid], p1[valid])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("epilogue,block_rows,tile,cap", [(3, 16, 64, 8), (0, 32, 64, 8), (4, 16, 64, 8),
                                                        (4, 16, 16, 4), (None, None, 64, 8)])
def test_pack_kernel_equals_reference_pack(dtype, epilogue, block_rows, tile, cap):
    # pre-activation g with negatives; an all-zero row, an all-negative row, a fully dense row
    # (overflows every tile) and N=300 (a partial last tile); tile 16 has one 16-bit word
    from kernels.twell.pack import pack_twell
    torch.manual_seed(1)
    g = (torch.randn(21, 300) - 1.6).to(dtype)    # 21 rows: a partial block of 16
    g[2], g[5], g[9] = 0.0, -1.0, torch.rand(300) + 0.5
    g = g.to(DEV)
    nt = -(-300 // tile)
    counts = torch.full((21, nt), -7, dtype=torch.int32, device=DEV)
    pairs = torch.empty(21, nt, cap, dtype=twell.format.pair_dtype(dtype), device=DEV)
    pack_twell(g, counts, pairs, tile, cap, epilogue=epilogue, block_rows=block_rows)
    ref = twell.pack_reference(torch.relu(g), tile, cap)
    assert torch.equal(counts, ref.counts)
    assert counts[2].sum() == 0 and counts[5].sum() == 0 and counts[9].sum() == 300
    assert (counts > cap).any() and (counts == 0).any() and ((counts > 0) & (counts <= cap)).any()
    valid = ref.valid()
    assert torch.equal(pairs[valid], ref.pairs[valid])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("col0,chunk_rows", [(0, 16), (128, 1000)])
def test_cublas_gate_packs_like_fused_kernel(dtype, col0, chunk_rows):
    # impl="cublas" (a GEMM into a row-chunk buffer, then pack.py) must write what the fused
    # kernel writes, also when the chunks do not divide M, with fire counts on both paths
    f = inputs(40, 64, 330, 12.0, dtype, dense_rows=2, seed=6)
    fires = [torch.zeros(330, dtype=torch.int32, device=DEV) for _ in range(2)]
    c0, p0 = gate_twell(f.x, f.w_gate, 64, 8, col0=col0, fire=fires[0], impl="ptr", epilogue=3)
    c1, p1 = gate_twell(f.x, f.w_gate, 64, 8, col0=col0, fire=fires[1], impl="cublas", chunk_rows=chunk_rows)
    assert (c0 > 8).any() and c1.shape == c0.shape
    assert (c1 != c0).sum() <= (0 if dtype == torch.float32 else 2)   # gates within rounding of 0
    same = (c1 == c0).unsqueeze(2) & (torch.arange(8, device=DEV) < c0.clamp(max=8).unsqueeze(2))
    (v0, k0), (v1, k1) = twell.decode_pairs(p0, dtype), twell.decode_pairs(p1, dtype)
    assert torch.equal(k0[same], k1[same])     # values: the two GEMMs sum in different orders
    assert torch.allclose(v0[same].float(), v1[same].float(), rtol=TOL[dtype], atol=1e-5)
    assert int(fires[1][:col0].sum()) == 0 and (fires[1] - fires[0]).abs().max() <= 2
    assert int(fires[1].sum()) == int(c1.sum())


@pytest.mark.parametrize("gate_impl", ["cublas", "tma_persist"])
def test_ffn_with_each_gate_impl_matches_reference(gate_impl):
    # the default is "cublas"; the fused kernel stays available and must stay exact
    f = inputs(30, 64, 330, 12.0, torch.bfloat16, dense_rows=2, seed=7)
    w0 = twell.prepare_weights(f.w_gate, f.w_up, f.w_down, tile=64, cap=4)
    check_ffn(f, w0, torch.bfloat16, gate_impl=gate_impl)
    if gate_impl == "cublas":   # with hot neurons (col0 > 0); the fused kernel at col0 > 0 is checked at the gate level above
        _, fire = twell.twell_ffn(f.x, w0, return_fire_counts=True, gate_impl=gate_impl)
        check_ffn(f, twell.calibrate(w0, fire, 30, n_hot=64), torch.bfloat16, gate_impl=gate_impl)
    with pytest.raises(ValueError, match="gate impl 'cuBLAS'"):
        twell.twell_ffn(f.x, w0, gate_impl="cuBLAS")


# ---------------------------------------------------------------- full FFN
@pytest.mark.parametrize("m,d,h,nnz,dtype,tile,cap", [
    (37, 64, 1408, 7.0, torch.bfloat16, 128, 32),
    (50, 256, 300, 20.0, torch.float32, 64, 16),
    (29, 96, 200, 40.0, torch.float16, 64, 16),
    (40, 128, 2816 // 8, 2.0, torch.float32, 128, 32),   # very sparse
])
def test_ffn_matches_reference(m, d, h, nnz, dtype, tile, cap):
    f = inputs(m, d, h, nnz, dtype, seed=m)
    w = twell.prepare_weights(f.w_gate, f.w_up, f.w_down, tile=tile, cap=cap)
    check_ffn(f, w, dtype)


@pytest.mark.parametrize("dtype,overflow,row_cap", [
    (torch.float32, "kernel", 256), (torch.bfloat16, "kernel", 256),
    (torch.bfloat16, "kernel", 2),            # 2 tokens listed, the other overflowed ones walked
    (torch.bfloat16, "walk", 256), (torch.bfloat16, "rows", 256)])
def test_fully_dense_rows_overflow_is_exact(dtype, overflow, row_cap):
    # cap=4 of a 64-column tile: the dense rows overflow every tile; popular neurons overflow too
    f = inputs(24, 64, 330, 12.0, dtype, dense_rows=3, seed=3)
    w = twell.prepare_weights(f.w_gate, f.w_up, f.w_down, tile=64, cap=4)
    counts, _ = gate_twell(f.x, w.w_gate, 64, 4)
    assert (counts > 4).sum() >= 3 * 5 and ((counts > 4).sum(1) >= 2).sum() > 2
    y = check_ffn(f, w, dtype, overflow=overflow, overflow_row_cap=row_cap)
    dense = (f.x[:, 0] < 0).nonzero().squeeze(1)          # the generator marks dense rows with x0 = -4
    assert dense.numel() == 3
    ref = twell.ffn_reference(f.x, f.w_gate, f.w_up, f.w_down)
    assert rel(y[dense], ref[dense]) < TOL[dtype]


@pytest.mark.parametrize("hot", [0, 64])
def test_chunked_walk_lists_overflowed_tokens_by_batch_row(hot):
    """The cuBLAS gate in chunks of 7 rows: each chunk is listed and walked as soon as it is
    packed (on a side stream with overlap on CUDA), so the overflow list must record batch rows,
    not rows of the chunk; a dense row past the first chunk would otherwise be recomputed into
    the wrong token."""
    f = inputs(24, 64, 330, 12.0, torch.bfloat16, dense_rows=3, seed=3)
    w = twell.prepare_weights(f.w_gate, f.w_up, f.w_down, tile=64, cap=4)
    if hot:
        _, fire = twell.twell_ffn(f.x, w, return_fire_counts=True)
        w = twell.calibrate(w, fire, 24, n_hot=hot)
    dense = (f.x[:, 0] < 0).nonzero().squeeze(1)
    assert dense.numel() == 3 and int(dense.max()) >= 7
    y = check_ffn(f, w, torch.bfloat16, gate_impl="cublas", gate_chunk_rows=7, overlap=True)
    ref = twell.ffn_reference(f.x, f.w_gate, f.w_up, f.w_down)
    assert rel(y[dense], ref[dense]) < TOL[torch.bfloat16]
    assert torch.equal(y, twell.twell_ffn(f.x, w, gate_impl="cublas", gate_chunk_rows=7, overlap=False))


@pytest.mark.parametrize("m,d,dense_rows,hot", [(20, 64, 2, 0), (20, 64, 2, 64),
                                                 (40, 80, 20, 0)])   # D off the blocks; 2 row blocks
def test_overflowed_tokens_are_listed_then_recomputed(m, d, dense_rows, hot):
    """list_overflowed lists exactly the tokens with 2+ overflowed tiles (counter on the device) and
    zeroes their counts, so the up/down kernel writes zeros for them, walks one-tile overflows and
    gets the others right; overflow_rows then completes the listed ones."""
    from kernels.twell.overflow_rows import OverflowList, list_overflowed, overflow_rows
    from kernels.twell.updown import updown
    f = inputs(m, d, 330, 12.0, torch.float32, dense_rows=dense_rows, seed=4)
    w = twell.prepare_weights(f.w_gate, f.w_up, f.w_down, tile=64, cap=4)
    if hot:
        w = twell.reorder(w, torch.randperm(330, generator=torch.Generator().manual_seed(0)).to(DEV), hot)
    counts, pairs = gate_twell(f.x, w.w_gate, 64, 4, col0=hot)
    n_over = (counts > 4).sum(1)
    listed, walked = n_over >= 2, n_over == 1
    assert int(listed.sum()) >= dense_rows and int(walked.sum()) >= 1   # both paths are taken
    ovf = OverflowList(32, d, DEV)
    ovf.acc.fill_(float("nan"))
    y = torch.full_like(f.x, float("nan"))
    list_overflowed(counts, 4, ovf)
    assert torch.equal(counts[listed], torch.zeros_like(counts[listed])) and (counts[walked] > 4).any(1).all()
    updown(f.x, w.w_gate, w.w_up, w.w_down_t, counts, pairs, y, tile=64, cap=4, col0=hot)
    n = int(ovf.header[0])
    assert n == int(listed.sum())
    assert sorted(ovf.rows[:n].tolist()) == listed.nonzero().squeeze(1).tolist()
    assert torch.equal(ovf.acc[:n], torch.zeros_like(ovf.acc[:n]))
    assert torch.equal(y[listed], torch.zeros_like(y[listed]))
    cold = slice(hot, None)   # the sparse part only: the hot columns are the caller's GEMM
    g = f.x.double() @ w.w_gate[cold].double().t()
    ref = (torch.relu(g) * (f.x.double() @ w.w_up[cold].double().t())) @ w.w_down_t[cold].double()
    assert rel(y[~listed], ref[~listed]) < 1e-5
    overflow_rows(f.x, w.w_gate, w.w_up, w.w_down_t, ovf, y, col0=hot)
    assert rel(y[listed], ref[listed]) < 1e-5 and rel(y, ref) < 1e-5


@pytest.mark.parametrize("dtype,entries,overflow_entries", [(torch.float32, 2, 0), (torch.bfloat16, 1, 2)])
def test_updown_prefetch_walk_matches_plain_walk(dtype, entries, overflow_entries):
    # The software-pipelined walk (PF) must give what the plain walk gives: tokens with 0, few and
    # many entries, a partial last tile, and overflowed tokens (which take the plain walk).
    from kernels.twell.updown import updown
    f = inputs(16, 64, 200, 14.0, dtype, dense_rows=1, seed=11)
    f.x[3] = 0.0                                             # a token with no active neuron (g = 0)
    w = twell.prepare_weights(f.w_gate, f.w_up, f.w_down, tile=64, cap=8)
    counts, pairs = gate_twell(f.x, w.w_gate, 64, 8)
    assert int(counts[3].sum()) == 0 and (counts > 8).any(1).sum() >= 1 and (counts <= 8).all(1).sum() >= 10
    outs = []
    for pf in (False, True):
        y = torch.empty_like(f.x)
        updown(f.x, w.w_gate, w.w_up, w.w_down_t, counts, pairs, y, tile=64, cap=8, col0=0,
               entries=entries, prefetch=pf, overflow_entries=overflow_entries if pf else 0)
        outs.append(y)
    ref = twell.ffn_reference(f.x, f.w_gate, f.w_up, f.w_down)
    assert rel(outs[1], ref) < TOL[dtype]
    assert torch.allclose(outs[1].float(), outs[0].float(), rtol=1e-5 if dtype == torch.float32 else 1e-2,
                          atol=1e-6 if dtype == torch.float32 else 1e-2)
    assert torch.equal(outs[1][3], torch.zeros_like(outs[1][3]))


def test_all_zero_activations():
    f = inputs(20, 64, 150, 5.0, torch.float32)
    f.w_gate[:, 0] = -100.0                                 # every gate negative
    w = twell.prepare_weights(f.w_gate, f.w_up, f.w_down, tile=64, cap=8)
    y, fire = twell.twell_ffn(f.x, w, return_fire_counts=True)
    assert torch.equal(y, torch.zeros_like(y)) and int(fire.sum()) == 0


def test_hot_neurons_calibrated():
    f = inputs(48, 64, 400, 30.0, torch.float32, dense_rows=1, seed=5)
    w0 = twell.prepare_weights(f.w_gate, f.w_up, f.w_down, tile=64, cap=8)
    _, fire = twell.twell_ffn(f.x, w0, return_fire_counts=True)
    w = twell.calibrate(w0, fire, 48, n_hot=128)
    assert w.n_hot == 128
    assert fire[w.perm[:128]].min() >= fire[w.perm[128:]].max()    # popular ones moved first
    assert torch.allclose(w.w_down_orig(), f.w_down) and torch.allclose(w.w_gate_orig(), f.w_gate)
    check_ffn(f, w, torch.float32)
    assert twell.calibrate(w0, fire, 48, min_rate=0.0).n_hot % 64 == 0
    check_ffn(f, twell.calibrate(w0, fire, 48, n_hot=384), torch.float32)  # all but a partial tile hot


def test_m_zero_and_cpu_fallback(monkeypatch):
    f = inputs(9, 64, 100, 5.0, torch.float32)
    w = twell.prepare_weights(f.w_gate, f.w_up, f.w_down, tile=64, cap=8)
    assert twell.twell_ffn(f.x[:0], w).shape == (0, 64)
    if DEV == "cpu":   # without the interpreter a CPU tensor takes the torch reference
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        y = twell.twell_ffn(f.x, w)
        assert torch.allclose(y, twell.ffn_reference(f.x, f.w_gate, f.w_up, f.w_down), atol=1e-5)


def test_clear_errors():
    f = inputs(8, 64, 100, 5.0, torch.float32)
    w = twell.prepare_weights(f.w_gate, f.w_up, f.w_down, tile=64, cap=8)
    with pytest.raises(ValueError, match="not contiguous"):
        twell.twell_ffn(f.x.t().contiguous().t(), w)
    with pytest.raises(ValueError, match=r"expected \[\*, 64\]"):
        twell.twell_ffn(f.x[:, :32].contiguous(), w)
    with pytest.raises(ValueError, match="dtype"):
        twell.twell_ffn(f.x.double(), w)
    with pytest.raises(ValueError, match="weights are torch.float32"):
        twell.twell_ffn(f.x.half(), w)
    with pytest.raises(ValueError, match="w_down has shape"):
        twell.prepare_weights(f.w_gate, f.w_up, f.w_down.t().contiguous())
    with pytest.raises(ValueError, match="tile"):
        twell.prepare_weights(f.w_gate, f.w_up, f.w_down, tile=100)
    with pytest.raises(ValueError, match="n_hot"):
        twell.calibrate(w, torch.zeros(100), 8, n_hot=70)
    with pytest.raises(ValueError, match="overflow"):
        twell.twell_ffn(f.x, w, overflow="truncate")
    with pytest.raises(ValueError, match="overflow_row_cap"):
        twell.twell_ffn(f.x, w, overflow_row_cap=-1)
    with pytest.raises(ValueError, match="gate_chunk_rows"):
        twell.twell_ffn(f.x, w, gate_chunk_rows=0)


# ---------------------------------------------------------------- GPU only (real shapes)
@pytest.mark.gpu
@pytest.mark.parametrize("h", [1408, 2816, 5632])
def test_gpu_realistic_bf16(h, monkeypatch):
    f = inputs(3000, 2048, h, 29.0 * h / 5632, torch.bfloat16, dense_rows=4, seed=h)
    w0 = twell.prepare_weights(f.w_gate, f.w_up, f.w_down)
    y = check_ffn(f, w0, torch.bfloat16)
    ref = twell.ffn_reference(f.x, f.w_gate, f.w_up, f.w_down)
    assert rel(y, ref) < 1e-2
    _, fire = twell.twell_ffn(f.x, w0, return_fire_counts=True)
    w = twell.calibrate(w0, fire, 3000, n_hot=512)
    assert rel(twell.twell_ffn(f.x, w), ref) < 1e-2
    # the walk of each 1000-row gate chunk on a side stream, beside the next chunk's GEMM; each
    # walk is held back by a sleep kernel on its stream, so a missing wait would show as a wrong y
    y_serial, fire_serial = twell.twell_ffn(f.x, w, overlap=False, gate_chunk_rows=1000, return_fire_counts=True)
    import kernels.twell.ffn as ffn_mod
    real_updown = ffn_mod.updown

    def slow_updown(*args, **kwargs):
        torch.cuda._sleep(2_000_000)
        return real_updown(*args, **kwargs)
    monkeypatch.setattr(ffn_mod, "updown", slow_updown)
    y_side, fire_side = twell.twell_ffn(f.x, w, overlap=True, gate_chunk_rows=1000, return_fire_counts=True)
    assert rel(y_side, ref) < 1e-2 and torch.equal(fire_side, fire_serial)
    clean = f.x[:, 0] >= 0   # dense rows are recomputed with fp32 atomics, in any order
    assert torch.equal(y_side[clean], y_serial[clean]) and rel(y_side, y_serial) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_other_dtypes(dtype):
    f = inputs(1000, 512, 1408, 10.0, dtype, dense_rows=2)
    check_ffn(f, twell.prepare_weights(f.w_gate, f.w_up, f.w_down), dtype)
