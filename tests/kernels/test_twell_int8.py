"""The walk's optional int8 rows (kernels/twell/quant.py) against their torch reference.

CPU: TRITON_INTERPRET=1 (conftest). The kernel must equal the reference that uses the same
dequantized rows (exactly the function it computes), and stay near the exact FFN.
"""
import pytest
import torch

from conftest import kernel_device
from kernels import twell
from kernels.twell.quant import quantize_rows_int8
from kernels.twell.updown import updown
from test_twell import TOL, inputs, rel

DEV = kernel_device()


def test_quantize_rows_int8_roundtrip_and_zero_rows():
    w = torch.randn(5, 33, dtype=torch.float64)
    w[2] = 0.0
    r = quantize_rows_int8(w)
    assert r.q.dtype == torch.int8 and r.scale.dtype == torch.float32 and r.q.is_contiguous()
    assert int(r.q.abs().max()) == 127                       # each nonzero row uses the full range
    assert torch.equal(r.q[2], torch.zeros(33, dtype=torch.int8)) and float(r.scale[2]) == 1.0
    err = (r.dequantize().double() - w).abs()
    assert (err <= r.scale.double()[:, None] / 2 + 1e-7).all()   # round to nearest
    with pytest.raises(ValueError, match="matrix"):
        quantize_rows_int8(torch.zeros(3))


@pytest.mark.parametrize("dtype,n_hot", [(torch.float32, 0), (torch.bfloat16, 128), (torch.float16, 64)])
def test_int8_walk_matches_its_reference(dtype, n_hot):
    f = inputs(41, 96, 330, 12.0, dtype, seed=7)      # H=330: a partial last tile
    w0 = twell.prepare_weights(f.w_gate, f.w_up, f.w_down, tile=64, cap=16)
    _, fire = twell.twell_ffn(f.x, w0, return_fire_counts=True)
    w = twell.quantize_cold_rows(twell.calibrate(w0, fire, 41, n_hot=n_hot))
    y = twell.twell_ffn(f.x, w)
    ref_q = twell.twell_ffn_reference(f.x.float(), w)       # dequantized walk rows, fp32
    assert rel(y, ref_q) < TOL[dtype]
    exact = twell.ffn_reference(f.x, f.w_gate, f.w_up, f.w_down)
    err = rel(y, exact)
    assert err < 2.5e-2, f"int8 rows moved y by {err:.2e}"
    # the quantization is really used: the fp32 result differs from the exact one beyond rounding
    if dtype == torch.float32:
        assert err > 1e-4


def test_int8_rows_survive_calibrate_order():
    # quantize first, then calibrate: reorder must permute the int8 copies with the rows
    f = inputs(30, 64, 200, 10.0, torch.float32, seed=2)
    w0 = twell.quantize_cold_rows(twell.prepare_weights(f.w_gate, f.w_up, f.w_down, tile=64, cap=16))
    _, fire = twell.twell_ffn(f.x, w0, return_fire_counts=True)
    w = twell.calibrate(w0, fire, 30, n_hot=64)
    assert torch.allclose(w.up_int8.dequantize(), w.w_up, atol=float(w.up_int8.scale.max()))
    later = twell.calibrate(twell.prepare_weights(f.w_gate, f.w_up, f.w_down, tile=64, cap=16), fire, 30, n_hot=64)
    assert rel(twell.twell_ffn(f.x, w), twell.twell_ffn(f.x, twell.quantize_cold_rows(later))) < 1e-6


def test_int8_walk_with_fully_dense_rows():
    # cap=4: the dense rows overflow; listed tokens are recomputed with the exact rows, tokens past
    # the list (row_cap=1) walk their overflowed tiles through the int8 rows. Both stay close.
    f = inputs(24, 64, 330, 12.0, torch.float32, dense_rows=3, seed=3)
    w = twell.quantize_cold_rows(twell.prepare_weights(f.w_gate, f.w_up, f.w_down, tile=64, cap=4))
    exact = twell.ffn_reference(f.x, f.w_gate, f.w_up, f.w_down)
    ref_q = twell.twell_ffn_reference(f.x, w)
    for row_cap in (256, 1):
        y = twell.twell_ffn(f.x, w, overflow_row_cap=row_cap)
        assert torch.isfinite(y).all()
        assert rel(y, exact) < 2.5e-2
        assert rel(y, ref_q) < 2.5e-2


def test_int8_rows_must_come_together():
    f = inputs(8, 64, 64, 5.0, torch.float32)
    w = twell.quantize_cold_rows(twell.prepare_weights(f.w_gate, f.w_up, f.w_down, tile=64, cap=16))
    counts = torch.zeros(8, 1, dtype=torch.int32, device=DEV)
    pairs = torch.zeros(8, 1, 16, dtype=torch.int64, device=DEV)
    y = torch.empty_like(f.x)
    with pytest.raises(ValueError, match="int8 rows go together"):
        updown(f.x, w.w_gate, w.up_int8.q, w.w_down_t, counts, pairs, y, tile=64, cap=16, col0=0,
               up_scale=w.up_int8.scale, down_scale=w.down_t_int8.scale)
    with pytest.raises(ValueError, match="int8 rows go together"):
        updown(f.x, w.w_gate, w.up_int8.q, w.down_t_int8.q, counts, pairs, y, tile=64, cap=16, col0=0)
