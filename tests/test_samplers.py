import numpy as np
import pytest
from scipy import stats
from torch.utils.data import DistributedSampler

from dr_resnet.samplers import DistributedBalancedSampler, ShuffledSampler

LABELS = np.array([0] * 730 + [1] * 70 + [2] * 150 + [3] * 26 + [4] * 24)  # EyePACS-like, 1000 images


def test_every_grade_equally_likely():
    sampler = DistributedBalancedSampler(LABELS, seed=1, num_samples=5000)
    drawn = LABELS[list(sampler)]
    counts = np.bincount(drawn, minlength=5)
    assert stats.chisquare(counts).pvalue > 0.01, counts
    assert len(sampler) == 5000


def test_ranks_take_disjoint_shares_of_one_reproducible_epoch():
    ranks = [DistributedBalancedSampler(LABELS, num_replicas=3, rank=r, seed=7) for r in range(3)]
    for s in ranks:
        s.set_epoch(4)
    shares = [list(s) for s in ranks]
    assert [len(x) for x in shares] == [333, 333, 333]
    everything = ranks[0].epoch_order().tolist()
    for r in range(3):
        assert shares[r] == everything[r::3]
    again = DistributedBalancedSampler(LABELS, num_replicas=3, rank=1, seed=7)
    again.set_epoch(4)
    assert list(again) == shares[1]
    again.set_epoch(5)
    assert list(again) != shares[1]
    other_seed = DistributedBalancedSampler(LABELS, num_replicas=3, rank=1, seed=8)
    other_seed.set_epoch(4)
    assert list(other_seed) != shares[1]


@pytest.mark.parametrize("length,world", [(40, 1), (40, 2), (13, 2), (13, 3), (101, 4)])
def test_shuffled_sampler_gives_distributed_samplers_order(length, world):
    for epoch in (0, 3):
        for rank in range(world):
            ours = ShuffledSampler(length, world, rank, seed=5)
            torchs = DistributedSampler(range(length), world, rank, shuffle=True, seed=5, drop_last=True)
            ours.set_epoch(epoch)
            torchs.set_epoch(epoch)
            assert list(ours) == list(torchs) and len(ours) == len(torchs)


@pytest.mark.parametrize("make", [lambda w, r: ShuffledSampler(50, w, r, seed=2),
                                  lambda w, r: DistributedBalancedSampler(LABELS[::20], w, r, seed=2)])
def test_a_resumed_epoch_continues_each_ranks_share_where_it_stopped(make):
    world, batch, steps = 2, 4, 3
    full = [make(world, r) for r in range(world)]
    for s in full:
        s.set_epoch(1)
    shares = [list(s) for s in full]
    resumed = [make(world, r) for r in range(world)]
    for s in resumed:
        s.set_epoch(1, start=steps * batch * world)
    assert [list(s) for s in resumed] == [share[steps * batch:] for share in shares]
    assert [len(s) for s in resumed] == [len(share) - steps * batch for share in shares]
    # Resumed by 3 processes: the rest of the 2-process epoch's order, shared out again, nothing used twice.
    order = full[0].epoch_order().tolist()
    used = steps * batch * world
    by_three = [make(3, r) for r in range(3)]
    for s in by_three:
        s.set_epoch(1, start=used, began_with=world)
    taken = [i for s in by_three for i in s]
    rest = order[used:]
    assert sorted(taken) == sorted(rest[: len(rest) // 3 * 3]) and len(by_three[0]) == len(rest) // 3
    with pytest.raises(ValueError, match="outside an epoch of 50"):
        by_three[0].set_epoch(1, start=51, began_with=2)
