"""A sampler that shards across processes and can start in the middle of an epoch."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Indices of one epoch for one process.

    Shuffled with a generator seeded by (seed, epoch), so every process and every resumed
    run sees the same order. With ``world_size > 1`` the order is padded to a multiple
    of ``world_size`` (when ``pad``; needed in training so all processes take the same
    number of steps) and process ``rank`` takes every ``world_size``-th index.
    ``set_start(n)`` skips the first n indices of this process's share (resume).
    """

    def __init__(
        self,
        num_samples: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = True,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.pad = pad
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` indices of the next iteration (then back to 0)."""
        self.start = start

    def _share(self) -> list[int]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=gen).tolist()
        else:
            order = list(range(self.num_samples))
        if self.pad and self.world_size > 1 and len(order) % self.world_size:
            extra = self.world_size - len(order) % self.world_size
            order += order[:extra]
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        if self.pad and self.world_size > 1:
            return -(-self.num_samples // self.world_size)
        return len(range(self.rank, self.num_samples, self.world_size))

    def __iter__(self) -> Iterator[int]:
        share = self._share()
        start, self.start = self.start, 0
        return iter(share[start:])
