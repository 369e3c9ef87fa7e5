"""The fused cross-entropy (kernels/cross_entropy): both kernels against their pure-torch
references (CPU: TRITON_INTERPRET=1, set in tests/conftest.py), cross_entropy against
F.cross_entropy(logits.float(), labels) in value and gradient, the vocabulary-parallel
combination of per-shard statistics, the in-place backward, dispatch, and bad input."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import kernel_device
from kernels.cross_entropy import (CrossEntropy, combine_row_stats, cross_entropy, grad_logits, grad_reference,
                                   lse_from_row_stats, row_stats, row_stats_reference)
from kernels.cross_entropy.kernel import grad_triton, launch_config, row_stats_triton

DEV = kernel_device()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# one ulp of the output dtype (the interpreter's fp32->bf16/fp16 cast truncates where torch rounds)
ULP = {torch.float32: 1e-6, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}
# smallest magnitudes worth comparing relatively (fp16 gradients of 1/(N V) are subnormal)
ATOL = {torch.float32: 1e-7, torch.float16: 1e-7, torch.bfloat16: 1e-7}
VOCABS = [1, 7, 1000, 1537]   # 1000 and 1537 take 2 and 4 blocks of the interpreter's 512


def case(n, vocab, dtype, seed=0, scale=3.0, ignored=(), vocab_start=0, total_vocab=None):
    """Logits [n, vocab] and GLOBAL labels [n] in [0, total_vocab) with labels 0 and V-1 (of this
    slice) among them, and ignore_index at the rows in `ignored`."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=g) * scale).to(DEV, dtype)
    labels = torch.randint(0, total_vocab or vocab, (n,), generator=g)
    if total_vocab is None:
        labels += vocab_start
    for row, local in zip(range(n), (0, vocab - 1)):
        labels[row] = vocab_start + local
    for row in ignored:
        labels[row] = -100
    return logits, labels.to(DEV)


def torch_ce(logits, labels, reduction="mean"):
    """F.cross_entropy on an fp32 (fp64 stays fp64) copy: (loss, gradient in the logits' dtype)."""
    x = logits.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(x.to(torch.promote_types(x.dtype, torch.float32)), labels, reduction=reduction)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


def assert_grad_close(ours, ref, dtype):
    torch.testing.assert_close(ours.float(), ref.float(), rtol=ULP[dtype], atol=ATOL[dtype])


# ----------------------------------------------------------------------------------------------
# kernels against references
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, vocab", [(1, 1), (5, 7), (1, 1000), (9, 1000), (7, 1537)])
def test_kernels_match_references(n, vocab, dtype):
    vocab_start = 50   # labels are global ids; some fall outside this slice
    logits, labels = case(n, vocab, dtype, ignored=(n - 1,) if n > 2 else (), vocab_start=vocab_start)
    if n > 2:
        labels[n - 2] = vocab_start + vocab + 3   # owned by another shard: target 0, no -1 term
    stats = row_stats_triton(logits, labels, vocab_start)
    ref = row_stats_reference(logits, labels, vocab_start)
    for ours, want, name in zip(stats, ref, ("row_max", "sum_exp", "target")):
        assert ours.dtype == torch.float32 and ours.shape == (n,), name
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=0, msg=name)
    lse = lse_from_row_stats(*ref[:2])
    scale = torch.rand(n, generator=torch.Generator().manual_seed(3)).to(DEV) + 0.5   # also on ignored rows
    grad = grad_triton(logits, labels, lse, scale, vocab_start)
    want = grad_reference(logits, labels, lse, scale, vocab_start)
    assert grad.dtype == dtype and grad.shape == logits.shape
    assert_grad_close(grad, want, dtype)
    if n > 2:
        assert torch.count_nonzero(grad[n - 1]) == 0   # ignored row: 0 whatever its scale
    # the two-part form (shift = row_max, lse = log(sum_exp)) that CrossEntropy uses
    log_sum_exp = torch.log(ref[1])
    assert_grad_close(grad_triton(logits, labels, log_sum_exp, scale, vocab_start, shift=ref[0]),
                      grad_reference(logits, labels, log_sum_exp, scale, vocab_start, shift=ref[0]), dtype)
    assert_grad_close(grad_reference(logits, labels, log_sum_exp, scale, vocab_start, shift=ref[0]), want, dtype)


