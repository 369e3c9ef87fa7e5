"""The vocab-parallel cross-entropy equals F.cross_entropy on the gathered logits, in value and
in gradient, including labels on shard boundaries and ignored (-100) labels."""
import pytest
import torch
import torch.nn.functional as F

from tests.parallel.dist_harness import run_distributed


def _check(rank, world, dtype=torch.float64, tol=1e-12):
    from megasparse.parallel import cross_entropy as ce
    from megasparse.parallel.cross_entropy import vocab_parallel_cross_entropy
    from megasparse.parallel.state import get_parallel_state

    if dtype != torch.float64:   # the Triton path (kernels/cross_entropy), under the interpreter on CPU
        ce._fused_wanted = lambda logits: True
    group = get_parallel_state().tp_group
    torch.manual_seed(0)
    vocab, n = 6 * world, 40
    logits = torch.randn(n, vocab, dtype=dtype) * 4  # peaked rows test the max shift
    logits[0, 3] = 80.0  # exp would overflow without the shift
    labels = torch.randint(0, vocab, (n,))
    labels[:4] = torch.tensor([0, vocab - 1, vocab // world, vocab // world - 1])
    labels[5] = -100
    ref_in = logits.clone().requires_grad_()
    ref = F.cross_entropy(ref_in, labels)
    ref.backward()

    local_vocab = vocab // world
    mine = logits[:, rank * local_vocab:(rank + 1) * local_vocab].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(mine.view(4, 10, local_vocab), labels.view(4, 10),
                                        rank * local_vocab, group)
    torch.testing.assert_close(loss, ref, rtol=tol, atol=tol)
    loss.backward()
    torch.testing.assert_close(mine.grad, ref_in.grad[:, rank * local_vocab:(rank + 1) * local_vocab],
                               rtol=tol, atol=tol)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_cross_entropy_matches_full(world):
    run_distributed(_check, world)


def _check_fused(rank, world):
    _check(rank, world, torch.float32, 1e-5)


@pytest.mark.slow
def test_fused_vocab_parallel_cross_entropy_matches_full():
    """The CUDA path: kernels/cross_entropy's per-shard passes, combined by the same all-reduces."""
    run_distributed(_check_fused, 2)
