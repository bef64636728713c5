"""Training samplers beyond torch's DistributedSampler."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler


class DistributedBalancedSampler(Sampler[int]):
    """Class-balanced draws for distributed training: each epoch draws `num_samples` indices with
    replacement, every class equally likely (each image weighted by 1 / its class's count), from one
    stream seeded by (seed, epoch). Rank r of w takes draws r, r + w, ...: disjoint shares of the same
    epoch, whatever the world size. An alternative to a class-weighted loss for the rare grades."""

    def __init__(self, labels: Sequence[int], num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 num_samples: int | None = None) -> None:
        labels = np.asarray(labels)
        counts = np.bincount(labels)
        self.weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.float64)
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        total = num_samples or len(labels)
        self.per_rank = total // num_replicas  # the same count on every rank: no rank waits on another

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_draws(self) -> torch.Tensor:
        """All ranks' draws of this epoch, in order (rank r's are every w-th from r)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.multinomial(self.weights, self.per_rank * self.num_replicas, replacement=True, generator=generator)

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_draws()[self.rank::self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.per_rank
