"""The rotary kernel against its pure-torch reference (CPU: TRITON_INTERPRET=1, set in conftest),
forward and backward, and RMSNorm against the fp32 formula (x / rms(x) * gain, rounded once)."""
import math

import pytest
import torch

from conftest import kernel_device
from kernels.rotary import rotary, rotary_reference
from kernels.rotary.kernel import RotaryFunction, rotary_apply, rows_per_program
from megasparse.model.attention import RMSNorm, rotary_tables

DEV = kernel_device()
# the kernel and the reference both compute in fp32 and round once; the interpreter's fp32->bf16
# cast truncates where torch rounds, so allow one ulp of the output dtype
TOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def case(batch, seq, heads, head_dim, dtype, table_len=None, seed=0, table_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, heads, head_dim, generator=g).to(DEV, dtype)
    cos, sin = rotary_tables(head_dim, table_len or seq, 10000.0, device=DEV)
    return x, cos.to(table_dtype), sin.to(table_dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 5, 3, 6), (1, 7, 2, 64), (3, 4, 1, 2)])
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])   # bf16: a model cast whole
def test_kernel_matches_reference_forward_and_backward(shape, dtype, table_dtype):
    x, cos, sin = case(*shape, dtype, table_len=shape[1] + 3, table_dtype=table_dtype)   # longer, as the model passes
    x.requires_grad_(True)
    out = RotaryFunction.apply(x, cos, sin)
    ref = rotary_reference(x.detach(), cos, sin)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype] * 4, rtol=TOL[dtype])
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEV, dtype)
    (dx,) = torch.autograd.grad(out, x, grad)
    xr = x.detach().clone().requires_grad_(True)
    (dx_ref,) = torch.autograd.grad(rotary_reference(xr, cos, sin), xr, grad)
    torch.testing.assert_close(dx.float(), dx_ref.float(), atol=TOL[dtype] * 4, rtol=TOL[dtype])


@pytest.mark.parametrize("head_dim", [2, 64, 80, 96, 128, 160, 192, 256])
def test_gpu_launch_config_runs_for_every_head_dim(head_dim):
    """The GPU's rows per program is a power of two for any head_dim (a tl.arange length), and
    the kernel with that many rows equals the reference (here under the interpreter)."""
    rows = rows_per_program(head_dim)
    assert rows & (rows - 1) == 0 and 1 <= rows <= 64
    x, cos, sin = case(1, 3, 3, head_dim, torch.float32)
    torch.testing.assert_close(rotary_apply(x, cos, sin, rows=rows), rotary_reference(x, cos, sin),
                               atol=1e-6, rtol=1e-6)


def test_rotation_is_the_textbook_one_and_its_inverse_undoes_it():
    """Pair (x_i, x_{i+d/2}) at position t is rotated by t * theta^(-2i/d): checked against
    complex multiplication, and rotary_apply(inverse=True) gives x back."""
    x, cos, sin = case(1, 6, 2, 8, torch.float32)
    out = rotary_apply(x, cos, sin)
    half = 4
    t = torch.arange(6, dtype=torch.float64, device=DEV)[:, None]
    freq = 10000.0 ** (-torch.arange(half, dtype=torch.float64, device=DEV) * 2 / 8)
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * torch.polar(torch.ones_like(t * freq), t * freq)[None, :, None]
    torch.testing.assert_close(out.double(), torch.cat((z.real, z.imag), -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rotary_apply(out, cos, sin, inverse=True), x, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, x)   # position > 0 really rotates


def test_cpu_dispatch_is_the_reference_and_is_differentiable():
    x, cos, sin = case(2, 3, 2, 4, torch.float32)
    x = x.cpu().requires_grad_(True)
    out = rotary(x, cos.cpu(), sin.cpu())
    assert torch.equal(out, rotary_reference(x, cos.cpu(), sin.cpu()))
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("bad, match", [
    (lambda x, c, s: (x[..., :5], c, s), "even head_dim"),
    (lambda x, c, s: (x[0], c, s), r"\[batch, seq, heads, head_dim\]"),
    (lambda x, c, s: (x, c[:2], s), "cos table"),
    (lambda x, c, s: (x, c, s.to(torch.int32)), "sin table"),
])
def test_bad_input_names_what_is_wrong(bad, match):
    x, cos, sin = case(1, 4, 2, 6, torch.float32)
    with pytest.raises(ValueError, match=match):
        rotary_apply(*bad(x, cos, sin))


@pytest.mark.gpu
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_matches_reference_at_model_shape(table_dtype):
    x, cos, sin = case(2, 256, 16, 128, torch.bfloat16, table_len=2048, table_dtype=table_dtype)
    x.requires_grad_(True)
    out = rotary(x, cos, sin)
    ref = rotary_reference(x.detach(), cos, sin)
    assert (out.float() - ref.float()).abs().max() <= 2 ** -7 * ref.float().abs().max()
    grad = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, x, grad)
    xr = x.detach().clone().requires_grad_(True)
    (dx_ref,) = torch.autograd.grad(rotary_reference(xr, cos, sin), xr, grad)
    assert (dx.float() - dx_ref.float()).abs().max() <= 2 ** -7 * dx_ref.float().abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_is_llamas_fp32_formula(dtype):
    torch.manual_seed(0)
    norm = RMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = (torch.randn(3, 7, 48) * 3).to(dtype).requires_grad_(True)
    xf = x.float()
    ref = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.float()
    out = norm(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=0, rtol=1e-6 if dtype == torch.float32 else 2 ** -8)
    out.float().sum().backward()
    assert norm.weight.grad is not None and x.grad is not None
    # the gradient of sum(norm(x)) w.r.t. the gain is sum over tokens of x / rms(x)
    expected = (xf.detach() * torch.rsqrt(xf.detach().pow(2).mean(-1, keepdim=True) + 1e-5)).sum((0, 1))
    assert math.isclose(float((norm.weight.grad.float() - expected).abs().max()), 0.0,
                        abs_tol=1e-4 if dtype == torch.float32 else 0.5)


@pytest.mark.gpu
def test_model_cast_whole_to_bf16_runs_the_fused_norm_and_rotary_on_cuda():
    """.to(bf16) casts the rotary tables (buffers) too; the CUDA forward and backward must still
    agree with the same weights in fp32."""
    from megasparse.config import ModelConfig
    from megasparse.model.transformer import SparseLlama
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, max_seq_len=32)
    ref = SparseLlama(cfg).to("cuda")
    model = SparseLlama(cfg).to("cuda", torch.bfloat16)
    model.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 64, (2, 32), device="cuda")
    out = model(ids, ids)
    out.ce_loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        err = (model.hidden_states(ids).float() - ref.hidden_states(ids)).norm() / ref.hidden_states(ids).norm()
    assert err < 3e-2, err
