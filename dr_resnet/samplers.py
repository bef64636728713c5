"""Training samplers that a run can resume in the middle of an epoch.

Both samplers work the same way: each epoch has one order of all processes' samples, a pure function of
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
    """A random permutation per epoch, seeded by seed + epoch, cut to a multiple of the process count:
    the order of DistributedSampler(shuffle=True, drop_last=True)."""

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(num_replicas, rank, seed)
        self.length = length

    def epoch_length(self, processes: int) -> int:
        return self.length // processes * processes

    def epoch_order(self, processes: int | None = None) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.length, generator=generator)[: self.epoch_length(processes or self.num_replicas)]


class DistributedBalancedSampler(EpochSampler):
    """Class-balanced draws for distributed training: each epoch draws `num_samples` indices with
    replacement, every class equally likely (each image weighted by 1 / its class's count), from one
    stream seeded by (seed, epoch). Disjoint shares of the same epoch, whatever the world size. An
    alternative to a class-weighted loss for the rare grades."""

    def __init__(self, labels: Sequence[int], num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 num_samples: int | None = None) -> None:
        super().__init__(num_replicas, rank, seed)
        labels = np.asarray(labels)
        counts = np.bincount(labels)
        self.weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.float64)
        self.num_samples = num_samples or len(labels)

    def epoch_length(self, processes: int) -> int:
        return self.num_samples // processes * processes  # the same count on every rank: no rank waits

    def epoch_order(self, processes: int | None = None) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.multinomial(self.weights, self.epoch_length(processes or self.num_replicas), replacement=True,
                                 generator=generator)
