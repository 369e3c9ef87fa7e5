import pytest
import torch

from megasparse.config import ModelConfig
from megasparse.model.sparse_mlp import ReluGatedMLP, torch_gated_mlp
from megasparse.model.transformer import SparseLlama


def tiny(**kw):
    base = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, max_seq_len=32)
    base.update(kw)
    return ModelConfig(**base)


def handwritten_mlp(x, wg, wu, wd):
    """Loop-per-token reference written from the formula, independent of the library code."""
    ys, l1 = [], 0.0
    for t in range(x.shape[0]):
        g = torch.stack([x[t] @ wg[j] for j in range(wg.shape[0])])
        u = torch.stack([x[t] @ wu[j] for j in range(wu.shape[0])])
        h = torch.clamp(g, min=0) * u
        ys.append(torch.stack([h @ wd[i] for i in range(wd.shape[0])]))
        l1 = l1 + h.abs().sum()
    return torch.stack(ys), l1 / x.shape[0]


def test_torch_mlp_matches_handwritten_reference():
    torch.manual_seed(0)
    x, wg, wu, wd = torch.randn(5, 8, dtype=torch.float64), torch.randn(12, 8, dtype=torch.float64), \
        torch.randn(12, 8, dtype=torch.float64), torch.randn(8, 12, dtype=torch.float64)
    res = torch_gated_mlp(x, wg, wu, wd)
    y_ref, l1_ref = handwritten_mlp(x, wg, wu, wd)
    torch.testing.assert_close(res.y, y_ref)
    torch.testing.assert_close(res.l1.double(), l1_ref)
    assert torch.equal(res.fire_counts, (x @ wg.t() > 0).sum(0).int())
    assert torch.equal(res.token_nnz, (x @ wg.t() > 0).sum(1).int())


def test_l1_gradient_is_sign_of_h_over_tokens():
    """d l1 / d u_j = sign(h_j) relu(g_j) / M: the gradient the sparse kernels must reproduce."""
    torch.manual_seed(1)
    m = 6
    x = torch.randn(m, 8, dtype=torch.float64)
    wg = torch.randn(10, 8, dtype=torch.float64)
    wu = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    wd = torch.randn(8, 10, dtype=torch.float64)
    res = torch_gated_mlp(x, wg, wu, wd)
    res.l1.backward()
    g, u = x @ wg.t(), x @ wu.detach().t()
    h = torch.relu(g) * u
    expected = ((torch.sign(h) * torch.relu(g)) / m).t() @ x
    torch.testing.assert_close(wu.grad, expected)


def test_l1_gradcheck():
    torch.manual_seed(2)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    wg = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    wu = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    wd = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    fn = lambda *a: (lambda r: (r.y, r.l1))(torch_gated_mlp(*a))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, wg, wu, wd))


@pytest.mark.parametrize("mlp", ["relu_gated", "swiglu"])
@pytest.mark.parametrize("tied", [True, False])
def test_model_forward_backward(mlp, tied):
    torch.manual_seed(0)
    model = SparseLlama(tiny(mlp=mlp, tie_embeddings=tied))
    ids = torch.randint(0, 256, (3, 17))
    out = model(ids[:, :-1], ids[:, 1:])
    assert out.ce_loss.shape == () and torch.isfinite(out.ce_loss)
    assert abs(out.ce_loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.5  # near-uniform at init
    assert out.l1_per_layer.shape == (2,) and out.tokens == 48
    (out.ce_loss + 0.1 * out.aux_loss).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if mlp == "relu_gated":
        assert out.aux_loss > 0 and all(c.shape == (96,) for c in out.fire_counts)
        assert model.layers[0].mlp.gate_weight.grad.abs().sum() > 0
    else:
        assert out.aux_loss == 0 and all(c is None for c in out.fire_counts)


def test_model_is_causal():
    torch.manual_seed(0)
    model = SparseLlama(tiny()).eval()
    ids = torch.randint(0, 256, (1, 12))
    full = model(ids).logits
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 256
    part = model(changed).logits
    torch.testing.assert_close(full[:, :8], part[:, :8])
    assert not torch.allclose(full[:, 8:], part[:, 8:])


@pytest.mark.parametrize("tied", [True, False])
def test_hidden_states_are_what_the_lm_head_reads(tied):
    # the whole-model prefill benchmark times hidden_states(): it must be the forward minus the head
    torch.manual_seed(0)
    model = SparseLlama(tiny(tie_embeddings=tied)).eval()
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        hidden = model.hidden_states(ids)
        logits = model(ids).logits
    assert hidden.shape == (2, 11, model.cfg.d_model)
    torch.testing.assert_close(hidden @ model.head_weight().t(), logits)


def test_mlp_without_stats_computes_the_same_output():
    torch.manual_seed(0)
    mlp = ReluGatedMLP(16, 40, backend="torch")
    for w in mlp.parameters():
        torch.nn.init.normal_(w)
    x = torch.randn(3, 5, 16)
    y, l1, fires, per_token = mlp(x)
    mlp.track_stats = False
    y_lean, l1_lean, fires_lean, per_token_lean = mlp(x)
    torch.testing.assert_close(y_lean, y)
    assert l1 > 0 and fires.shape == (40,) and per_token.shape == (15,)
    assert l1_lean == 0 and fires_lean is None and per_token_lean is None


def test_activation_checkpointing_gives_same_grads():
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, 9))
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = SparseLlama(tiny(activation_checkpointing=ckpt))
        out = model(ids[:, :-1], ids[:, 1:])
        (out.ce_loss + 0.5 * out.aux_loss).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_cpu_auto_backend_is_torch_and_explicit_kernel_backend_errors():
    mlp = ReluGatedMLP(16, 32, backend="auto")
    torch.nn.init.normal_(mlp.gate_weight); torch.nn.init.normal_(mlp.up_weight); torch.nn.init.normal_(mlp.down_weight)
    mlp(torch.randn(2, 3, 16))
    assert mlp.last_backend == "torch"
    from megasparse.errors import ConfigError

    with pytest.raises(ConfigError, match="needs a CUDA device"):
        ReluGatedMLP(16, 32, backend="hybrid")(torch.randn(2, 3, 16))


