"""Seeded random transforms, so that a resumed run sees the same augmentation.

A data set draws the randomness of sample ``index`` in epoch ``epoch`` from a generator
seeded with (seed, epoch, index): results do not depend on worker processes, on how many
samples were drawn before, or on whether the run was interrupted and resumed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample, mixed so nearby (epoch, index) pairs differ well."""
    x = seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB
    x &= (1 << 64) - 1
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & ((1 << 64) - 1)
    return x >> 1


@contextlib.contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    """Run a block (e.g. torchvision transforms, which use the global RNG) with a fixed seed,
    leaving the caller's global CPU RNG state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class SeededSampleMixin:
    """Gives a data set ``seed``, ``epoch``, ``set_epoch`` and ``generator_for(index)``."""

    seed: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def generator_for(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(C, H, W) float → per-channel (x - mean) / std."""
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - mean_t) / std_t


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """(C, H, W) → same shape: zero-pad by ``padding`` and crop back at a random offset."""
    if padding <= 0:
        return x
    _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    top, left = torch.randint(0, 2 * padding + 1, (2,), generator=generator).tolist()
    return padded[:, top : top + h, left : left + w]


def random_hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(C, H, W): mirror left-right with probability 1/2."""
    if torch.rand((), generator=generator).item() < 0.5:
        return x.flip(-1)
    return x


def random_erase(
    x: torch.Tensor, generator: torch.Generator, max_fraction: float = 0.25, probability: float = 0.5
) -> torch.Tensor:
    """Cutout: with ``probability`` zero a random square of side ≤ sqrt(max_fraction)·H."""
    if torch.rand((), generator=generator).item() >= probability:
        return x
    _, h, w = x.shape
    side = max(1, int((max_fraction**0.5) * min(h, w)))
    top = int(torch.randint(0, h - side + 1, (), generator=generator))
    left = int(torch.randint(0, w - side + 1, (), generator=generator))
    x = x.clone()
    x[:, top : top + side, left : left + side] = 0
    return x
