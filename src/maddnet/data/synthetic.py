"""Random data with a learnable rule, for tests and speed measurements without real data."""

from __future__ import annotations

import os

import torch

from maddnet.data.registry import DatasetInfo, register_dataset
from maddnet.data.tensor_images import TensorImageDataset


@register_dataset("synthetic")
def synthetic_dataset(
    split: str = "train",
    root: str | os.PathLike | None = None,
    augment: bool = False,
    num_samples: int = 512,
    num_classes: int = 10,
    input_shape: tuple[int, int, int] = (3, 32, 32),
    seed: int = 0,
) -> TensorImageDataset:
    """Gaussian inputs whose label is the class of the nearest of ``num_classes`` fixed
    random centres (so models can learn it). Splits draw different samples."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, *input_shape, generator=gen)
    split_offset = {"train": 1, "val": 2, "test": 3}[split]
    gen = torch.Generator().manual_seed(seed * 10 + split_offset)
    labels = torch.randint(0, num_classes, (num_samples,), generator=gen)
    images = centres[labels] + torch.randn(num_samples, *input_shape, generator=gen)
    info = DatasetInfo(
        name="synthetic",
        classes=tuple(f"class{i}" for i in range(num_classes)),
        input_shape=tuple(input_shape),
        mean=(0.0,) * input_shape[0],
        std=(1.0,) * input_shape[0],
    )
    return TensorImageDataset(images, labels, info, value_range=1.0, seed=seed)
