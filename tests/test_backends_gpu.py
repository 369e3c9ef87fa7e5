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
    layout = mlp._twell_layout
    with torch.no_grad():
        y = mlp(x[None])[0]                      # counting fires on the dense path
        y_ref = ref(x[None])[0]
    assert mlp.last_backend == "torch" and layout.tokens_seen == 4096 and not layout.final
    assert rel(y, y_ref) < 1e-2
    # 8192 tokens in, the layout has timed every-neuron-sparse against popular neurons dense
    # once (no dense candidate: the backend was asked for by name), and keeps the faster
    with torch.no_grad():
        mlp(x[None])
        y2 = mlp(x[None])[0]
    assert layout.final and len(layout.timings_ms) == 2
    assert "all sparse" in layout.timings_ms and "dense" not in layout.timings_ms
    assert layout.choice == min(layout.timings_ms, key=layout.timings_ms.get)
    assert layout.calibrated == (layout.choice != "all sparse")
    assert mlp.last_backend == "twell" and rel(y2, y_ref) < 1e-2
    first_choice = layout.choice
    # The cached kernel layout must follow a weight update.
    with torch.no_grad():
        mlp.up_weight.mul_(2.0)
        ref.up_weight.mul_(2.0)
        y3 = mlp(x[None])[0]
        y3_ref = ref(x[None])[0]
        assert not layout.final and layout.tokens_seen == 4096
        mlp(x[None])
        y4 = mlp(x[None])[0]
    assert rel(y3, y3_ref) < 1e-2 and rel(y3, 2 * y_ref) < 2e-2
    assert layout.final and mlp.last_backend == "twell" and rel(y4, y3_ref) < 1e-2
    # the same nnz/H (the gate did not change), so the kind timed before is kept untimed
    assert layout.timings_ms == {} and (layout.choice == "all sparse") == (first_choice == "all sparse")


def test_auto_layout_times_dense_too_and_never_times_all_sparse_on_dense_activations():
    """model.mlp_backend=auto in eval: the layout also times the torch GEMMs and keeps the fastest.
    On a layer where half the neurons fire (an eval before the L1 term has made it sparse)
    every-neuron-sparse is never run: its tiles would overflow into the row-by-row walk."""
    for nnz, sparse in ((29.0, True), (1400.0, False)):
        mlp, x = sparse_mlp("auto", nnz=nnz)
        ref, _ = sparse_mlp("torch", nnz=nnz)
        layout = mlp._twell_layout
        with torch.no_grad():
            mlp(x[None])
            mlp(x[None])                         # 8192 tokens: times the candidates
            y = mlp(x[None])[0]
            y_ref = ref(x[None])[0]
        assert layout.final and layout.allow_dense and "dense" in layout.timings_ms
        assert ("all sparse" in layout.timings_ms) == sparse and (layout.nnz_fraction <= 0.05) == sparse
        assert layout.choice == min(layout.timings_ms, key=layout.timings_ms.get)
        assert mlp.last_backend == ("torch" if layout.choice == "dense" else "twell")
        assert rel(y, y_ref) < 1e-2, (nnz, layout.choice)