def test_sequence_too_long_is_clear():
    model = SparseLlama(tiny())
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 40, dtype=torch.long))


def test_twell_weight_layout_key_follows_updates_and_never_caches_zero3_params():
    from megasparse.model.twell_layout import weight_layout_key

    mlp = ReluGatedMLP(16, 32)
    ws = (mlp.gate_weight, mlp.up_weight, mlp.down_weight)
    key = weight_layout_key(*ws)
    assert key is not None and weight_layout_key(*ws) == key
    with torch.no_grad():
        mlp.up_weight.add_(1.0)          # an in-place optimizer update
    assert weight_layout_key(*ws) != key
    mlp.down_weight.ds_id = 7            # what DeepSpeed ZeRO-3 tags its partitioned params with
    assert weight_layout_key(*ws) is None


def test_twell_layout_calibrates_on_its_first_tokens_and_rebuilds_after_an_update():
    """The model's twell layout serves its first tokens on the dense path while counting fires,
    then moves the popular neurons to dense GEMMs; a weight update starts over. Every phase
    computes the same function (the kernels run under the Triton interpreter here)."""
    from kernels import twell
    from kernels.synthetic import make_ffn_inputs
    from megasparse.model.twell_layout import TwellLayout

    f = make_ffn_inputs(40, 32, 300, target_nnz=6.0, seed=2, dtype=torch.float32)
    ref = twell.ffn_reference(f.x, f.w_gate, f.w_up, f.w_down)
    layout = TwellLayout(calibration_tokens=30)
    ws = (f.w_gate, f.w_up, f.w_down)
    y_first = layout(f.x[:20], *ws)
    assert not layout.calibrated and not layout.final and layout.tokens_seen == 20 and layout.last_call_dense
    y_second = layout(f.x[20:], *ws)             # 40 tokens seen: calibrates after this call
    # on CPU the calibrated layout is taken untimed (CUDA times the candidates once)
    assert layout.final and layout.calibrated and layout.weights.n_hot % layout.weights.tile == 0
    assert layout.choice == f"hot{layout.weights.n_hot}" and layout.timings_ms == {}
    fires = ((f.x @ f.w_gate.t()) > 0).sum(0)
    assert torch.equal(layout.fire_counts, fires.int())
    assert layout.nnz_fraction == pytest.approx(fires.sum().item() / (40 * 300))
    hot = layout.weights.perm[:layout.weights.n_hot]
    assert layout.fire_counts[hot].min() >= layout.fire_counts[layout.weights.perm[layout.weights.n_hot:]].max()
    y_hot = layout(f.x, *ws)
    assert not layout.last_call_dense
    for y, r in ((y_first, ref[:20]), (y_second, ref[20:]), (y_hot, ref)):
        assert torch.allclose(y, r, rtol=1e-4, atol=1e-5)
    f.w_up.mul_(2.0)                               # an in-place update: a new layout, calibrated afresh
    y_new = layout(f.x, *ws)
    assert torch.allclose(y_new, 2 * ref, rtol=1e-4, atol=1e-5)
    assert layout.tokens_seen == 40 and layout.calibrated
    never = TwellLayout(calibration_tokens=0)
    assert torch.allclose(never(f.x, *ws), 2 * ref, rtol=1e-4, atol=1e-5) and never.final and not never.calibrated
    with pytest.raises(ValueError, match="calibration_tokens"):
        TwellLayout(calibration_tokens=-1)


