"""kernels/twell/union.py (the FFN over each row block's union of active neurons) against the
pure-torch reference (CPU: TRITON_INTERPRET=1, set in conftest). Grids stay small: the
interpreter costs ~2.5 ms per program-iteration."""
import pytest
import torch

from conftest import kernel_device
from kernels import twell
from kernels.synthetic import make_ffn_inputs
from kernels.twell.union import union_blocks, union_ffn, union_sizes_reference
from test_twell import TOL, rel   # the twell_ffn tests' tolerances: the same rounding steps

DEV = kernel_device()


def layer(m, d, h, nnz, dtype, dense_rows=0, seed=0):
    f = make_ffn_inputs(m, d, h, target_nnz=nnz, dense_rows=dense_rows, dtype=dtype, device=DEV, seed=seed)
    return f, twell.prepare_weights(f.w_gate, f.w_up, f.w_down)


@pytest.mark.parametrize("m,d,h,nnz,dtype,block_rows,chunk_rows", [
    (37, 64, 200, 6.0, torch.float32, 16, None),    # M not a multiple of the block
    (70, 96, 300, 8.0, torch.bfloat16, 32, 32),     # several gate chunks
    (33, 256, 1408, 20.0, torch.float16, 16, 40),   # tp=4 width; chunk rounded down to whole blocks
    (16, 128, 129, 60.0, torch.float32, 16, None),  # H one past a power of two, dense-ish rows
])
def test_union_ffn_matches_reference(m, d, h, nnz, dtype, block_rows, chunk_rows):
    f, w = layer(m, d, h, nnz, dtype)
    y, sizes = union_ffn(f.x, w, block_rows=block_rows, chunk_rows=chunk_rows, return_union_sizes=True)
    ref = twell.ffn_reference(f.x, f.w_gate, f.w_up, f.w_down)
    assert y.shape == f.x.shape and y.dtype == dtype
    assert rel(y, ref) < TOL[dtype]
    want = union_sizes_reference(f.x, w, block_rows)
    assert sizes.shape == want.shape
    assert (sizes.long() - want.long()).abs().max() <= 2   # a gate within rounding of 0 may flip


def test_union_pass_compacts_the_block_in_place():
    torch.manual_seed(0)
    g = torch.randn(40, 150, device=DEV) - 1.5          # ~7% positive
    g[5] = torch.rand(150, device=DEV) + 0.1             # one fully dense row: its block's union is all
    g[32:] = -1.0                                         # an all-zero block
    want = torch.relu(g.clone())
    idx, cnt = union_blocks(g, 16)
    assert cnt.tolist()[0] == 150 and cnt.tolist()[2] == 0
    for b in range(3):
        rows = slice(16 * b, min(40, 16 * b + 16))
        cols = torch.nonzero(want[rows].amax(0) > 0).squeeze(1)
        n = int(cnt[b])
        assert n == cols.numel() and torch.equal(idx[b, :n].long(), cols)
        assert torch.equal(g[rows, :n], want[rows][:, cols])


def test_union_all_zero_and_fully_dense_rows():
    f, w = layer(40, 64, 150, 5.0, torch.float32, dense_rows=3, seed=2)
    ref = twell.ffn_reference(f.x, f.w_gate, f.w_up, f.w_down)
    assert rel(union_ffn(f.x, w, block_rows=16), ref) < TOL[torch.float32]
    f, _ = layer(40, 64, 150, 5.0, torch.float32, seed=2)
    f.w_gate[:, 0] = -100.0                               # every gate negative
    w = twell.prepare_weights(f.w_gate, f.w_up, f.w_down)
    y, sizes = union_ffn(f.x, w, block_rows=16, return_union_sizes=True)
    assert torch.equal(y, torch.zeros_like(y)) and int(sizes.sum()) == 0


def test_union_any_neuron_order_and_empty_input():
    f, w0 = layer(24, 64, 256, 10.0, torch.float32, seed=3)
    _, fire = twell.twell_ffn(f.x, w0, return_fire_counts=True)
    w = twell.calibrate(w0, fire, 24, n_hot=128)           # permuted, with hot columns: ignored here
    ref = twell.ffn_reference(f.x, f.w_gate, f.w_up, f.w_down)
    assert rel(union_ffn(f.x, w, block_rows=16), ref) < TOL[torch.float32]
    assert union_ffn(f.x[:0], w, block_rows=16).shape == (0, 64)


def test_union_clear_errors():
    f, w = layer(8, 64, 100, 5.0, torch.float32)
    with pytest.raises(ValueError, match="block_rows"):
        union_ffn(f.x, w, block_rows=48)
    for bad in (0, True, 2.5):
        with pytest.raises(ValueError, match="chunk_rows"):
            union_ffn(f.x, w, chunk_rows=bad)
    with pytest.raises(ValueError, match="not contiguous"):
        union_ffn(f.x.t().contiguous().t(), w)
    with pytest.raises(TypeError, match="prepare_weights"):
        union_ffn(f.x, (f.w_gate, f.w_up, f.w_down))
