"""The MLP's dispatch point on a GPU: the twell (inference) and hybrid (training) backends
compute the same function as the torch path, through the model's own module."""
import pytest
import torch

from kernels.synthetic import make_ffn_inputs
from megasparse.model.sparse_mlp import ReluGatedMLP

pytestmark = pytest.mark.gpu


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def sparse_mlp(backend, d=1024, h=2816, m=4096, nnz=29.0):
    inp = make_ffn_inputs(m, d, h, target_nnz=nnz, device="cuda", dtype=torch.bfloat16, seed=3)
    mlp = ReluGatedMLP(d, h, backend=backend).cuda().to(torch.bfloat16)
    with torch.no_grad():
        mlp.gate_weight.copy_(inp.w_gate)
        mlp.up_weight.copy_(inp.w_up)
        mlp.down_weight.copy_(inp.w_down)
    return mlp, inp.x


def test_twell_backend_matches_torch_in_eval():
    mlp, x = sparse_mlp("twell")
    ref, _ = sparse_mlp("torch")
    with torch.no_grad():
        y = mlp(x[None])[0]
        y_ref = ref(x[None])[0]
    assert mlp.last_backend == "twell"
    assert rel(y, y_ref) < 1e-2
    # The cached kernel layout must follow a weight update.
    with torch.no_grad():
        mlp.up_weight.mul_(2.0)
        ref.up_weight.mul_(2.0)
        y2 = mlp(x[None])[0]
        y2_ref = ref(x[None])[0]
    assert rel(y2, y2_ref) < 1e-2 and rel(y2, 2 * y_ref) < 2e-2


def test_hybrid_backend_matches_torch_in_training():
    out = {}
    for backend in ("hybrid", "torch"):
        mlp, x = sparse_mlp(backend)
        x = x.clone().requires_grad_(True)
        y, l1, counts, _ = mlp(x[None])
        ((y.float() ** 2).mean() + 0.1 * l1).backward()
        out[backend] = (y, l1, counts, x.grad, mlp.gate_weight.grad, mlp.up_weight.grad, mlp.down_weight.grad)
        assert mlp.last_backend == backend
    for a, b in zip(out["hybrid"], out["torch"]):
        if a.dtype == torch.int32:
            assert torch.equal(a, b)
        else:
            assert rel(a, b) < 1e-2


def test_auto_backend_switches_on_measured_nnz():
    mlp, x = sparse_mlp("auto")
    mlp.sparse_nnz_threshold = 0.05
    mlp.measured_nnz_fraction = 0.5
    mlp(x[None])
    assert mlp.last_backend == "torch"
    mlp.measured_nnz_fraction = 0.01
    mlp(x[None])
    assert mlp.last_backend == "hybrid"
    with torch.no_grad():
        mlp(x[None])
    assert mlp.last_backend == "twell"
