"""Every random generator's seed, derived in one place.

A generator seeded `seed + epoch` repeats another seed's stream one epoch later (seed 0's epoch 1 is seed
1's epoch 0), so runs that differ only in their seed share most of their data orders and their spread is
understated. Here the user's seed and everything the stream must differ by (its purpose, the epoch, the
rank) are hashed together by numpy's SeedSequence, built for exactly this: nearby inputs give unrelated
streams. Torch-free, so the results layer (bootstrap) reads the same rule.
"""

from __future__ import annotations

import zlib

import numpy as np

# What a stream is for: two purposes never share a stream, whatever their other keys.
PURPOSES = ("init", "order", "augment", "holdout", "bootstrap", "subset", "search")


def derive_seed(seed: int, purpose: str, *keys: int) -> int:
    """A 63-bit generator seed mixed from (purpose, seed, *keys), e.g. derive_seed(3, "order", epoch):
    a pure function of its arguments, unrelated for any two different argument lists."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown seed purpose {purpose!r}: one of {', '.join(PURPOSES)}")
    # Each value as two 32-bit words and their count first: SeedSequence splits big integers into a variable
    # number of words and pads with zeros, so (1, 0) and (1,) or (2**32,) and (0, 1) would collide otherwise.
    words = [zlib.crc32(purpose.encode()), len(keys)]
    for value in (seed, *keys):
        value = int(value) % 2**64  # negative seeds too
        words += [value & 0xFFFFFFFF, value >> 32]
    state = np.random.SeedSequence(np.array(words, dtype=np.uint32)).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))  # torch's manual_seed takes up to 2**63 - 1 on every device