def _never_twell(monkeypatch):
    import kernels.twell as twell

    def fail(*args, **kwargs):
        raise AssertionError("the twell kernels ran on activations counted as too dense for them")
    monkeypatch.setattr(twell, "twell_ffn", fail)


def test_twell_layout_keeps_dense_on_dense_activations_when_allowed(monkeypatch):
    """Half the neurons fire (an eval before the L1 term has sparsified the layer): every-neuron-
    sparse would overflow its tiles into a row-by-row walk, so it is never tried. With dense
    allowed (model.mlp_backend=auto) the layer stays on the torch GEMMs; without, it takes the
    hot layout, whose gathered tail is sparse by construction (n_hot=256 here covers the ~205
    neurons that fire at all)."""
    from kernels import twell
    from kernels.synthetic import make_ffn_inputs
    from megasparse.model.twell_layout import DENSE, SPARSE_NNZ_FRACTION, TwellLayout

    f = make_ffn_inputs(48, 32, 300, target_nnz=100.0, seed=4, dtype=torch.float32)
    ref = twell.ffn_reference(f.x, f.w_gate, f.w_up, f.w_down)
    ws = (f.w_gate, f.w_up, f.w_down)
    auto = TwellLayout(calibration_tokens=24, allow_dense=True)
    with monkeypatch.context() as m:
        _never_twell(m)
        ys = [auto(f.x[:24], *ws), auto(f.x[24:], *ws), auto(f.x, *ws)]
    assert auto.final and auto.choice == DENSE and auto.weights is None and auto.last_call_dense
    assert auto.nnz_fraction > SPARSE_NNZ_FRACTION
    for y, r in zip(ys, (ref[:24], ref[24:], ref)):
        assert torch.allclose(y, r, rtol=1e-4, atol=1e-5)
    explicit = TwellLayout(calibration_tokens=24)          # model.mlp_backend=twell: no dense choice
    explicit(f.x[:24], *ws)
    assert explicit.final and explicit.calibrated and explicit.choice.startswith("hot")
    cold = explicit.weights.perm[explicit.weights.n_hot:]
    assert (explicit.fire_counts[cold] <= 0.006 * 24).all()   # the gathered tail: rarely-firing neurons
    assert torch.allclose(explicit(f.x, *ws), ref, rtol=1e-4, atol=1e-5) and not explicit.last_call_dense


def test_twell_layout_with_dense_allowed_on_sparse_activations_and_uncached_weights(monkeypatch):
    """Sparse activations keep the twell kernels on CPU (untimed) even with dense allowed.
    Uncached (ZeRO-3 gathered) weights can never be counted: with dense allowed they are served
    dense and no twell copy is built; without, every neuron sparse as before. Turning dense on or
    off starts a new layout."""
    from kernels import twell
    from kernels.synthetic import make_ffn_inputs
    from megasparse.model.twell_layout import ALL_SPARSE, DENSE, TwellLayout

    f = make_ffn_inputs(40, 32, 300, target_nnz=6.0, seed=2, dtype=torch.float32)
    ref = twell.ffn_reference(f.x, f.w_gate, f.w_up, f.w_down)
    ws = (f.w_gate, f.w_up, f.w_down)
    layout = TwellLayout(calibration_tokens=40, allow_dense=True)
    layout(f.x, *ws)
    assert layout.final and layout.choice.startswith("hot") and layout.calibrated
    layout.allow_dense = False                     # a change of mind starts over
    assert layout.key is None
    layout(f.x, *ws)
    assert layout.final and layout.tokens_seen == 40 and layout.last_call_dense   # counted afresh, not 80
    gathered = [w.clone() for w in ws]
    for w in gathered:
        w.ds_id = 1                                # what DeepSpeed ZeRO-3 tags its partitions with
    uncached = TwellLayout(allow_dense=True)
    with monkeypatch.context() as m:
        _never_twell(m)
        y = uncached(f.x, *gathered)
    assert uncached.choice == DENSE and uncached.weights is None and torch.allclose(y, ref, rtol=1e-4, atol=1e-5)
    plain = TwellLayout()
    y = plain(f.x, *gathered)
    assert plain.final and plain.choice == ALL_SPARSE and torch.allclose(y, ref, rtol=1e-4, atol=1e-5)
    bad = TwellLayout(preset_n_hot=64)            # a failed build is retried, never half-kept
    for _ in range(2):
        with pytest.raises(ValueError, match="multiple of the twell tile"):
            bad(f.x, *ws)


