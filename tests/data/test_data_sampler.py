import itertools

import pytest

from megasparse.data import GlobalBatchSampler
from megasparse.errors import ConfigError


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_dp_slices_are_disjoint_and_union_is_the_global_batch():
    n, G, dp = 103, 12, 3
    samplers = [GlobalBatchSampler(n, G, r, dp, seed=7) for r in range(dp)]
    per_rank = [take(s, 20) for s in samplers]
    reference = GlobalBatchSampler(n, G, 0, 1, seed=7)
    for step in range(20):
        slices = [per_rank[r][step] for r in range(dp)]
        assert all(len(s) == G // dp for s in slices)
        joined = [i for s in slices for i in s]
        assert joined == reference.global_batch(step * G)
        # disjoint within an epoch; a batch straddling the epoch end may repeat an index legitimately
        epoch_start, epoch_end = divmod(step * G, n)[0], divmod(step * G + G - 1, n)[0]
        if epoch_start == epoch_end:
            assert len(set(joined)) == G


def test_dp1_and_dp2_see_the_same_global_batches():
    n, G = 50, 8
    dp1 = take(GlobalBatchSampler(n, G, 0, 1, seed=3), 30)
    dp2 = [take(GlobalBatchSampler(n, G, r, 2, seed=3), 30) for r in range(2)]
    for step in range(30):
        assert dp1[step] == dp2[0][step] + dp2[1][step]


def test_resume_at_consumed_samples_is_exact():
    n, G = 37, 6
    straight = GlobalBatchSampler(n, G, 1, 2, seed=11)
    batches = take(straight, 25)
    assert straight.consumed_samples == 25 * G
    for k in (0, 1, 6, 13, 24):
        resumed = GlobalBatchSampler(n, G, 1, 2, seed=11, consumed_samples=k * G)
        assert take(resumed, 25 - k) == batches[k:]


def test_each_epoch_is_a_new_permutation_of_all_samples():
    n = 40
    s = GlobalBatchSampler(n, 8, 0, 1, seed=5)
    epochs = [s.stream(e * n, n) for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))
    assert epochs[0] != epochs[1] != epochs[2]
    assert epochs[0] != list(range(n))  # shuffled
    assert GlobalBatchSampler(n, 8, 0, 1, seed=6).stream(0, n) != epochs[0]  # the seed matters


def test_bad_arguments_are_clear():
    with pytest.raises(ConfigError, match="multiple of the data-parallel size 3"):
        GlobalBatchSampler(10, 8, 0, 3, seed=0)
    with pytest.raises(ConfigError, match="dp_rank=2"):
        GlobalBatchSampler(10, 8, 2, 2, seed=0)