@pytest.mark.parametrize("rows, block_v", [(1, 16), (2, 64), (8, 128)])
def test_vocabulary_loop_with_small_blocks(rows, block_v):
    """Many vocabulary blocks per row, a ragged last block, rows beyond N in the last program."""
    logits, labels = case(11, 1000, torch.float32, ignored=(4,))
    stats = row_stats_triton(logits, labels, rows=rows, block_v=block_v)
    for ours, want in zip(stats, row_stats_reference(logits, labels)):
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=0)
    lse, scale = lse_from_row_stats(*stats[:2]), torch.full((11,), 0.25, device=DEV)
    torch.testing.assert_close(grad_triton(logits, labels, lse, scale, rows=rows, block_v=block_v),
                               grad_reference(logits, labels, lse, scale), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("vocab", [7, 1000, 5000])
def test_gpu_launch_config_runs(vocab):
    """The GPU's rows per program and block are powers of two whose product stays ~4096, and the
    kernels with that config equal the references (here under the interpreter)."""
    rows, block_v, warps = launch_config(vocab)
    assert rows & (rows - 1) == 0 and block_v & (block_v - 1) == 0 and rows * block_v <= 4096 * 2
    assert block_v <= 4096 and warps in (4, 8)
    logits, labels = case(3, vocab, torch.bfloat16, ignored=(2,))
    stats = row_stats_triton(logits, labels, rows=rows, block_v=block_v)
    for ours, want in zip(stats, row_stats_reference(logits, labels)):
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=0)
    lse, scale = lse_from_row_stats(*stats[:2]), torch.ones(3, device=DEV)
    assert_grad_close(grad_triton(logits, labels, lse, scale, rows=rows, block_v=block_v),
                      grad_reference(logits, labels, lse, scale), torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# cross_entropy against F.cross_entropy
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("lead", [(1,), (3, 5)])
def test_cross_entropy_matches_torch(lead, vocab, dtype):
    n = 1
    for d in lead:
        n *= d
    logits, labels = case(n, vocab, dtype, seed=vocab, ignored=(2, 7) if n > 7 else ())
    ref_loss, ref_grad = torch_ce(logits, labels)
    x = logits.detach().clone().view(*lead, vocab).requires_grad_(True)
    loss = cross_entropy(x, labels.view(lead))
    assert loss.dtype == torch.float32 and loss.shape == ()
    # both read the same values upcast to fp32, so the loss is tight in every dtype
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert x.grad.dtype == dtype
    assert_grad_close(x.grad.view(n, vocab), ref_grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_token_losses_and_ignored_rows(dtype):
    logits, labels = case(9, 37, dtype, ignored=(3, 8))
    x = logits.clone().requires_grad_(True)
    losses = CrossEntropy.apply(x, labels)
    ref, _ = torch_ce(logits, labels, reduction="none")
    assert losses.dtype == torch.float32 and losses.shape == (9,)
    torch.testing.assert_close(losses, ref, rtol=1e-5, atol=1e-6)
    assert losses[3] == 0 and losses[8] == 0
    weights = torch.arange(1.0, 10.0, device=DEV)
    (losses * weights).sum().backward()
    xr = logits.detach().clone().requires_grad_(True)
    (F.cross_entropy(xr.float(), labels, reduction="none") * weights).sum().backward()
    assert_grad_close(x.grad, xr.grad, dtype)
    assert torch.count_nonzero(x.grad[3]) == 0 and torch.count_nonzero(x.grad[8]) == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_ignored_gives_nan_and_zero_gradient_like_torch(dtype):
    logits, _ = case(5, 13, dtype)
    labels = torch.full((5,), -100, device=DEV)
    ref_loss, ref_grad = torch_ce(logits, labels)
    x = logits.clone().requires_grad_(True)
    loss = cross_entropy(x, labels)
    assert torch.isnan(loss) and torch.isnan(ref_loss)
    loss.backward()
    assert torch.equal(x.grad, ref_grad) and torch.count_nonzero(x.grad) == 0


def test_custom_ignore_index_inside_the_vocabulary():
    logits, labels = case(6, 11, torch.float32)
    labels[2] = 4
    ref_in = logits.clone().requires_grad_(True)
    ref = F.cross_entropy(ref_in, labels, ignore_index=4)
    ref.backward()
    x = logits.clone().requires_grad_(True)
    loss = cross_entropy(x, labels, ignore_index=4)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, ref_in.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype, big", [(torch.float32, 1e4), (torch.float32, 3e38), (torch.bfloat16, 1e4),
                                        (torch.float16, 6e4)])
