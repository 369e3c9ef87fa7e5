"""The RNG tracker, the TP-invariant initialiser and the DeepSpeed mpu adapter."""
import pytest
import torch
import torch.distributed as dist

from tests.parallel.dist_harness import run_distributed


def test_rng_tracker_forks_without_disturbing_the_default_stream():
    from megasparse.parallel.random import TP_REGION_RNG, get_rng_tracker, model_parallel_seed

    torch.manual_seed(5)
    expected_default = torch.rand(3)
    torch.manual_seed(5)
    model_parallel_seed(1234, tp_rank=1)  # must not consume or reseed the default generator
    tracker = get_rng_tracker()
    with tracker.fork():
        region_a = torch.rand(3)
    torch.testing.assert_close(torch.rand(3), expected_default)
    saved = tracker.get_states()
    with tracker.fork(TP_REGION_RNG):
        region_b = torch.rand(3)
    assert not torch.equal(region_a, region_b)  # the region stream advanced
    tracker.set_states(saved)  # as a checkpoint resume does
    with tracker.fork():
        torch.testing.assert_close(torch.rand(3), region_b)
    model_parallel_seed(1234, tp_rank=0)
    with tracker.fork():
        assert not torch.equal(torch.rand(3), region_a)  # another TP rank, another stream
    with pytest.raises(KeyError, match="not tracked"):
        with tracker.fork("nope"):
            pass


def test_seeded_init_is_the_same_full_tensor_at_any_split():
    from megasparse.parallel.initialization import seeded_normal_
    from megasparse.parallel.sharding import shard_range, tag_shard

    full = torch.empty(12, 5)
    seeded_normal_(full, "layers.0.w", 0.02, base_seed=7)
    for tp in (2, 3, 4):
        for dim in (0, 1):
            if full.shape[dim] % tp:
                continue
            for rank in range(tp):
                start, length = shard_range(full.shape[dim], rank, tp)
                shape = list(full.shape)
                shape[dim] = length
                shard = torch.nn.Parameter(torch.empty(shape))
                tag_shard(shard, dim, start, full.shape[dim], rank)
                seeded_normal_(shard, "layers.0.w", 0.02, base_seed=7)
                torch.testing.assert_close(shard.detach(), full.narrow(dim, start, length), rtol=0, atol=0)
    other = torch.empty(12, 5)
    seeded_normal_(other, "layers.1.w", 0.02, base_seed=7)
    assert not torch.equal(other, full)  # per-parameter streams


def _check_mpu(rank, world):
    from megasparse.parallel.mpu import MegasparseMPU
    from megasparse.parallel.state import get_parallel_state

    state = get_parallel_state()
    mpu = MegasparseMPU(state)
    tp = 2
    assert mpu.get_tensor_model_parallel_world_size() == mpu.get_model_parallel_world_size() == tp
    assert mpu.get_tensor_model_parallel_rank() == mpu.get_model_parallel_rank() == rank % tp
    assert mpu.get_data_parallel_world_size() == world // tp and mpu.get_data_parallel_rank() == rank // tp
    assert mpu.get_tensor_model_parallel_src_rank() == rank - rank % tp
    assert mpu.get_data_parallel_group_ranks() == list(range(rank % tp, world, tp))
    assert mpu.get_pipeline_model_parallel_world_size() == 1
    assert not hasattr(mpu, "initialize_sequence_parallel")  # would switch DeepSpeed to SP groups
    # The groups really are the consecutive TP blocks and the strided DP sets.
    ranks = torch.tensor([rank])
    tp_members = [torch.zeros(1, dtype=torch.long) for _ in range(tp)]
    dist.all_gather(tp_members, ranks, group=mpu.get_tensor_model_parallel_group())
    assert [int(t) for t in tp_members] == list(range(rank - rank % tp, rank - rank % tp + tp))
    dp_members = [torch.zeros(1, dtype=torch.long) for _ in range(world // tp)]
    dist.all_gather(dp_members, ranks, group=mpu.get_data_parallel_group())
    assert [int(t) for t in dp_members] == mpu.get_data_parallel_group_ranks()
    # DeepSpeed's own helpers read the adapter as intended.
    from deepspeed.utils.bwc import bwc_pipeline_parallel_world_size, bwc_tensor_model_parallel_rank

    assert bwc_tensor_model_parallel_rank(mpu) == rank % tp and bwc_pipeline_parallel_world_size(mpu) == 1


@pytest.mark.slow
def test_mpu_exposes_tp_and_dp_groups():
    import deepspeed.utils.bwc  # noqa: F401  (imported once, before forking)

    run_distributed(_check_mpu, 4, tp=2)
