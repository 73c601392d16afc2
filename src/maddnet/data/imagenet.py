"""ImageNet (or any image-classification set) from class folders: ``root/<split>/<class>/*.jpg``.

The standard ILSVRC-2012 layout after the usual preparation is ``root/train/n01440764/…``
and ``root/val/n01440764/…``; ``test`` reads ``root/val`` when there is no ``root/test``
(the usual ImageNet practice of reporting on the official validation images); ``val`` is
then an error, since it would be the test split. To choose settings on images the reported
number is not measured on, ``holdout=n`` makes ``val`` n images held out of ``root/train``
(:mod:`maddnet.data.holdout`) and ``train`` the rest.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.transforms import v2

from maddnet.data.holdout import check_holdout, holdout_indices
from maddnet.data.registry import DatasetInfo, register_dataset
from maddnet.data.transforms import SeededSampleMixin, sample_seed, seeded_global_rng

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
ENV_VAR = "MADDNET_IMAGENET"


def split_folder(root: str | os.PathLike | None, split: str) -> Path:
    base = root if root is not None else os.environ.get(ENV_VAR)
    if base is None:
        raise FileNotFoundError(f"ImageNet needs a root folder (argument root or ${ENV_VAR})")
    candidates = [Path(base) / split] + ([Path(base) / "val"] if split == "test" else [])
    for folder in candidates:
        if folder.is_dir():
            return folder
    raise FileNotFoundError(f"no ImageNet split folder: tried {', '.join(map(str, candidates))}")


def build_transform(image_size: int, augment: bool) -> v2.Compose:
    """Standard ImageNet transforms: random-resized crop + flip for training, resize to
    image_size/0.875 and centre crop for evaluation."""
    head = (
        [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]
        if augment
        else [v2.Resize(int(round(image_size / 0.875)), antialias=True), v2.CenterCrop(image_size)]
    )
    return v2.Compose([v2.ToImage(), *head, v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


class ImageFolderDataset(SeededSampleMixin, Dataset):
    """torchvision ``ImageFolder`` with transforms seeded per (seed, epoch, index). Setting
    ``indices`` (an int array) keeps only those images of the folder, in that order."""

    def __init__(self, folder: Path, image_size: int, augment: bool, seed: int = 0):
        self.folder = datasets.ImageFolder(str(folder))
        self.indices: np.ndarray | None = None
        self.transform = build_transform(image_size, augment)
        self.seed = seed
        self.info = DatasetInfo(
            name="imagenet",
            classes=tuple(self.folder.classes),
            input_shape=(3, image_size, image_size),
            mean=MEAN,
            std=STD,
        )

    def __len__(self) -> int:
        return len(self.folder) if self.indices is None else len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.folder[index if self.indices is None else int(self.indices[index])]
        with seeded_global_rng(sample_seed(self.seed, self.epoch, index)):
            return self.transform(image), label


@register_dataset("imagenet")
def imagenet_dataset(
    split: str = "train",
    root: str | os.PathLike | None = None,
    augment: bool = False,
    image_size: int = 224,
    seed: int = 0,
    holdout: int = 0,
) -> ImageFolderDataset:
    check_holdout("imagenet", holdout)
    if holdout == 0 and split != "train":
        folder = split_folder(root, split)
        if split == "val" and split_folder(root, "test") == folder:
            raise ValueError(
                f"data set 'imagenet' has no test folder beside {folder}, so 'test' reads it too: "
                "pass holdout=N (e.g. --data-kw holdout=50000) to hold N training images out as 'val'"
            )
        return ImageFolderDataset(folder, image_size, augment, seed=seed)
    folder = split_folder(root, "train" if split == "val" else split)
    dataset = ImageFolderDataset(folder, image_size, augment, seed=seed)
    dataset.indices = holdout_indices("imagenet", split, len(dataset.folder), holdout)
    return dataset
