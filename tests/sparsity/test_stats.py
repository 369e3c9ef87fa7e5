"""SparsityStats against a direct computation, over windows, and reduced over 2 gloo ranks."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megasparse.model.sparse_mlp import torch_gated_mlp
from megasparse.sparsity.stats import SparsityStats
from tests.trainer_utils import _port

D, H, L, M = 16, 24, 2, 12
DEAD = [3, 7, 20]  # gate rows made negative against positive inputs: these never fire


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(L):
        wg, wu, wd = (torch.randn(H, D, generator=g), torch.randn(H, D, generator=g), torch.randn(D, H, generator=g))
        wg[DEAD] = -wg[DEAD].abs()
        layers.append((wg, wu, wd))
    return layers


def _batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(M, D, generator=g).abs() for _ in range(n)]


def _feed(stats, layers, xs, rows=slice(None)):
    """What the trainer does per micro-batch; ``rows`` selects a TP shard of the neurons."""
    for x in xs:
        res = [torch_gated_mlp(x, wg[rows], wu[rows], wd[:, rows]) for wg, wu, wd in layers]
        token_nnz = [(x @ wg[rows].t() > 0).sum(-1, dtype=torch.int32) for wg, _, _ in layers]
        stats.update([r.fire_counts for r in res], torch.stack([r.l1 for r in res]), x.shape[0], token_nnz)


def _direct(layers, xs):
    """Per layer: nnz/token mean and max, dead fraction, mean L1, firing rate per neuron."""
    x = torch.cat(xs)
    out = {"nnz": [], "max": [], "dead": [], "l1": [], "rate": []}
    for wg, wu, _ in layers:
        fired = (x @ wg.t()) > 0
        h = torch.relu(x @ wg.t()) * (x @ wu.t())
        out["nnz"].append(fired.sum(1).double().mean().item())
        out["max"].append(float(fired.sum(1).max()))
        out["dead"].append((fired.sum(0) == 0).double().mean().item())
        out["l1"].append(h.abs().sum(1).mean().item())
        out["rate"].append(fired.double().mean(0))
    return out


def _check(rec, direct, stats=None, tp_group=None):
    assert rec["nnz_per_token_layer"] == pytest.approx(direct["nnz"])
    assert rec["nnz_fraction_layer"] == pytest.approx([v / H for v in direct["nnz"]])
    assert rec["nnz_max_layer"] == direct["max"]
    assert rec["dead_fraction_layer"] == pytest.approx(direct["dead"])
    assert rec["l1_layer"] == pytest.approx(direct["l1"], rel=1e-5)
    assert rec["nnz_per_token"] == pytest.approx(sum(direct["nnz"]) / L)
    assert rec["dead_fraction"] == pytest.approx(sum(direct["dead"]) / L)
    if stats is not None:
        assert torch.allclose(stats.firing_rates(tp_group), torch.stack(direct["rate"]))


def test_interval_statistics_equal_direct_computation():
    layers, xs = _weights(), _batches(3, seed=1)
    stats = SparsityStats(L, H, H, torch.device("cpu"))
    _feed(stats, layers, xs)
    rec = stats.reduce_and_reset()
    _check(rec, _direct(layers, xs), stats)
    assert all(d >= len(DEAD) / H for d in rec["dead_fraction_layer"])
    # Reset: the next interval starts from zero.
    _feed(stats, layers, xs[:1])
    assert stats.reduce_and_reset()["nnz_per_token_layer"] == pytest.approx(_direct(layers, xs[:1])["nnz"])


def test_window_spans_log_intervals_and_drops_old_ones():
    layers = _weights()
    a, b, c = _batches(1, 2), _batches(1, 3), _batches(1, 4)
    stats = SparsityStats(L, H, H, torch.device("cpu"), window_tokens=2 * M)
    for xs in (a, b):
        _feed(stats, layers, xs)
        rec = stats.reduce_and_reset()
    assert stats.window_full() and rec["dead_window_tokens"] == 2 * M
    assert rec["dead_fraction_layer"] == pytest.approx(_direct(layers, a + b)["dead"])
    _feed(stats, layers, c)
    rec = stats.reduce_and_reset()  # a falls out of the window
    assert rec["dead_fraction_layer"] == pytest.approx(_direct(layers, b + c)["dead"])
    assert rec["nnz_per_token_layer"] == pytest.approx(_direct(layers, c)["nnz"])  # nnz is per interval
    assert torch.allclose(stats.firing_rates(), torch.stack(_direct(layers, b + c)["rate"]))
    masks = stats.dead_masks()
    assert all(m[DEAD].all() for m in masks)
    stats.reset_window()
    assert not stats.window_full()


def test_without_per_token_counts_max_is_absent():
    layers, xs = _weights(), _batches(1, 1)
    stats = SparsityStats(L, H, H, torch.device("cpu"))
    res = [torch_gated_mlp(xs[0], *w) for w in layers]
    stats.update([r.fire_counts for r in res], torch.stack([r.l1 for r in res]), M)
    rec = stats.reduce_and_reset()
    assert "nnz_max_layer" not in rec and rec["nnz_per_token_layer"] == pytest.approx(_direct(layers, xs)["nnz"])


# ---------------------------------------------------------------- 2 gloo ranks

def _worker(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _check_mode(rank, world, "dp")
        _check_mode(rank, world, "tp")
    finally:
        dist.destroy_process_group()


def _check_mode(rank, world, mode):
    layers = _weights()
    if mode == "dp":  # same neurons, different tokens: counts and tokens add up
        xs_all = [_batches(2, seed=10 + r) for r in range(world)]
        stats = SparsityStats(L, H, H, torch.device("cpu"))
        _feed(stats, layers, xs_all[rank])
        rec = stats.reduce_and_reset(dp_group=dist.group.WORLD, tp_group=None)
        _check(rec, _direct(layers, xs_all[0] + xs_all[1]), stats)
    else:  # tp: same tokens, each rank owns H/2 neurons: nnz, max, dead and L1 sum over shards
        singles = [dist.new_group([r]) for r in range(world)]
        xs = _batches(2, seed=20)
        shard = H // world
        stats = SparsityStats(L, shard, H, torch.device("cpu"), tp_group=dist.group.WORLD)
        _feed(stats, layers, xs, rows=slice(rank * shard, (rank + 1) * shard))
        rec = stats.reduce_and_reset(dp_group=singles[rank], tp_group=dist.group.WORLD)
        # The max over every micro-batch of the interval, each token's count summed over shards
        # (here the first micro-batch holds it: a max of the last one only would fail).
        assert _direct(layers, xs)["max"] != _direct(layers, xs[-1:])["max"]
        _check(rec, _direct(layers, xs), stats, tp_group=dist.group.WORLD)
        with pytest.raises(ValueError, match="pass the tensor-parallel group"):
            SparsityStats(L, shard, H, torch.device("cpu"))



@pytest.mark.slow
def test_reduce_across_two_gloo_ranks_dp_and_tp():
    mp.spawn(_worker, args=(2, _port()), nprocs=2, join=True)