def test_extreme_logits_do_not_overflow(dtype, big):
    """exp is only ever taken of z - max <= 0: +-1e4 (and fp32's +-3e38, and fp16's +-6e4, near
    their largest values) give finite losses and torch's gradients."""
    logits, labels = case(6, 9, dtype, scale=1.0)
    logits[0, 3], logits[1, 0], logits[2, :] = big, -big, -big
    logits[3, :4], logits[4, 8] = big, big
    labels[:5] = torch.tensor([3, 0, 5, 2, 1])
    ref_loss, ref_grad = torch_ce(logits, labels, reduction="none")
    x = logits.clone().requires_grad_(True)
    losses = CrossEntropy.apply(x, labels)
    assert torch.isfinite(losses).all()
    torch.testing.assert_close(losses, ref_loss, rtol=1e-5, atol=1e-5)
    losses.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert_grad_close(x.grad, ref_grad, dtype)


# ----------------------------------------------------------------------------------------------
# vocabulary-parallel combination
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bounds", [(0, 700, 1537), (0, 400, 401, 1537), (0, 3, 7)])
def test_vocab_parallel_combination_equals_the_unsplit_loss_and_gradient(bounds, dtype):
    """Each "rank" runs row_stats on its slice (a strided view: rows are not V_local apart) with
    its vocab_start; combine_row_stats (what the MAX and SUM all-reduces compute) gives the
    unsplit lse and loss, and the grad kernel per shard with the global lse, written into the
    matching slice of one buffer, gives the unsplit gradient."""
    vocab, n = bounds[-1], 13
    logits, labels = case(n, vocab, dtype, seed=len(bounds), ignored=(12,))
    labels[2:2 + 2 * (len(bounds) - 2)] = torch.tensor([b + d for b in bounds[1:-1] for d in (-1, 0)])  # edges
    shards = list(zip(bounds[:-1], bounds[1:]))
    per_shard = [row_stats(logits[:, a:b], labels, a) for a, b in shards]
    lse, target = combine_row_stats(*zip(*per_shard))
    full = row_stats(logits, labels)
    torch.testing.assert_close(lse, lse_from_row_stats(*full[:2]), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(logits.float(), dim=-1), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(target, full[2], rtol=0, atol=0)
    ref_loss, _ = torch_ce(logits, labels, reduction="none")
    valid = labels != -100
    torch.testing.assert_close(torch.where(valid, lse - target, 0.0), ref_loss, rtol=1e-5, atol=1e-5)
    _, ref_grad = torch_ce(logits, labels)   # of the mean

    scale = valid.float() / valid.sum()
    grad = torch.full_like(logits, float("nan"))
    for a, b in shards:
        grad_logits(logits[:, a:b], labels, lse, scale, a, out=grad[:, a:b])
    unsplit = grad_logits(logits, labels, lse, scale)
    assert_grad_close(grad, unsplit, dtype)
    assert_grad_close(grad, ref_grad, dtype)   # scale = 1 / #valid: the mean, like torch


def test_combine_with_one_shard_is_lse_from_row_stats():
    logits, labels = case(4, 10, torch.float32)
    row_max, sum_exp, target = row_stats(logits, labels)
    lse, tgt = combine_row_stats(row_max[None], sum_exp[None], target[None])
    torch.testing.assert_close(lse, lse_from_row_stats(row_max, sum_exp))
    assert torch.equal(tgt, target)


# ----------------------------------------------------------------------------------------------
# in-place backward, saved tensors, dispatch
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_in_place_over_the_logits(dtype):
    logits, labels = case(7, 600, dtype, ignored=(1,))
    lse = lse_from_row_stats(*row_stats(logits, labels)[:2])
    scale = torch.full((7,), 0.5, device=DEV)
    want = grad_logits(logits, labels, lse, scale)
    buf = logits.clone()
    assert grad_logits(buf, labels, lse, scale, out=buf).data_ptr() == buf.data_ptr()
    assert torch.equal(buf, want)


def test_inplace_backward_overwrites_the_logits_and_gives_the_same_gradient():
    base, labels = case(6, 50, torch.bfloat16, ignored=(0,))
    w = base.clone().requires_grad_(True)
    logits = w * 1   # an intermediate that only the loss reads (like the lm_head's output)
    before = logits.detach().clone()
    cross_entropy(logits, labels, inplace_backward=True).backward()
    w2 = base.clone().requires_grad_(True)
    cross_entropy(w2 * 1, labels).backward()
    assert torch.equal(w.grad, w2.grad)
    assert not torch.equal(logits.detach(), before)   # the documented cost: the logits are gone
    with pytest.raises(ValueError, match="leaf"):
        cross_entropy(base.clone().requires_grad_(True), labels, inplace_backward=True)
    # another node that saved the logits and runs its backward later fails loudly, not silently
    logits = w * 1
    other = (logits * logits).float().sum()   # saves the logits themselves
    cross_entropy(logits, labels, inplace_backward=True).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        other.backward()


def test_backward_saves_no_vocabulary_sized_fp32_tensor():
    logits, labels = case(5, 64, torch.bfloat16)
    x = logits.clone().requires_grad_(True)
    loss = CrossEntropy.apply(x, labels)
    saved = loss.grad_fn.saved_tensors
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0].dtype == torch.bfloat16 and big[0].data_ptr() == x.data_ptr()
    assert sorted(t.numel() for t in saved if t is not big[0]) == [5, 5, 5]   # labels, lse in two parts


