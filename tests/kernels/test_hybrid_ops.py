"""kernels.hybrid building blocks, each against its pure-torch reference (interpreter on CPU)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402

from kernels.hybrid import csc_wgrad as csc_mod  # noqa: E402
from kernels.hybrid import ell_sddmm as sddmm_mod  # noqa: E402
from kernels.hybrid import ell_spmm as spmm_mod  # noqa: E402
from kernels.hybrid import format as fmt  # noqa: E402
from kernels.hybrid import gate_pack as gate_mod  # noqa: E402
from kernels.hybrid import heavy_rows  # noqa: E402
from kernels.hybrid import hot_select  # noqa: E402
from kernels.hybrid import hot_panel  # noqa: E402
from kernels.hybrid import row_pack as row_mod  # noqa: E402
from kernels.hybrid import split_pack as split_mod  # noqa: E402
from kernels.hybrid import sparse_gated_mlp, sparse_gated_mlp_reference  # noqa: E402
from kernels.synthetic import make_ffn_inputs  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(M=27, D=40, H=150, nnz=9, dense_rows=2, seed=0):
    i = make_ffn_inputs(M, D, H, target_nnz=nnz, dense_rows=dense_rows, seed=seed, dtype=torch.float32)
    return [t.to(DEV) for t in (i.x, i.w_gate, i.w_up, i.w_down)]


def _row_sets(cnt, idx, val, width):
    """Per row: sorted (column, value) pairs of its stored slots (slot order may differ)."""
    out = []
    for r in range(cnt.shape[0]):
        n = min(int(cnt[r]), width)
        cols, order = idx[r, :n].long().sort()
        out.append((cols.cpu(), val[r, :n][order].cpu()))
    return out


@pytest.mark.parametrize("packer", ["fused_epilogue", "row_pack_scan", "row_pack_atomic", "row_pack_dot",
                                    "row_pack_two_pass"])
def test_gate_packers_match_reference(packer, monkeypatch):
    x, wg, _, _ = _inputs()
    width = 12          # small, so the dense rows overflow and must report their true count
    fn = gate_mod.gate_pack if packer == "fused_epilogue" else row_mod.cublas_gate_pack
    monkeypatch.setitem(row_mod.CONFIG, "SCAN", {"row_pack_scan": 1, "row_pack_dot": 2}.get(packer, 0))
    monkeypatch.setitem(row_mod.CONFIG, "TWO_PASS", packer == "row_pack_two_pass")
    fire, cnt, idx, val = fn(x, wg, width)
    rf, rc, ri, rv = gate_mod.reference(x, wg, width)
    assert torch.equal(fire, rf) and torch.equal(cnt, rc)
    assert int(cnt.max()) > width
    light = (rc <= width).nonzero().flatten().tolist()
    a, b = _row_sets(cnt, idx, val, width), _row_sets(rc, ri, rv, width)
    for r in light:
        assert torch.equal(a[r][0], b[r][0]), r
        assert torch.allclose(a[r][1], b[r][1], rtol=1e-5, atol=1e-6), r


def test_pack_pass_copies_the_hot_columns():
    """Pass 2 with a hot set writes the same ELL as without one, plus g[:, hot] exactly."""
    x, wg, _, _ = _inputs(seed=4)
    g = x @ wg.t()
    fire, ccnt = row_mod.count_pass(g)
    hot = torch.topk(fire, 37, sorted=False).indices
    pos = torch.full((g.shape[1],), -1, dtype=torch.int32, device=DEV)
    pos[hot] = torch.arange(hot.numel(), dtype=torch.int32, device=DEV)
    cnt, idx, val, g_hot = row_mod.pack_pass(g, ccnt, 12, (pos, hot.numel()))
    assert torch.equal(g_hot, g[:, hot])
    c2, i2, v2, none = row_mod.pack_pass(g, ccnt, 12)
    used = torch.arange(12, device=DEV)[None, :] < cnt.clamp(max=12)[:, None]
    assert none is None and torch.equal(cnt, c2) and torch.equal(idx[used], i2[used]) and torch.equal(val[used], v2[used])


def test_split_and_csc_match_reference():
    x, wg, _, _ = _inputs(seed=1)
    packed = gate_mod.reference(x, wg, 16)
    fire, cnt0, idx0, val0 = packed
    hot = fire > 3
    Wc = int(torch.where(cnt0 <= 16, cnt0, 0).max())
    k = split_mod.split_pack(cnt0, idx0, val0, (~hot).to(torch.int8), Wc)
    r = split_mod.reference(cnt0, idx0, val0, hot, Wc)
    used = torch.arange(Wc, device=DEV)[None, :] < r[0][:, None]   # slots past cnt are unspecified
    assert torch.equal(k[0], r[0]) and torch.equal(k[1][used], r[1][used]) and torch.equal(k[2][used], r[2][used])
    assert torch.equal(k[3], r[3])                         # csc_ptr
    H = hot.numel()
    for j in range(H):                                     # same slots per neuron, any order
        s, e = int(r[3][j]), int(r[3][j + 1])
        assert torch.equal(k[4][s:e].sort().values, r[4][s:e].sort().values), j
    assert int(k[0].sum()) == int(r[3][H]) > 0
    assert not hot[k[1][:, :][torch.arange(Wc, device=DEV)[None] < k[0][:, None]].long()].any()


@pytest.mark.parametrize("walk,csc_bd", [(False, 64), (False, 16), (True, 64)])
def test_sddmm_spmm_wgrad_hot_match_reference(walk, csc_bd, monkeypatch):
    # walk: the pipelined one-slot-per-step kernels (the GPU default), else the chunked ones;
    # csc_bd 16: the chunked CSC kernel over three D chunks of D=40 (the GPU's D > MAX_WALK_D path)
    for mod in (sddmm_mod, spmm_mod):
        monkeypatch.setattr(mod, "INTERPRET_CONFIG", dict(WALK=walk, SP=16, BD=64))
        monkeypatch.setattr(mod, "CONFIG", dict(WALK=walk, SP=16, BD=64, num_warps=4))
    monkeypatch.setattr(csc_mod, "INTERPRET_CONFIG", dict(WALK=walk, NB=32, KT=16, BD=csc_bd))
    monkeypatch.setattr(csc_mod, "CONFIG", dict(WALK=walk, NB=1, KT=16, BD=csc_bd, num_warps=4))
    x, wg, wu, wd = _inputs(nnz=24, seed=2)
    pat = fmt.build_pattern(x, wg, 64, None)
    # rows longer than one slot chunk (16 under the interpreter) and rows with no slot at all
    assert int(pat.cnt.max()) > 32 and int((pat.cnt == 0).sum()) >= 2
    M, D = x.shape
    H = wg.shape[0]
    wdt = wd.t().contiguous()
    u, l1row = sddmm_mod.ell_sddmm(x, wu, pat.idx, pat.cnt, g=pat.g)
    used = torch.arange(pat.width, device=DEV)[None, :] < pat.cnt[:, None]
    u = torch.where(used, u, 0.0)             # slots past a token's count are unspecified
    assert torch.allclose(u, sddmm_mod.reference(x, wu, pat.idx, pat.cnt), rtol=1e-5, atol=1e-5)
    g = torch.where(used, pat.g, 0.0)
    assert torch.allclose(l1row, (g * u).abs().sum(1), rtol=1e-5, atol=1e-6)
    dy = torch.randn(M, D, device=DEV)
    scale = torch.tensor(0.3, device=DEV)
    du, dg = sddmm_mod.ell_sddmm_bwd(dy, wdt, pat.idx, pat.cnt, pat.g, u, scale)
    du, dg = torch.where(used, du, 0.0), torch.where(used, dg, 0.0)
    rdu, rdg = sddmm_mod.reference_bwd(dy, wdt, pat.idx, pat.cnt, pat.g, u, scale)
    assert torch.allclose(du, rdu, rtol=1e-5, atol=1e-5) and torch.allclose(dg, rdg, rtol=1e-5, atol=1e-5)
    y = torch.full((M, D), float("nan"), device=DEV)      # poisoned: every element must be written
    spmm_mod.ell_spmm(y, pat.idx, pat.cnt, pat.g, wdt, c3=u)
    assert torch.allclose(y, spmm_mod.reference(pat.idx, pat.cnt, pat.g, wdt, c3=u), rtol=1e-5, atol=1e-5)
    base = torch.randn(M, D, device=DEV)
    dx = base.clone()
    spmm_mod.ell_spmm(dx, pat.idx, pat.cnt, du, wu, c2=dg, w2=wg, accumulate=True)
    assert torch.allclose(dx, base + spmm_mod.reference(pat.idx, pat.cnt, du, wu, c2=dg, w2=wg),
                          rtol=1e-5, atol=1e-5)
    tok, h_c, du_c, dg_c = csc_mod.csc_order(pat.csc_ptr, pat.csc_slot, pat.width, (pat.g, u), du, dg)
    nnz = int(pat.csc_ptr[-1])
    slots = pat.csc_slot[:nnz].long()
    assert torch.equal(tok[:nnz].long(), slots // pat.width)
    assert torch.equal(du_c[:nnz], du.flatten()[slots]) and torch.equal(dg_c[:nnz], dg.flatten()[slots])
    assert torch.equal(h_c[:nnz], (pat.g * u).flatten()[slots])
    one = csc_mod.csc_order(pat.csc_ptr, pat.csc_slot, pat.width, u)             # the other forms
    two = csc_mod.csc_order(pat.csc_ptr, pat.csc_slot, pat.width, u, pat.g)
    assert torch.equal(one[1][:nnz], u.flatten()[slots]) and torch.equal(two[0][:nnz], tok[:nnz])
    assert torch.equal(two[1][:nnz], u.flatten()[slots]) and torch.equal(two[2][:nnz], pat.g.flatten()[slots])
    with pytest.raises(ValueError, match="contiguous ELL array"):
        csc_mod.csc_order(pat.csc_ptr, pat.csc_slot, pat.width, u.t())
    a1, a2 = csc_mod.csc_wgrad(x, pat.csc_ptr, tok, H, du_c, dg_c)
    assert torch.allclose(a1, csc_mod.reference(x, pat.idx, pat.cnt, H, du), rtol=1e-5, atol=1e-5)
    assert torch.allclose(a2, csc_mod.reference(x, pat.idx, pat.cnt, H, dg), rtol=1e-5, atol=1e-5)
    b = csc_mod.csc_wgrad(dy, pat.csc_ptr, tok, H, h_c)
    assert torch.allclose(b, csc_mod.reference(dy, pat.idx, pat.cnt, H, pat.g, c3=u), rtol=1e-5, atol=1e-5)
    # rows of neurons without cold slots taken from given sources (the hot panel's gradients)
    empty = (pat.csc_ptr[1:] == pat.csc_ptr[:-1]).nonzero().flatten()[:5]
    assert empty.numel() >= 2
    pos = torch.full((H,), -1, dtype=torch.int32, device=DEV)
    pos[empty] = torch.arange(empty.numel(), dtype=torch.int32, device=DEV)
    s1, s2 = torch.randn(empty.numel(), D, device=DEV), torch.randn(empty.numel(), D, device=DEV)
    h1, h2 = csc_mod.csc_wgrad(x, pat.csc_ptr, tok, H, du_c, dg_c, hot=(empty, pos, s1, s2))
    w1, w2 = a1.clone(), a2.clone()
    w1[empty], w2[empty] = s1, s2
    assert torch.allclose(h1, w1, rtol=1e-5, atol=1e-5) and torch.allclose(h2, w2, rtol=1e-5, atol=1e-5)
    gu = torch.randn(M, 2 * 5, device=DEV)
    gh, uh = gu[:, :5], gu[:, 5:]              # column views of one [g | u] buffer (row stride 2K)
    h, l1row = hot_panel.hot_forward(gh, uh)
    rh, rl1 = hot_panel.reference_forward(gh, uh)
    base_l1 = torch.randn(M, device=DEV)
    _, acc = hot_panel.hot_forward(gh, uh, base_l1.clone())     # adds to a cold L1 row
    assert torch.allclose(acc, base_l1 + rl1, atol=1e-5)
    assert torch.allclose(h, rh, atol=1e-6) and torch.allclose(l1row, rl1, atol=1e-5)
    dh = torch.randn(M, 5, device=DEV)
    dudg, h2 = hot_panel.hot_backward(gh, uh, dh, scale)
    assert torch.allclose(dudg, hot_panel.reference_backward(gh, uh, dh, scale), atol=1e-5)
    dudg2, _ = hot_panel.hot_backward(gh.contiguous(), uh.contiguous(), dh, scale)
    assert torch.equal(dudg2, dudg)
    assert torch.equal(h2, h)


def test_fused_epilogue_path_end_to_end():
    x, wg, wu, wd = _inputs(M=23, D=32, H=100, seed=3)
    old = dict(fmt.GATE)
    fmt.GATE["fused_epilogue"] = True
    try:
        pk = [t.clone().requires_grad_() for t in (x, wg, wu, wd)]
        pr = [t.clone().requires_grad_() for t in (x, wg, wu, wd)]
        y, l1, f = sparse_gated_mlp(*pk, ell_width=8, hot_frac=0.2)
        yr, l1r, fr = sparse_gated_mlp_reference(*pr)
        (y.sum() + l1).backward()
        (yr.sum() + l1r).backward()
    finally:
        fmt.GATE.update(old)
    assert torch.equal(f, fr) and torch.allclose(y, yr, rtol=1e-4, atol=1e-5)
    for a, b in zip(pk, pr):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-4)


def test_gather_hot_rows_matches_indexing():
    x, wg, wu, wd = _inputs(seed=7)
    wdt = wd.t().contiguous()
    hot = torch.tensor([5, 0, 149, 77, 76], device=DEV)          # any order, ends of the range
    w_gu_h, wdt_h = hot_panel.gather_hot_rows(hot, wg, wu, wdt)
    assert torch.equal(w_gu_h, torch.cat([wg[hot], wu[hot]])) and torch.equal(wdt_h, wdt[hot])
    none = hot_panel.gather_hot_rows(hot[:0], wg, wu, wdt)
    assert none[0].shape == (0, wg.shape[1]) and none[1].shape == (0, wg.shape[1])


def _heavy_inputs(M, D, H, n_heavy, dtype=torch.float32, seed=5):
    gen = torch.Generator().manual_seed(seed)
    x, dy = torch.randn(M, D, generator=gen), torch.randn(M, D, generator=gen)
    wg = torch.randn(H, D, generator=gen) * 0.3
    wu, wdt = torch.randn(H, D, generator=gen), torch.randn(H, D, generator=gen)
    x, dy, wg, wu, wdt = (t.to(DEV, dtype) for t in (x, dy, wg, wu, wdt))
    cold = (torch.rand(H, generator=gen) > 0.3).to(DEV)
    lst = torch.randperm(M, generator=gen).int().to(DEV)        # the first n_heavy are the heavy rows
    n = torch.tensor([n_heavy], dtype=torch.int32, device=DEV)
    return x, dy, wg, wu, wdt, cold, lst, n


def _heavy_outputs(fast_rows, monkeypatch, M=23, D=40, H=70, n_heavy=20, dtype=torch.float32):
    """heavy_forward / heavy_backward outputs, from zeros, with FAST_ROWS = fast_rows."""
    monkeypatch.setattr(heavy_rows, "FAST_ROWS", fast_rows)
    x, dy, wg, wu, wdt, cold, lst, n = _heavy_inputs(M, D, H, n_heavy, dtype)
    y, l1 = torch.zeros(M, D, device=DEV, dtype=dtype), torch.zeros(M, device=DEV)
    heavy_rows.heavy_forward(x, wg, wu, wdt, cold.to(torch.int8), lst, n, y, l1)
    dx, dws = torch.zeros_like(x), [torch.zeros_like(wg) for _ in range(3)]
    heavy_rows.heavy_backward(x, dy, wg, wu, wdt, cold.to(torch.int8), lst, n, torch.tensor(0.37, device=DEV),
                              dx, *dws)
    return [y, l1, dx] + dws


def test_heavy_rows_fast_and_recomputing_paths_agree_bit_for_bit(monkeypatch):
    """20 heavy rows all from the scratch, 16 from it and 4 recomputed, all recomputed: the same
    bits. Both paths sum over the same neuron blocks in the same order, and the scratch's row
    count is a whole number of row blocks, so the rows past it are blocked as before."""
    assert heavy_rows._config()["BR"] == 16
    outs = [_heavy_outputs(f, monkeypatch) for f in (64, 16, 0)]
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_heavy_rows_paths_agree(dtype, monkeypatch):
    """The same on the GPU with the real block sizes (BH=64, BD=128) and 150 heavy rows (64 fast +
    86 recomputed, against all recomputed): the same bits in fp32. In bf16 an H100 gave one
    element of y (of 76,800) one ulp apart, and every other output equal, so bf16 is held to one
    ulp with dx and the weight gradients exact."""
    fast, slow = (_heavy_outputs(f, monkeypatch, M=300, D=256, H=700, n_heavy=150, dtype=dtype)
                  for f in (64, 0))
    if dtype == torch.float32:
        assert all(torch.equal(a, b) for a, b in zip(fast, slow))
    else:
        assert torch.allclose(fast[0].float(), slow[0].float(), rtol=2 ** -7, atol=0)
        assert int((fast[0] != slow[0]).sum()) <= 16
        assert all(torch.equal(a, b) for a, b in zip(fast[1:], slow[1:]))


def test_heavy_rows_scratch_size_and_setting():
    assert heavy_rows.FAST_ROWS == 64     # the default (HYBRID_HEAVY_FAST_ROWS unset)
    assert heavy_rows.fast_rows(16384) == 64 and heavy_rows.fast_rows(131072) == 256   # M / 512 at large M
    assert heavy_rows.fast_rows(23) == 23 and heavy_rows.fast_rows(40000) == 80        # rounded to 16, at most M
    assert heavy_rows._fast_rows_setting("20") == 32 and heavy_rows._fast_rows_setting("0") == 0
    for bad in ("-1", "many"):
        with pytest.raises(ValueError, match="HYBRID_HEAVY_FAST_ROWS"):
            heavy_rows._fast_rows_setting(bad)


@pytest.mark.parametrize("fast_rows", [64, 16, 0])   # all 20 fast (2 row blocks); 16 fast + 4 recomputed; none
def test_heavy_row_kernels_match_reference(fast_rows, monkeypatch):
    """The device-count dense backup: forward (y, l1) and backward (dx, dW) of the listed rows
    against the torch reference; rows not listed and the no-heavy-row case are left untouched."""
    monkeypatch.setattr(heavy_rows, "FAST_ROWS", fast_rows)
    M, D, H = 23, 40, 70
    x, dy, wg, wu, wdt, cold, lst, n = _heavy_inputs(M, D, H, 20)
    rows = lst[:20].long()
    scale = torch.tensor(0.37, device=DEV)
    ref = heavy_rows.reference(x, dy, wg, wu, wdt, cold, rows, scale)
    y0, l10 = torch.randn(M, D, device=DEV), torch.randn(M, device=DEV)
    y, l1 = y0.clone(), l10.clone()
    heavy_rows.heavy_forward(x, wg, wu, wdt, cold.to(torch.int8), lst, n, y, l1)
    want_y, want_l1 = y0.clone(), l10.clone()
    want_y[rows] += ref[0]
    want_l1[rows] += ref[1]
    assert torch.allclose(y, want_y, rtol=1e-5, atol=1e-4) and torch.allclose(l1, want_l1, rtol=1e-5, atol=1e-4)
    dx0 = torch.randn(M, D, device=DEV)
    dws0 = [torch.randn(H, D, device=DEV) for _ in range(3)]
    dx, dws = dx0.clone(), [t.clone() for t in dws0]
    heavy_rows.heavy_backward(x, dy, wg, wu, wdt, cold.to(torch.int8), lst, n, scale, dx, *dws)
    want_dx = dx0.clone()
    want_dx[rows] += ref[2]
    assert torch.allclose(dx, want_dx, rtol=1e-5, atol=1e-4)
    for got, before, add in zip(dws, dws0, ref[3:]):
        assert torch.allclose(got, before + add, rtol=1e-5, atol=1e-4)
    n.zero_()                                   # no heavy rows: nothing is touched
    y2, dx2, dws2 = y0.clone(), dx0.clone(), [t.clone() for t in dws0]
    heavy_rows.heavy_forward(x, wg, wu, wdt, cold.to(torch.int8), lst, n, y2, l1)
    heavy_rows.heavy_backward(x, dy, wg, wu, wdt, cold.to(torch.int8), lst, n, scale, dx2, *dws2)
    assert torch.equal(y2, y0) and torch.equal(dx2, dx0) and all(torch.equal(a, b) for a, b in zip(dws2, dws0))
    with pytest.raises(ValueError, match="share one dtype"):
        heavy_rows.heavy_forward(x, wg.half(), wu, wdt, cold.to(torch.int8), lst, n, y2, l1)


@pytest.mark.parametrize("H,K", [(5632, 832), (200, 7), (64, 64), (137, 1)])
def test_select_hot_matches_reference(H, K):
    """Exactly the K most-firing neurons, ties by index (many ties here), the cold mask, and the
    count over the threshold."""
    fire = torch.randint(0, 30, (H,), generator=torch.Generator().manual_seed(H), dtype=torch.int32).to(DEV)
    count = torch.zeros(2, dtype=torch.int32, device=DEV)
    hot, cold, pos = hot_select.select_hot(fire, K, 12, count)
    want = hot_select.reference(fire, K)
    assert torch.equal(hot, want)
    assert torch.equal(pos[hot].long(), torch.arange(K, device=DEV)) and int((pos >= 0).sum()) == K
    assert torch.equal(cold, torch.ones(H, dtype=torch.int8, device=DEV).index_fill_(0, want, 0))
    assert int(count[0]) == int((fire > 12).sum())
