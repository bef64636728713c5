import numpy as np
import pytest
import torch
from scipy import stats
from torch.utils.data import DistributedSampler

from dr_resnet.data.samplers import DistributedBalancedSampler, ProgressiveSampler, ShuffledSampler
from dr_resnet.seeds import derive_seed

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
def test_shuffled_sampler_shares_out_like_distributed_sampler(length, world):
    """DistributedSampler's sharing (shuffle=True, drop_last=True): rank r of w takes r, r + w, ... of one
    permutation cut to a multiple of w; only the permutation's seed differs (theirs is seed + epoch)."""
    for epoch in (0, 3):
        torch_lengths = {len(DistributedSampler(range(length), world, r, shuffle=True, drop_last=True)) for r in range(world)}
        shares = []
        for rank in range(world):
            ours = ShuffledSampler(np.zeros(length, dtype=int), world, rank, seed=5)
            ours.set_epoch(epoch)
            shares.append(list(ours))
            assert {len(ours)} == torch_lengths
        order = torch.randperm(length, generator=torch.Generator().manual_seed(derive_seed(5, "order", epoch))).tolist()
        assert shares == [order[: length // world * world][r::world] for r in range(world)]


SAMPLERS = {"shuffled": lambda seed: ShuffledSampler(LABELS, seed=seed),
            "balanced": lambda seed: DistributedBalancedSampler(LABELS, seed=seed),
            "progressive": lambda seed: ProgressiveSampler(LABELS, 10, 0.6, seed=seed)}


@pytest.mark.parametrize("kind", SAMPLERS)
def test_two_seeds_share_no_epoch_order(kind):
    """seed + epoch made seed 0's epoch e + 1 seed 1's epoch e: no order may recur across seeds and epochs."""
    orders = []
    for seed in range(4):
        sampler = SAMPLERS[kind](seed)
        for epoch in range(10):
            sampler.set_epoch(epoch)
            orders.append(tuple(sampler))
    assert len(set(orders)) == len(orders)


def test_derived_seeds_differ_by_every_key_and_repeat_exactly():
    keys = [(s, p, *k) for s in (0, 1, 2**32) for p in ("order", "augment") for k in [(), (0,), (1,), (0, 1), (1, 0)]]
    seeds = [derive_seed(s, p, *k) for s, p, *k in keys]
    assert len(set(seeds)) == len(keys)
    assert seeds == [derive_seed(s, p, *k) for s, p, *k in keys]
    assert all(0 <= x < 2**63 for x in seeds)
    with pytest.raises(ValueError, match="unknown seed purpose"):
        derive_seed(0, "shuffle")


@pytest.mark.parametrize("make", [lambda w, r: ShuffledSampler(LABELS[::20], w, r, seed=2),
                                  lambda w, r: DistributedBalancedSampler(LABELS[::20], w, r, seed=2),
                                  lambda w, r: ProgressiveSampler(LABELS[::20], 10, 0.6, w, r, seed=2)])
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


def test_progressive_sampler_moves_from_uniform_grades_to_the_natural_distribution():
    """10 epochs, natural from 60% of the run: epoch e draws grades with shares (1 - m) uniform + m natural,
    m = e / 6, capped at 1; from epoch 6 on an epoch is ShuffledSampler's permutation of every image."""
    natural = np.bincount(LABELS) / len(LABELS)
    sampler = ProgressiveSampler(LABELS, epochs=10, natural_from=0.6, seed=3)
    assert [sampler.natural_weight(e) for e in range(10)] == pytest.approx([0, 1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1, 1, 1, 1])
    assert sampler.grade_shares(0) == pytest.approx([0.2] * 5)
    assert sampler.grade_shares(3) == pytest.approx(0.5 * np.full(5, 0.2) + 0.5 * natural)
    for epoch in (0, 3):
        counts = np.zeros(5)
        for seed in range(20):  # 20 epochs' worth of draws, seeds apart
            s = ProgressiveSampler(LABELS, 10, 0.6, seed=seed)
            s.set_epoch(epoch)
            counts += np.bincount(LABELS[list(s)], minlength=5)
        expected = sampler.grade_shares(epoch) * counts.sum()
        assert stats.chisquare(counts, expected).pvalue > 0.01, (epoch, counts, expected)
    for epoch in (6, 9):
        sampler.set_epoch(epoch)
        shuffled = ShuffledSampler(LABELS, seed=3)
        shuffled.set_epoch(epoch)
        assert list(sampler) == list(shuffled) and sorted(sampler) == list(range(len(LABELS)))
    # A grade with no image gets no share, and nothing is drawn from it.
    missing = ProgressiveSampler(LABELS[LABELS != 3], 10, 0.6)
    assert missing.grade_shares(0) == pytest.approx([0.25, 0.25, 0.25, 0, 0.25])
    # natural_from=0: the natural distribution from the first epoch on.
    assert ProgressiveSampler(LABELS, 10, 0.0).grade_shares(0) == pytest.approx(natural)


def test_every_sampler_reports_the_grade_shares_of_its_first_epoch():
    natural = np.bincount(LABELS) / len(LABELS)
    assert ShuffledSampler(LABELS).grade_shares(0) == pytest.approx(natural)
    assert DistributedBalancedSampler(LABELS).grade_shares(0) == pytest.approx([0.2] * 5)
    assert ProgressiveSampler(LABELS, 6).grade_shares(0) == pytest.approx([0.2] * 5)
