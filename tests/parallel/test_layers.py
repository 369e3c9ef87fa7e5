"""Each tensor-parallel layer and mapping equals its unsharded counterpart, forward and backward,
at TP degrees 2 and 4 (gloo, CPU). Every rank builds the same full tensors from a fixed seed
and checks its own shard against the full computation."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.parallel.dist_harness import run_distributed

TOL = dict(rtol=1e-5, atol=1e-6)


def _chunk(t, dim, rank, world):
    return t.chunk(world, dim=dim)[rank]


def _check_mappings(rank, world):
    from megasparse.parallel.mappings import (copy_to_region, gather_from_region, reduce_from_region,
                                              scatter_to_region)

    torch.manual_seed(0)
    full = torch.randn(3, 4 * world, dtype=torch.float64)
    # scatter then gather is the identity; their backwards are each other's forwards.
    x = full.clone().requires_grad_()
    mine = scatter_to_region(x)
    torch.testing.assert_close(mine, _chunk(full, -1, rank, world))
    back = gather_from_region(mine)
    torch.testing.assert_close(back, full)
    (back * full).sum().backward()
    torch.testing.assert_close(x.grad, full)  # each rank's chunk of grad, gathered
    # reduce: forward sums the ranks' tensors; copy: backward sums the ranks' gradients.
    part = torch.full((2,), float(rank + 1), dtype=torch.float64, requires_grad=True)
    total = reduce_from_region(part)
    torch.testing.assert_close(total, torch.full((2,), world * (world + 1) / 2, dtype=torch.float64))
    total.sum().backward()
    torch.testing.assert_close(part.grad, torch.ones(2, dtype=torch.float64))
    y = torch.ones(2, dtype=torch.float64, requires_grad=True)
    (copy_to_region(y) * (rank + 1)).sum().backward()
    torch.testing.assert_close(y.grad, torch.full((2,), world * (world + 1) / 2, dtype=torch.float64))


def _check_column_and_row(rank, world):
    from megasparse.parallel.layers import ColumnParallelLinear, RowParallelLinear

    torch.manual_seed(1)
    d_in, d_out = 6, 4 * world
    x_full = torch.randn(2, 5, d_in)
    w_full = torch.randn(d_out, d_in)
    g_full = torch.randn(2, 5, d_out)  # upstream gradient of the output

    x_ref = x_full.clone().requires_grad_()
    w_ref = w_full.clone().requires_grad_()
    y_ref = F.linear(x_ref, w_ref)
    (y_ref * g_full).sum().backward()

    for gather in (False, True):
        col = ColumnParallelLinear(d_in, d_out, gather_output=gather)
        assert col.weight.tensor_model_parallel and col.weight.partition_dim == 0
        with torch.no_grad():
            col.weight.copy_(_chunk(w_full, 0, rank, world))
        x = x_full.clone().requires_grad_()
        y = col(x)
        expected = y_ref.detach() if gather else _chunk(y_ref.detach(), -1, rank, world)
        torch.testing.assert_close(y, expected, **TOL)
        g = g_full if gather else _chunk(g_full, -1, rank, world)
        (y * g).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, **TOL)  # all-reduced over ranks
        torch.testing.assert_close(col.weight.grad, _chunk(w_ref.grad, 0, rank, world), **TOL)

    # Row-parallel: W [out, in], input features split.
    w2_full = torch.randn(3, d_out)
    h_ref = torch.randn(2, 5, d_out, requires_grad=True)
    w2_ref = w2_full.clone().requires_grad_()
    g2 = torch.randn(2, 5, 3)
    z_ref = F.linear(h_ref, w2_ref)
    (z_ref * g2).sum().backward()
    for parallel_input in (True, False):
        row = RowParallelLinear(d_out, 3, input_is_parallel=parallel_input)
        assert row.weight.tensor_model_parallel and row.weight.partition_dim == 1
        with torch.no_grad():
            row.weight.copy_(_chunk(w2_full, 1, rank, world))
        h_in = _chunk(h_ref.detach(), -1, rank, world) if parallel_input else h_ref.detach()
        h = h_in.clone().requires_grad_()
        z = row(h)
        torch.testing.assert_close(z, z_ref.detach(), **TOL)
        (z * g2).sum().backward()
        h_grad = _chunk(h_ref.grad, -1, rank, world) if parallel_input else h_ref.grad
        torch.testing.assert_close(h.grad, h_grad, **TOL)
        torch.testing.assert_close(row.weight.grad, _chunk(w2_ref.grad, 1, rank, world), **TOL)


def _check_embedding(rank, world):
    from megasparse.parallel.layers import VocabParallelEmbedding

    torch.manual_seed(2)
    vocab, dim = 8 * world, 5
    table = torch.randn(vocab, dim)
    ids = torch.randint(0, vocab, (3, 7))
    ids[0, :3] = torch.tensor([0, vocab - 1, vocab // 2])  # both ends and a shard boundary
    g = torch.randn(3, 7, dim)
    ref_w = table.clone().requires_grad_()
    ref = F.embedding(ids, ref_w)
    (ref * g).sum().backward()
    emb = VocabParallelEmbedding(vocab, dim)
    with torch.no_grad():
        emb.weight.copy_(_chunk(table, 0, rank, world))
    out = emb(ids)
    torch.testing.assert_close(out, ref.detach(), **TOL)
    (out * g).sum().backward()
    torch.testing.assert_close(emb.weight.grad, _chunk(ref_w.grad, 0, rank, world), **TOL)


def _check_replicated_column(rank, world):
    """kv heads when tp > n_kv_heads: 2 distinct slices on 4 ranks. Each replica's consumer
    (its query heads) sends a different gradient; the weight gradient must be their sum."""
    from megasparse.parallel.layers import ColumnParallelLinear
    from megasparse.parallel.setup import kv_replica_groups
    from megasparse.parallel.state import get_parallel_state

    state = get_parallel_state()
    groups = kv_replica_groups(state, n_kv_heads=2)
    replicas = world // 2
    torch.manual_seed(3)
    d_in, d_out = 6, 8  # two "heads" of 4
    x_full = torch.randn(4, d_in)
    w_full = torch.randn(d_out, d_in)
    grads = torch.randn(world, 4, d_out // 2)  # rank r's consumer gradient for its slice
    col = ColumnParallelLinear(d_in, d_out, replicas=replicas, replica_group=groups[replicas])
    slot = rank // replicas
    with torch.no_grad():
        col.weight.copy_(_chunk(w_full, 0, slot, 2))
    # Counted once in the grad norm: on the first rank of each replica group only.
    assert col.weight.tensor_model_parallel == (rank % replicas == 0)
    assert col.weight.tp_shard.start == slot * (d_out // 2) and col.weight.tp_shard.replicas == replicas
    x = x_full.clone().requires_grad_()
    y = col(x)
    torch.testing.assert_close(y, _chunk(x_full @ w_full.t(), -1, slot, 2), **TOL)
    (y * grads[rank]).sum().backward()
    # Reference: the full layer whose output slice `slot` feeds all its replicas' consumers.
    w_ref = w_full.clone().requires_grad_()
    x_ref = x_full.clone().requires_grad_()
    y_ref = x_ref @ w_ref.t()
    loss = sum((_chunk(y_ref, -1, r // replicas, 2) * grads[r]).sum() for r in range(world))
    loss.backward()
    torch.testing.assert_close(col.weight.grad, _chunk(w_ref.grad, 0, slot, 2), **TOL)
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL)


def _all_checks(rank, world):
    _check_mappings(rank, world)
    _check_column_and_row(rank, world)
    _check_embedding(rank, world)
    if world == 4:
        _check_replicated_column(rank, world)
    dist.barrier()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_parallel_layers_match_unsharded(world):
    run_distributed(_all_checks, world)
