"""Small image data sets held in memory as one uint8 tensor (Fashion-MNIST, digits, CIFAR)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from maddnet.data.registry import DatasetInfo
from maddnet.data.transforms import (
    SeededSampleMixin,
    normalize,
    random_crop,
    random_erase,
    random_hflip,
)


@dataclass(frozen=True)
class SmallImageAugment:
    """Training augmentation for small images: pad-and-crop, mirror, cutout."""

    crop_padding: int = 2
    hflip: bool = True
    erase: bool = False


class TensorImageDataset(SeededSampleMixin, Dataset):
    """Images (N, C, H, W) (uint8 0..255 or float) and labels (N,) → normalised float
    (C, H, W) tensors and int labels. ``augment`` is applied per sample, seeded."""

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor,
        info: DatasetInfo,
        augment: SmallImageAugment | None = None,
        value_range: float = 255.0,
        seed: int = 0,
    ):
        # copy numpy input: IDX buffers are read-only
        images = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images))
        if images.ndim == 3:
            images = images.unsqueeze(1)
        if images.ndim != 4 or images.shape[1:] != info.input_shape:
            raise ValueError(
                f"{info.name}: images of shape {tuple(images.shape)} do not match "
                f"input shape {info.input_shape}"
            )
        labels = torch.as_tensor(
            labels if isinstance(labels, torch.Tensor) else np.asarray(labels), dtype=torch.long
        )
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"{info.name}: {images.shape[0]} images but labels of shape {tuple(labels.shape)}"
            )
        self.images = images
        self.labels = labels
        self.info = info
        self.augment = augment
        self.value_range = value_range
        self.seed = seed

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index].float() / self.value_range
        if self.augment is not None:
            g = self.generator_for(index)
            x = random_crop(x, self.augment.crop_padding, g)
            if self.augment.hflip:
                x = random_hflip(x, g)
        x = normalize(x, self.info.mean, self.info.std)
        if self.augment is not None and self.augment.erase:
            x = random_erase(x, g)
        return x, int(self.labels[index])