def test_twell_backend_replays_from_a_cuda_graph():
    """The twell MLP has no host sync once its layout is built, so an inference forward can be
    captured and replayed: the remedy for eager calls that are host-bound (tensor-parallel widths,
    kernels/twell/NOTES.md run 12). A graph captured while the layout is still counting records
    the dense path; one captured after calibration keeps its layout alive, so both replays stay
    exact on new input."""
    mlp, x = sparse_mlp("twell")
    ref, _ = sparse_mlp("torch")
    layout = mlp._twell_layout

    def capture():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side):
                y = mlp(x[None])[0]
        torch.cuda.current_stream().wait_stream(side)
        return graph, y

    with torch.no_grad():
        mlp(x[None])                             # builds the layout, counts 4096 tokens
        early, y_early = capture()               # captured while still counting: nothing counted
        assert layout.tokens_seen == 4096 and not layout.final
        mlp(x[None])                             # 8192 tokens: calibrates, may replace the layout
        assert layout.final
        late, y_late = capture()
        x_new = torch.randn_like(x)              # other tokens of the generator (feature 0: its bias input)
        x_new[:, 0] = 1.0
        x.copy_(x_new)                           # new input in the captured buffer: replays must follow it
        torch.cuda.empty_cache()
        early.replay()
        late.replay()
        torch.cuda.synchronize()
        y_ref = ref(x[None])[0]
    assert rel(y_early, y_ref) < 1e-2 and rel(y_late, y_ref) < 1e-2


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
    mlp.calibration.enabled = False     # the threshold rule alone (calibration: the next test)
    mlp.sparse_nnz_threshold = 0.05
    mlp.measured_nnz_fraction = 0.5
    mlp(x[None])
    assert mlp.last_backend == "torch"
    mlp.measured_nnz_fraction = 0.01
    mlp(x[None])
    assert mlp.last_backend == "hybrid"
    with torch.no_grad():
        mlp(x[None])
    layout = mlp._twell_layout
    assert mlp.last_backend == "torch" and layout.tokens_seen == 4096   # counting its first 8192 tokens densely
    with torch.no_grad():
        mlp(x[None])
        mlp(x[None])
    assert mlp.last_backend == ("torch" if mlp._twell_layout.choice == "dense" else "twell")


def test_hybrid_under_activation_checkpointing_in_the_model():
    """The whole model with hybrid MLPs, activation checkpointing on vs off, over several steps
    (the first is exact, later ones run on remembered capacities that change between a layer's
    forward and its recompute): the same gradients."""
    from megasparse.config import ModelConfig
    from megasparse.model.transformer import SparseLlama

    ids = torch.randint(0, 256, (4, 65), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    grads = {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=256, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2,
                          ffn_hidden=512, max_seq_len=64, mlp_backend="hybrid",
                          activation_checkpointing=ckpt)
        model = SparseLlama(cfg).cuda()
        for step in range(3):
            model.zero_grad(set_to_none=True)
            out = model(ids[:, :-1], ids[:, 1:])
            (out.ce_loss + 0.01 * out.aux_loss).backward()
        assert all(m.last_backend == "hybrid" for m in model.modules() if isinstance(m, ReluGatedMLP))
        grads[ckpt] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert rel(grads[True], grads[False]) < 1e-4


def test_auto_backend_measures_before_switching():
    """At the benchmark's main shape and nnz 10 the sparse kernels win clearly (1.7x in
    bench/results/ffn_train_h100.md): the measured choice is hybrid, taken by the next forward."""
    mlp, x = sparse_mlp("auto", d=2048, h=5632, m=16384, nnz=10.0)
    mlp.measured_nnz_fraction = 0.01
    x = x.clone().requires_grad_(True)
    mlp(x[None])[0].float().sum().backward()
    assert mlp.last_backend == "torch" and mlp.calibration.sample is not None
    choice = mlp.calibrate_pending()
    ms = mlp.calibration.timings_ms
    assert choice == min(ms, key=ms.get) == "hybrid", ms
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in mlp.parameters())
    mlp(x[None])
    assert mlp.last_backend == "hybrid"


def test_model_loss_on_cuda_is_the_fused_cross_entropy():
    """On CUDA the model's loss runs kernels/cross_entropy (backward written over its own logits):
    the same loss and parameter gradients as F.cross_entropy on the logits it returns."""
    from megasparse.config import ModelConfig
    from megasparse.model.transformer import SparseLlama

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=1000, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=512,
                      max_seq_len=64, mlp_backend="torch")
    model = SparseLlama(cfg).cuda().to(torch.bfloat16)
    ids = torch.randint(0, 1000, (4, 65), device="cuda")
    grads = {}
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        if fused:
            loss = model(ids[:, :-1], ids[:, 1:]).ce_loss
        else:
            logits = model(ids[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, 1000), ids[:, 1:].reshape(-1))
        loss.backward()
        grads[fused] = (loss.detach(), torch.cat([p.grad.float().flatten() for p in model.parameters()]))
    assert abs(grads[True][0] - grads[False][0]) < 1e-4 * grads[False][0]
    assert rel(grads[True][1], grads[False][1]) < 1e-2
