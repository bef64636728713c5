"""Training samplers that a run can resume in the middle of an epoch.

Every sampler works the same way: each epoch has one order of all processes' samples, a pure function of
(seed, epoch, the number of processes that began the epoch), and rank r of w takes samples r, r + w, ...
of it. The processes step together, so after k steps of batch b they have used exactly the first
k x b x w samples of the order, whatever happened to each of them. `set_epoch(epoch, start, began_with)`
resumes there: the rest of the order is shared out again, by the processes there are now. With as many
processes as before, each rank gets exactly the samples it would have had.

torch's DistributedSampler has no such entry point (it can only start an epoch from its beginning);
ShuffledSampler gives exactly its order (shuffle=True, drop_last=True), so runs are unchanged.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from dr_resnet import NUM_GRADES
from dr_resnet.seeds import derive_seed


class EpochSampler(Sampler[int]):
    """Rank `rank` of `num_replicas`' share of one epoch's order (see the module's docstring)."""

    def __init__(self, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in 0..{num_replicas - 1}")
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.epoch, self.start, self.began_with = 0, 0, num_replicas

    def epoch_length(self, processes: int) -> int:
        """Samples in an epoch begun by `processes` processes (a multiple of it)."""
        raise NotImplementedError

    def epoch_order(self, processes: int | None = None) -> torch.Tensor:
        """Every process's samples of the current epoch, in order, for an epoch begun by `processes`
        (default: as many as this sampler's)."""
        raise NotImplementedError

    def grade_shares(self, epoch: int) -> np.ndarray:
        """The expected share of each grade among `epoch`'s samples (what a fresh output layer's bias
        starts from: the distribution the network is trained on first)."""
        raise NotImplementedError

    def set_epoch(self, epoch: int, start: int = 0, began_with: int | None = None) -> None:
        """Take part in `epoch`, from its `start`-th sample (the samples all processes together have
        used before a resume), in the order of an epoch begun by `began_with` processes."""
        began_with = began_with or self.num_replicas
        if not 0 <= start <= self.epoch_length(began_with):
            raise ValueError(f"start {start} is outside an epoch of {self.epoch_length(began_with)} samples")
        self.epoch, self.start, self.began_with = epoch, start, began_with

    def _share(self) -> int:
        return (self.epoch_length(self.began_with) - self.start) // self.num_replicas

    def __iter__(self) -> Iterator[int]:
        rest = self.epoch_order(self.began_with)[self.start:]
        return iter(rest[self.rank: self._share() * self.num_replicas: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self._share()


class ShuffledSampler(EpochSampler):
    """A random permutation per epoch, seeded by (seed, epoch), cut to a multiple of the process count:
    the order of DistributedSampler(shuffle=True, drop_last=True)."""

    def __init__(self, labels: Sequence[int], num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(num_replicas, rank, seed)
        self.labels = np.asarray(labels)
        self.length = len(self.labels)

    def epoch_length(self, processes: int) -> int:
        return self.length // processes * processes

    def epoch_order(self, processes: int | None = None) -> torch.Tensor:
        return shuffled_order(self.length, self.seed, self.epoch, self.epoch_length(processes or self.num_replicas))

    def grade_shares(self, epoch: int) -> np.ndarray:
        return natural_shares(self.labels)


def shuffled_order(length: int, seed: int, epoch: int, count: int) -> torch.Tensor:
    """The first `count` of a random permutation of `length` samples, drawn from (seed, epoch)'s stream."""
    return torch.randperm(length, generator=order_generator(seed, epoch))[:count]


def order_generator(seed: int, epoch: int) -> torch.Generator:
    """The stream one epoch's sample order is drawn from (seeds.derive_seed: no two (seed, epoch) share it)."""
    return torch.Generator().manual_seed(derive_seed(seed, "order", epoch))


def natural_shares(labels: np.ndarray) -> np.ndarray:
    """Each grade's share of `labels` (grades 0..4)."""
    return np.bincount(labels, minlength=NUM_GRADES) / max(1, len(labels))


def uniform_shares(labels: np.ndarray) -> np.ndarray:
    """Every grade present in `labels` equally likely (a grade with no image gets 0)."""
    present = np.bincount(labels, minlength=NUM_GRADES) > 0
    return present / max(1, present.sum())


class DistributedBalancedSampler(EpochSampler):
    """Class-balanced draws for distributed training: each epoch draws `num_samples` indices with
    replacement, every class equally likely (each image weighted by 1 / its class's count), from one
    stream seeded by (seed, epoch). Disjoint shares of the same epoch, whatever the world size. An
    alternative to a class-weighted loss for the rare grades."""

    def __init__(self, labels: Sequence[int], num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 num_samples: int | None = None) -> None:
        super().__init__(num_replicas, rank, seed)
        self.labels = np.asarray(labels)
        counts = np.bincount(self.labels)
        self.weights = torch.as_tensor(1.0 / counts[self.labels], dtype=torch.float64)
        self.num_samples = num_samples or len(self.labels)

    def epoch_length(self, processes: int) -> int:
        return self.num_samples // processes * processes  # the same count on every rank: no rank waits

    def epoch_order(self, processes: int | None = None) -> torch.Tensor:
        generator = order_generator(self.seed, self.epoch)
        return torch.multinomial(self.weights, self.epoch_length(processes or self.num_replicas), replacement=True,
                                 generator=generator)

    def grade_shares(self, epoch: int) -> np.ndarray:
        return uniform_shares(self.labels)


class ProgressiveSampler(EpochSampler):
    """Progressive class balancing (as in the 2nd- and 5th-placed Kaggle 2015 DR entries): epoch e draws
    grades with shares (1 - m) x uniform + m x natural, m = e / (natural_from x epochs) capped at 1, so
    the first epoch sees every grade about equally often (a run leaves the majority class early) and
    the last ones see the natural distribution (the run ends calibrated to real prevalence). Epochs
    with m < 1 draw `len(labels)` images with replacement (each image weighted by its grade's share /
    its grade's count); from m = 1 on, an epoch is a plain shuffle (ShuffledSampler's order). The
    order is a pure function of (seed, epoch, processes): resume is exact, as with the other samplers.
    A run extended with more epochs stretches the schedule, as it stretches the learning-rate one."""

    def __init__(self, labels: Sequence[int], epochs: int, natural_from: float = 0.6, num_replicas: int = 1,
                 rank: int = 0, seed: int = 0) -> None:
        super().__init__(num_replicas, rank, seed)
        self.labels = np.asarray(labels)
        self.epochs, self.natural_from = epochs, natural_from

    def natural_weight(self, epoch: int) -> float:
        """m: 0 in the first epoch, 1 from epoch natural_from x epochs on."""
        end = self.natural_from * self.epochs
        return 1.0 if end <= 0 else min(1.0, epoch / end)

    def grade_shares(self, epoch: int) -> np.ndarray:
        m = self.natural_weight(epoch)
        return (1 - m) * uniform_shares(self.labels) + m * natural_shares(self.labels)

    def epoch_length(self, processes: int) -> int:
        return len(self.labels) // processes * processes

    def epoch_order(self, processes: int | None = None) -> torch.Tensor:
        processes = processes or self.num_replicas
        if self.natural_weight(self.epoch) >= 1:
            return shuffled_order(len(self.labels), self.seed, self.epoch, self.epoch_length(processes))
        counts = np.bincount(self.labels, minlength=NUM_GRADES)
        per_image = self.grade_shares(self.epoch)[self.labels] / counts[self.labels]
        generator = order_generator(self.seed, self.epoch)
        return torch.multinomial(torch.as_tensor(per_image, dtype=torch.float64), self.epoch_length(processes),
                                 replacement=True, generator=generator)
