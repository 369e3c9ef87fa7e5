"""The vocab-parallel cross-entropy equals F.cross_entropy on the gathered logits, in value and
in gradient, including labels on shard boundaries and ignored (-100) labels."""
import pytest
import torch
import torch.nn.functional as F

from tests.parallel.dist_harness import run_distributed


def _check(rank, world, dtype=torch.float64, tol=1e-12, atol=None):
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
    ref = F.cross_entropy(ref_in.double(), labels)   # fp64 math from the same (possibly bf16) logits
    ref.backward()

    local_vocab = vocab // world
    mine = logits[:, rank * local_vocab:(rank + 1) * local_vocab].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(mine.view(4, 10, local_vocab), labels.view(4, 10),
                                        rank * local_vocab, group)
    torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=tol)
    loss.backward()
    torch.testing.assert_close(mine.grad.double(), ref_in.grad[:, rank * local_vocab:(rank + 1) * local_vocab].double(),
                               rtol=tol, atol=tol if atol is None else atol)   # (grads are ~1/40)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_cross_entropy_matches_full(world):
    run_distributed(_check, world)


def _check_fused(rank, world, dtype):
    _check(rank, world, dtype, *((1e-5, 1e-7) if dtype == torch.float32 else (1e-2, 2e-4)))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_vocab_parallel_cross_entropy_matches_full(dtype):
    """The CUDA path: kernels/cross_entropy's per-shard passes, combined by the same all-reduces."""
    run_distributed(_check_fused, 2, dtype)