def test_twell_layout_reuses_its_last_timed_kind_while_nnz_stays_within_2x(monkeypatch):
    """A layout rebuilt after a weight update (each eval during training) keeps the kind of layout
    it timed last, without timing again, unless nnz/H moved past 2x, the call size changed, or it
    has been reused RETIME_AFTER_REBUILDS times. The timer is faked here (CUDA-only for real)."""
    import megasparse.model.twell_layout as tl

    times = iter([3.0, 1.0, 2.0,     # all sparse, hot, dense: hot wins
                  3.0, 2.0, 1.0,     # after nnz/H tripled: dense wins
                  1.0, 2.0, 3.0,     # another call size: all sparse wins
                  2.0, 3.0, 1.0])    # after the reuse limit: dense wins
    timed = []

    def fake_timer(call, *args):
        timed.append(call)
        return next(times)
    monkeypatch.setattr(tl, "back_to_back_ms", fake_timer)
    layout = tl.TwellLayout(allow_dense=True)
    x16, x8 = torch.zeros(16, 4), torch.zeros(8, 4)

    def choose(x, nnz, n_hot):
        layout.nnz_fraction = nnz
        return layout._time(None, {tl.ALL_SPARSE: 0, f"hot{n_hot}": 1, tl.DENSE: None}, x, None, None, None)

    assert choose(x16, 0.01, 128) == "hot128" and len(timed) == 3
    assert choose(x16, 0.019, 256) == "hot256" and len(timed) == 3          # same kind, new n_hot, untimed
    assert choose(x16, 0.006, 128) == "hot128" and len(timed) == 3
    assert choose(x16, 0.03, 128) == tl.DENSE and len(timed) == 6           # 3x the timed nnz/H
    assert choose(x8, 0.03, 128) == tl.ALL_SPARSE and len(timed) == 9       # calls of another size
    for _ in range(tl.RETIME_AFTER_REBUILDS):
        assert choose(x8, 0.03, 128) == tl.ALL_SPARSE and len(timed) == 9
    assert choose(x8, 0.03, 128) == tl.DENSE and len(timed) == 12           # re-timed after the limit
    layout.allow_dense = False                                              # another candidate set
    assert layout._last_timed is None


def _deepspeed_twell_worker(rank, world, port):
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import deepspeed

    from kernels import twell
    from kernels.synthetic import make_ffn_inputs
    from megasparse.model.twell_layout import weight_layout_key
    from megasparse.train.distributed import init_distributed

    init_distributed("cpu", "gloo")
    f = make_ffn_inputs(24, 32, 300, target_nnz=6.0, seed=2, dtype=torch.float32)
    mlp = ReluGatedMLP(32, 300)
    with torch.no_grad():
        for p, w in ((mlp.gate_weight, f.w_gate), (mlp.up_weight, f.w_up), (mlp.down_weight, f.w_down)):
            p.copy_(w)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
              "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True}
    engine, _, _, _ = deepspeed.initialize(model=mlp, optimizer=torch.optim.AdamW(mlp.parameters(), lr=1e-2),
                                           config=config)
    ws = (mlp.gate_weight, mlp.up_weight, mlp.down_weight)
    layout = mlp._twell_layout
    layout.calibration_tokens = 0              # final at once: every neuron sparse, from copies
    with torch.no_grad():
        y_before = layout(f.x, *ws)
    key = layout.key
    y, l1, _, _ = engine(f.x[None])
    engine.backward((y.float() ** 2).mean() + l1)
    engine.step()
    fresh = twell.ffn_reference(f.x, *(w.detach() for w in ws))
    assert not torch.allclose(fresh, y_before, rtol=1e-3, atol=1e-4)      # the step moved the weights
    assert weight_layout_key(*ws) == key                                   # ... invisibly to the key
    with torch.no_grad():
        assert torch.allclose(layout(f.x, *ws), y_before)                  # so the copies are stale
        mlp.weights_updated()
        assert torch.allclose(layout(f.x, *ws), fresh, rtol=1e-4, atol=1e-5)
    engine.destroy()


@pytest.mark.slow
def test_twell_layout_is_rebuilt_after_a_deepspeed_step_only_when_told():
    """DeepSpeed's ZeRO optimizer writes the new weights without moving the parameters' version
    counters, so the twell layout's cache key cannot see the step: ReluGatedMLP.weights_updated()
    (SparseLlama.weights_updated(), which Trainer.evaluate calls first) must rebuild it."""
    import torch.multiprocessing as mp

    from tests.trainer_utils import _port

    mp.spawn(_deepspeed_twell_worker, args=(1, _port()), nprocs=1, join=True)


def test_sparse_llama_weights_updated_invalidates_every_twell_layout():
    model = SparseLlama(tiny())
    for layer in model.layers:
        layer.mlp._twell_layout.key = ("built",)
    model.weights_updated()
    assert all(layer.mlp._twell_layout.key is None for layer in model.layers)
    assert SparseLlama(tiny(mlp="swiglu")).weights_updated() is None   # no sparse MLPs: nothing to do
