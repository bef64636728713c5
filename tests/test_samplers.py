import numpy as np
from scipy import stats

from dr_resnet.samplers import DistributedBalancedSampler

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
    everything = ranks[0].epoch_draws().tolist()
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
