"""kernels.hybrid: the training MLP against its pure-torch reference (forward, l1, fire counts, all
four gradients), under TRITON_INTERPRET=1 on CPU or on CUDA. Shapes are small and odd so that
every partial tile is masked; H=1408 keeps the TP-local width's non-multiple-ness.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

from kernels.hybrid import sparse_gated_mlp, sparse_gated_mlp_reference  # noqa: E402
from kernels.synthetic import make_ffn_inputs  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
LAM = 0.37  # weight of l1 in the test loss, so the L1 gradient path is exercised


@pytest.fixture(autouse=True)
def _fresh_layer_memory(monkeypatch):
    """Each test starts with no remembered hot counts or widths (the layer keys hold storage
    addresses, which a later test's tensors can reuse)."""
    from kernels.hybrid import format as fmt
    for name in ("_CAPS", "_PENDING", "LAST_STATS", "_MAX_COUNT", "_WIDTHS"):
        monkeypatch.setattr(fmt, name, {})


def _loss(fn, params, dy, **kw):
    y, l1, fire = fn(*params, **kw)
    return (y.float() * dy).sum() + LAM * l1, y, l1, fire


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _compare(inp, dtype, tol, **kw):
    """Run kernel and reference on identical leaves; assert outputs and all grads match."""
    base = [t.to(device=DEV, dtype=dtype) for t in (inp.x, inp.w_gate, inp.w_up, inp.w_down)]
    pk = [t.clone().requires_grad_() for t in base]
    pr = [t.clone().requires_grad_() for t in base]
    dy = torch.randn(base[0].shape, device=DEV, generator=torch.Generator(DEV).manual_seed(7))
    lk, yk, l1k, fk = _loss(sparse_gated_mlp, pk, dy, **kw)
    lr, yr, l1r, fr = _loss(sparse_gated_mlp_reference, pr, dy)
    lk.backward()
    lr.backward()
    assert yk.shape == yr.shape and yk.dtype == dtype
    assert l1k.dtype == torch.float32 and l1k.dim() == 0
    assert fk.dtype == torch.int32 and torch.equal(fk.cpu(), fr.cpu()), "fire_counts differ"
    assert _rel(yk, yr) < tol, f"y rel err {_rel(yk, yr)}"
    assert abs(float(l1k) - float(l1r)) <= tol * abs(float(l1r)) + 1e-6
    for name, a, b in zip(("dx", "dW_g", "dW_u", "dW_d"), pk, pr):
        assert a.grad is not None and a.grad.shape == b.grad.shape, name
        assert torch.isfinite(a.grad).all(), name
        assert _rel(a.grad, b.grad) < tol, f"{name} rel err {_rel(a.grad, b.grad)}"
    return fk


CASES = {
    # id: (make_ffn_inputs kwargs, kernel kwargs)
    "odd_shapes_cold_only": (dict(tokens=29, d_model=40, hidden=200, target_nnz=9, seed=1), dict(hot_frac=None)),
    "hot_panel": (dict(tokens=33, d_model=24, hidden=136, target_nnz=12, seed=2), dict(hot_frac=0.15)),
    "dense_rows_heavy": (dict(tokens=30, d_model=24, hidden=96, target_nnz=6, dense_rows=3, seed=3),
                         dict(ell_width=16, hot_frac=None)),
    "skewed_neurons": (dict(tokens=32, d_model=16, hidden=160, target_nnz=10, sigma=2.5, seed=4),
                       dict(hot_frac=0.3)),
    "tp_local_h1408": (dict(tokens=12, d_model=16, hidden=1408, target_nnz=20, seed=5), dict(hot_frac=0.5)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_fp32(case):
    make_kw, kw = CASES[case]
    fire = _compare(make_ffn_inputs(**make_kw, dtype=torch.float32), torch.float32, 1e-4, **kw)
    if case == "dense_rows_heavy":  # the heavy rows really overflowed the ELL width
        inp = make_ffn_inputs(**make_kw, dtype=torch.float32)
        g = inp.x @ inp.w_gate.t()
        assert int((g > 0).sum(1).max()) > kw["ell_width"]
    assert int(fire.sum()) > 0


@pytest.mark.parametrize("case", ["odd_shapes_cold_only", "hot_panel"])
def test_matches_reference_bf16(case):
    # bf16 operands, fp32 accumulation; the hot panel's cuBLAS/torch GEMMs round to bf16.
    make_kw, kw = CASES[case]
    _compare(make_ffn_inputs(**make_kw, dtype=torch.float32), torch.bfloat16, 2e-2, **kw)


def test_all_zero_rows_and_fully_dense_rows():
    inp = make_ffn_inputs(26, 24, 72, target_nnz=5, dense_rows=2, seed=6, dtype=torch.float32)
    inp.x[3:9, 1:] = 0.0        # g = bias < 0 for every neuron: rows with no nonzero at all
    g = inp.x @ inp.w_gate.t()
    assert int((g[3:9] > 0).sum()) == 0
    assert int((g > 0).sum(1).max()) >= 40    # the dense rows fire on most alive neurons
    _compare(inp, torch.float32, 1e-4, ell_width=8, hot_frac=None)


def test_fully_dense_activations_every_path():
    # Every token heavy and every neuron hot: nothing left for the ELL, result still exact.
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(20, 16, generator=gen).abs()
    wg = torch.randn(48, 16, generator=gen).abs() * 0.3
    inp = type("I", (), dict(x=x, w_gate=wg, w_up=torch.randn(48, 16, generator=gen),
                             w_down=torch.randn(16, 48, generator=gen)))
    fire = _compare(inp, torch.float32, 1e-4, ell_width=4, hot_frac=None)
    assert int(fire.min()) == 20


@pytest.mark.parametrize("case,K", [("hot_panel", 0), ("hot_panel", 64), ("hot_panel", 10_000),
                                    ("dense_rows_heavy", 7)])
def test_remembered_hot_count_misses_stay_exact(case, K, monkeypatch):
    """Sync-free path with a deliberately wrong remembered hot count (none, too few, more than
    H): the neurons left out stay cold and extra ones are dense, so the result is still exact;
    with heavy rows too."""
    from kernels.hybrid import format as fmt

    class Forced(dict):
        def get(self, key, default=None):
            return K

    monkeypatch.setattr(fmt, "SYNC_FREE", {"enabled": True})
    monkeypatch.setattr(fmt, "_CAPS", Forced())
    monkeypatch.setattr(fmt, "_PENDING", {})
    make_kw, kw = CASES[case]
    _compare(make_ffn_inputs(**make_kw, dtype=torch.float32), torch.float32, 1e-4, **kw)


def test_hot_gate_values_from_the_pack_pass(monkeypatch):
    """GATE["hot_from_pack"]: the panel takes g from pass 2 of the pack and computes only u."""
    from kernels.hybrid import format as fmt
    monkeypatch.setitem(fmt.GATE, "hot_from_pack", True)
    make_kw, kw = CASES["hot_panel"]
    inp = make_ffn_inputs(**make_kw, dtype=torch.float32)
    pat = fmt.build_pattern(inp.x.to(DEV), inp.w_gate.to(DEV), 256, kw["hot_frac"])
    assert pat.g_hot is not None and pat.g_hot.shape[1] == pat.hot.numel() > 0
    _compare(inp, torch.float32, 1e-4, **kw)


def test_hot_count_is_learned_then_taken_without_a_read(monkeypatch):
    """The first call per layer reads K; later calls take the remembered K and send the new one
    back, which a later call picks up (K changes with the data, the result stays exact)."""
    from kernels.hybrid import format as fmt
    monkeypatch.setattr(fmt, "SYNC_FREE", {"enabled": True})
    monkeypatch.setattr(fmt, "_CAPS", {})
    monkeypatch.setattr(fmt, "_PENDING", {})
    inp = make_ffn_inputs(33, 24, 136, target_nnz=12, seed=2, dtype=torch.float32)
    p = [t.to(DEV) for t in (inp.x, inp.w_gate, inp.w_up, inp.w_down)]
    first = fmt.build_pattern(p[0], p[1], 256, 0.15)
    (key, K), = fmt._CAPS.items()
    assert first.hot.numel() == K > 0 and key in fmt._PENDING
    fmt._CAPS[key] = 3                                   # pretend an older, smaller K
    fmt._PENDING.clear()
    again = fmt.build_pattern(p[0], p[1], 256, 0.15)     # takes the remembered 3, no read
    assert again.hot.numel() == 3 and fmt._CAPS[key] == 3 and key in fmt._PENDING
    later = fmt.build_pattern(p[0], p[1], 256, 0.15)     # picks up what `again` sent back
    if DEV == "cuda":
        torch.cuda.synchronize()
        later = fmt.build_pattern(p[0], p[1], 256, 0.15)
    assert later.hot.numel() == K and fmt.LAST_STATS[key] == (K, 0)
    assert later.heavy_rows().numel() == 0
    y1, l1a, _ = sparse_gated_mlp(*p, hot_frac=0.15)
    fmt._CAPS[key] = 0
    fmt._PENDING.clear()
    y2, l1b, _ = sparse_gated_mlp(*p, hot_frac=0.15)     # same batch without the hot panel
    assert torch.allclose(y1, y2, rtol=1e-5, atol=1e-5) and abs(float(l1a) - float(l1b)) < 1e-5


def test_heavy_rows_are_listed_on_device():
    from kernels.hybrid import format as fmt
    inp = make_ffn_inputs(30, 24, 96, target_nnz=6, dense_rows=3, seed=3, dtype=torch.float32)
    x, wg = inp.x.to(DEV), inp.w_gate.to(DEV)
    pat = fmt.build_pattern(x, wg, 16, None)
    want = ((x @ wg.t() > 0).sum(1) > 16).nonzero().flatten()
    assert want.numel() >= 3
    assert torch.equal(pat.heavy_rows().sort().values, want)
    assert int(pat.cnt[want].abs().sum()) == 0      # their cold part is not in the ELL


def test_finite_difference_fp32():
    """Directional derivatives of loss(x, W) against central differences (fp32, tiny shapes)."""
    gen = torch.Generator().manual_seed(9)
    inp = make_ffn_inputs(7, 8, 24, target_nnz=6, seed=9, dtype=torch.float32)
    params = [t.to(DEV).clone().double().float().requires_grad_() for t in
              (inp.x, inp.w_gate, inp.w_up, inp.w_down)]
    dy = torch.randn(7, 8, generator=gen).to(DEV)
    loss, *_ = _loss(sparse_gated_mlp, params, dy, hot_frac=None)
    grads = torch.autograd.grad(loss, params)

    def kinks(ps):  # the pattern of relu(g) and sign(u): the loss is smooth while both hold
        x, wg, wu, _ = (q.double() for q in ps)
        return torch.cat([(x @ wg.t() > 0).flatten(), (x @ wu.t() > 0).flatten()])

    for i, (p, gr) in enumerate(zip(params, grads)):
        v = torch.randn(p.shape, generator=gen).to(DEV)
        for eps in (1e-2, 3e-3, 1e-3, 3e-4):   # largest step that crosses no kink
            with torch.no_grad():
                pp = [q.detach().clone() for q in params]
                pm = [q.detach().clone() for q in params]
                pp[i] += eps * v
                pm[i] -= eps * v
            if torch.equal(kinks(pp), kinks(params)) and torch.equal(kinks(pm), kinks(params)):
                break
        with torch.no_grad():
            fd = (_loss(sparse_gated_mlp, pp, dy, hot_frac=None)[0]
                  - _loss(sparse_gated_mlp, pm, dy, hot_frac=None)[0]) / (2 * eps)
        an = float((gr * v).sum())
        assert abs(float(fd) - an) <= 1e-2 * max(1.0, abs(an)), (i, eps, float(fd), an)


@pytest.mark.parametrize("sync_free", [False, True])
def test_activation_checkpointing_and_weight_views(sync_free, monkeypatch):
    """Under non-reentrant checkpointing, with W_g/W_u as row slices of one packed [2H, D]
    parameter and W_d as a transposed (non-contiguous) view: same grads as the plain call.
    sync_free: the hot count changes between the forward and its recompute (CI once failed
    when the recompute sized the pattern differently); backward must still use the forward's."""
    from kernels.hybrid import format as fmt
    monkeypatch.setattr(fmt, "SYNC_FREE", {"enabled": sync_free})
    inp = make_ffn_inputs(21, 16, 80, target_nnz=8, seed=10, dtype=torch.float32)
    dy = torch.randn(21, 16, generator=torch.Generator().manual_seed(11)).to(DEV)

    def grads(use_ckpt):
        x = inp.x.to(DEV).clone().requires_grad_()
        w_gu = torch.cat([inp.w_gate, inp.w_up]).to(DEV).requires_grad_()
        w_d_t = inp.w_down.t().contiguous().to(DEV).requires_grad_()    # stored [H, D]
        fn = lambda a, b: sparse_gated_mlp(a, b[:80], b[80:], w_d_t.t(), hot_frac=0.2)  # noqa: E731
        y, l1, _ = checkpoint(fn, x, w_gu, use_reentrant=False) if use_ckpt else fn(x, w_gu)
        # What a later call may do, made certain: the remembered hot count moves (here to no
        # hot panel), so a recompute would size tensors differently.
        for k in list(fmt._CAPS):
            fmt._CAPS[k] = 0
        fmt._PENDING.clear()
        ((y * dy).sum() + LAM * l1).backward()
        return x.grad, w_gu.grad, w_d_t.grad

    plain = grads(False)
    for _ in range(3):     # first call (exact sizes), then calls on the capacity path
        for a, b in zip(grads(True), plain):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    # and against the reference through the same views
    ref = make_ffn_inputs(21, 16, 80, target_nnz=8, seed=10, dtype=torch.float32)
    p = [t.to(DEV).clone().requires_grad_() for t in (ref.x, ref.w_gate, ref.w_up, ref.w_down)]
    _loss(sparse_gated_mlp_reference, p, dy)[0].backward()
    gx, gwu, gwdt = grads(True)
    assert _rel(gx, p[0].grad) < 1e-4 and _rel(gwu[:80], p[1].grad) < 1e-4
    assert _rel(gwdt.t(), p[3].grad) < 1e-4


def test_saves_packed_pattern_not_dense():
    """What autograd keeps is inputs + packed pattern: no saved tensor is [M, H]-sized (the ELL
    arrays are [M, ell_width], here H / 16; 256 is 5632 / 22 in the benchmark)."""
    M, D, H = 40, 16, 256
    inp = make_ffn_inputs(M, D, H, target_nnz=6, seed=12, dtype=torch.float32)
    p = [t.to(DEV).requires_grad_() for t in (inp.x, inp.w_gate, inp.w_up, inp.w_down)]
    y, _, _ = sparse_gated_mlp(*p, hot_frac=None, ell_width=H // 16)
    inputs = {t.data_ptr() for t in p}
    kept = list(y.grad_fn.saved_tensors) + [t for t in y.grad_fn.pattern if t is not None]  # on ctx
    extra = [t for t in kept if t.data_ptr() not in inputs]
    assert all(t.numel() < M * H // 4 for t in extra if t.dim() == 2 and t.shape[1] != D), \
        [tuple(t.shape) for t in extra]
    assert sum(t.numel() for t in extra if t.shape[-1] != D) < M * H // 2


def test_second_backward_is_a_clear_error():
    inp = make_ffn_inputs(12, 16, 64, target_nnz=6, seed=14, dtype=torch.float32)
    p = [t.to(DEV).requires_grad_() for t in (inp.x, inp.w_gate, inp.w_up, inp.w_down)]
    y, _, _ = sparse_gated_mlp(*p)
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph=True is not supported"):
        y.sum().backward()


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(8, 16, device=DEV)
    wg, wu, wd = torch.randn(32, 16, device=DEV), torch.randn(32, 16, device=DEV), torch.randn(16, 32, device=DEV)
    with pytest.raises(ValueError, match="w_down has 32 rows, expected 16"):
        sparse_gated_mlp(x, wg, wu, wd.t())
    with pytest.raises(ValueError, match="must be 2-D"):
        sparse_gated_mlp(x[None], wg, wu, wd)
    with pytest.raises(TypeError, match="cast the weights"):
        sparse_gated_mlp(x, wg.double().float().half(), wu, wd)
    with pytest.raises(TypeError, match="dtype"):
        sparse_gated_mlp(x.long(), wg, wu, wd)


@pytest.mark.gpu
@pytest.mark.parametrize("H,dense_rows", [(1408, 0), (5632, 4)])
def test_gpu_realistic_bf16_vs_fp32(H, dense_rows):
    inp = make_ffn_inputs(4096, 512, H, target_nnz=29 * H / 5632, dense_rows=dense_rows, seed=13,
                          dtype=torch.float32)
    for hot_frac in (0.01, None):
        _compare(inp, torch.bfloat16, 1e-2, hot_frac=hot_frac)


@pytest.mark.gpu
@pytest.mark.parametrize("width", [64, "auto"])
def test_gpu_cuda_graph_capture_with_heavy_rows(width):
    """After its first call the layer has no host sync: forward+backward capture in a CUDA graph
    (a sync would abort the capture), and replays give the eager gradients, heavy rows included
    (width 64); with "auto" the eager calls grow the width past the dense rows' 1408 nonzeros
    first, and the capture keeps it."""
    inp = make_ffn_inputs(2048, 256, 1408, target_nnz=8, dense_rows=5, seed=16, dtype=torch.float32)
    base = [t.to(DEV, torch.bfloat16) for t in (inp.x, inp.w_gate, inp.w_up, inp.w_down)]
    dy = torch.randn(base[0].shape, device=DEV, dtype=torch.bfloat16)
    kw = dict(ell_width=width, hot_frac=0.01)

    def step(p):
        y, l1, _ = sparse_gated_mlp(*p, **kw)
        return torch.autograd.grad([y, l1], p, [dy, torch.full((), LAM, device=DEV)])

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        p = [t.clone().requires_grad_() for t in base]
        for _ in range(3):
            eager = step(p)
            torch.cuda.synchronize()   # so each call's stats copy has landed for the next one
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            captured = step(p)
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(2):
        graph.replay()
    torch.cuda.synchronize()
    from kernels.hybrid import format as fmt
    if width == "auto":
        (layer, grown), = fmt._WIDTHS.items()
        assert grown > 256 and fmt.LAST_STATS[layer + (min(grown, 1408),)][1] == 0   # holds the dense rows
    else:
        pat = fmt.build_pattern(base[0], base[1], kw["ell_width"], kw["hot_frac"])
        assert pat.heavy_rows().numel() >= 5
    for name, a, b in zip(("dx", "dW_g", "dW_u", "dW_d"), captured, eager):
        assert _rel(a, b) < 1e-3, f"{name}: graph replay vs eager {_rel(a, b)}"
    pr = [t.float().requires_grad_() for t in base]
    y, l1, _ = sparse_gated_mlp_reference(*pr)
    ref = torch.autograd.grad([y, l1], pr, [dy.float(), torch.full((), LAM, device=DEV)])
    for name, a, b in zip(("dx", "dW_g", "dW_u", "dW_d"), captured, ref):
        assert _rel(a, b) < 1e-2, f"{name}: graph replay vs fp32 reference {_rel(a, b)}"


def test_auto_width_rule_grows_at_once_and_shrinks_with_a_margin():
    from kernels.hybrid.format import AUTO_WIDTHS, next_auto_width
    assert AUTO_WIDTHS[0] == 256
    assert next_auto_width(256, None) == 256              # nothing read back yet
    assert next_auto_width(256, 256) == 256
    assert next_auto_width(256, 257) == 512               # a heavy token: grow to hold it
    assert next_auto_width(256, 1262) == 2048
    assert next_auto_width(2048, 5023) == 2048            # past the largest width: exact backup
    # past the largest width, grow one step only while > 1/512 of the tokens are heavy
    assert next_auto_width(256, 5023, heavy=225, tokens=16384) == 512
    assert next_auto_width(512, 5023, heavy=37, tokens=16384) == 1024
    assert next_auto_width(1024, 5023, heavy=6, tokens=16384) == 1024
    assert next_auto_width(1024, 400) == 1024             # 512 would hold it, but not with the margin
    assert next_auto_width(1024, 384) == 512
    assert next_auto_width(2048, 100) == 256


def test_auto_width_learns_each_layers_width_and_stays_exact(monkeypatch):
    """ell_width="auto" with small widths (8, 16, 32): the first call has heavy tokens at width 8
    (exact through the backup), the next call of the same layer holds them all at 32, and every
    call equals the reference."""
    from kernels.hybrid import format as fmt
    monkeypatch.setattr(fmt, "SYNC_FREE", {"enabled": True})
    for name in ("_CAPS", "_PENDING", "LAST_STATS", "_MAX_COUNT", "_WIDTHS"):
        monkeypatch.setattr(fmt, name, {})
    monkeypatch.setattr(fmt, "AUTO_WIDTHS", (8, 16, 32))
    inp = make_ffn_inputs(24, 16, 64, target_nnz=14, seed=5, dtype=torch.float32)
    p = [t.to(DEV) for t in (inp.x, inp.w_gate, inp.w_up, inp.w_down)]
    per_token = (p[0] @ p[1].t() > 0).sum(1)
    assert 16 < int(per_token.max()) <= 32 and int((per_token > 8).sum()) > 0   # the case's premise
    y_ref, l1_ref, _ = sparse_gated_mlp_reference(*p)
    widths, heavy = [], []
    for _ in range(3):
        y, l1, _ = sparse_gated_mlp(*p, hot_frac=None)
        if DEV == "cuda":
            torch.cuda.synchronize()
        (layer, width), = fmt._WIDTHS.items()
        widths.append(width)
        heavy.append(fmt.LAST_STATS.get(layer + (width,), (None, None))[1])
        assert _rel(y, y_ref) < 1e-4 and abs(float(l1) - float(l1_ref)) < 1e-4 * float(l1_ref)
    assert widths == [8, 32, 32]
    assert fmt.LAST_STATS[layer + (8,)][1] == int((per_token > 8).sum())   # the heavy tokens it had
    assert heavy[2] == 0                                  # at 32, none


def test_bad_ell_width_is_a_clear_error():
    inp = make_ffn_inputs(8, 16, 32, target_nnz=4, seed=1, dtype=torch.float32)
    p = [t.to(DEV) for t in (inp.x, inp.w_gate, inp.w_up, inp.w_down)]
    for bad in (0, "wide", 2.5, True):
        with pytest.raises(ValueError, match="ell_width"):
            sparse_gated_mlp(*p, ell_width=bad)