def test_cpu_dispatch_without_the_interpreter_is_the_reference(monkeypatch):
    logits, labels = case(6, 20, torch.float32, ignored=(2,))
    logits, labels = logits.cpu(), labels.cpu()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for ours, want in zip(row_stats(logits, labels, 0), row_stats_reference(logits, labels, 0)):
        assert torch.equal(ours, want)
    lse, scale = torch.zeros(6), torch.ones(6)
    assert torch.equal(grad_logits(logits, labels, lse, scale), grad_reference(logits, labels, lse, scale))
    x = logits.clone().requires_grad_(True)
    cross_entropy(x, labels).backward()
    assert_grad_close(x.grad, torch_ce(logits, labels)[1], torch.float32)


def test_fp64_goes_to_the_reference_and_is_exact():
    """fp64 (tests/parallel's exact checks) is kept in fp64, on the reference path."""
    logits, labels = case(8, 30, torch.float64, ignored=(5,))
    logits[0, 3] = 80.0
    x = logits.clone().requires_grad_(True)
    loss = cross_entropy(x, labels)
    loss.backward()
    ref_loss, ref_grad = torch_ce(logits, labels)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, ref_grad, rtol=1e-12, atol=1e-12)


def test_package_imports_and_runs_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch\n"
            "from kernels.cross_entropy import cross_entropy\n"
            "x = torch.randn(4, 9, requires_grad=True)\n"
            "cross_entropy(x, torch.tensor([0, 8, -100, 3])).backward()\n"
            "assert 'kernels.cross_entropy.kernel' not in sys.modules and torch.isfinite(x.grad).all()\n")
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": ""}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env, timeout=120)


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
def _bad_cases():
    x, y = case(4, 6, torch.float32)
    lse, scale = torch.zeros(4, device=DEV), torch.ones(4, device=DEV)
    stats = (row_stats, row_stats_reference, row_stats_triton)
    grads = (grad_logits, grad_reference, grad_triton)
    return [
        (stats, (x[None], y), ValueError, "expected 2 dims"),
        (stats, (x, y[None]), ValueError, "expected 1 dim"),
        (stats, (x, y[:3]), ValueError, "N=4 rows but labels have 3"),
        (stats, (x.t().contiguous().t(), y), ValueError, "not contiguous"),
        (stats, (x, y.float()), TypeError, "labels must be an integer"),
        (stats, (x, y == 0), TypeError, "labels must be an integer"),
        (stats, (x.to(torch.int32), y), TypeError, "unsupported logits dtype"),
        (stats, (x[:, :0], y), ValueError, "empty vocabulary"),
        (stats, (x, y, -1), ValueError, "vocab_start"),
        ((row_stats_triton,), (x.double(), y), TypeError, "unsupported logits dtype torch.float64"),
        (grads, (x, y, lse[:3], scale), ValueError, "lse has shape"),
        (grads, (x, y, lse, scale.long()), TypeError, "scale must be a float"),
        (grads, (x, y, lse, scale, 0, -100, torch.empty(4, 6, dtype=torch.float16, device=DEV)), ValueError,
         "out is"),
        (grads, (x, y, lse, scale, 0, -100, torch.empty(6, 4, device=DEV).t()), ValueError, "out rows"),
        ((cross_entropy,), (x, y[:3]), ValueError, "same leading dims"),
        ((cross_entropy,), (x.t(), y.repeat(2)[:6]), ValueError, "not contiguous"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_cases())))
def test_bad_input_names_what_is_wrong(index):
    fns, args, exc, match = _bad_cases()[index]
    for fn in fns:
        with pytest.raises(exc, match=match):
            fn(*args)


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_matches_torch_at_model_shape(dtype):
    logits, labels = case(2048, 32000, dtype, ignored=(5, 100))
    ref_loss, ref_grad = torch_ce(logits, labels)
    x = logits.clone().requires_grad_(True)
    loss = cross_entropy(x, labels)
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.float(), ref_grad.float(), rtol=ULP[dtype], atol=1e-9)
