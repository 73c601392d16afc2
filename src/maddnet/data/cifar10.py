"""CIFAR-10 from its standard python-pickle folder (``cifar-10-batches-py``)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

from maddnet.data.holdout import holdout_indices
from maddnet.data.registry import DatasetInfo, register_dataset
from maddnet.data.tensor_images import SmallImageAugment, TensorImageDataset

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
INFO = DatasetInfo(
    name="cifar10",
    classes=CLASSES,
    input_shape=(3, 32, 32),
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
)
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
ENV_VAR = "MADDNET_CIFAR10"


def find_root(root: str | os.PathLike | None) -> Path:
    """The folder holding ``data_batch_1`` … ``test_batch`` (or its parent)."""
    tried = []
    for candidate in (root, os.environ.get(ENV_VAR)):
        if candidate is None:
            continue
        for path in (Path(candidate), Path(candidate) / "cifar-10-batches-py"):
            tried.append(str(path))
            if all((path / name).is_file() for name in TRAIN_FILES + TEST_FILES):
                return path
    raise FileNotFoundError(
        "CIFAR-10 python batches not found (looked in: "
        + (", ".join(tried) or "nothing")
        + f"). Pass the cifar-10-batches-py folder as root or set ${ENV_VAR}."
    )


def load_arrays(split: str, root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 of ``split`` "train" or "test"."""
    if split not in ("train", "test"):
        raise ValueError(f"CIFAR-10 files hold 'train' and 'test', not {split!r}")
    folder = find_root(root)
    images, labels = [], []
    for name in TRAIN_FILES if split == "train" else TEST_FILES:
        with open(folder / name, "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        data = batch.get(b"data", batch.get("data"))
        targets = batch.get(b"labels", batch.get("labels"))
        images.append(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(targets, dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


@register_dataset("cifar10")
def cifar10_dataset(
    split: str = "train",
    root: str | os.PathLike | None = None,
    augment: bool = False,
    seed: int = 0,
    erase: bool = False,
    holdout: int = 0,
) -> TensorImageDataset:
    """50 000 train / 10 000 test images. ``holdout=n`` holds n training images out as
    ``val`` (:mod:`maddnet.data.holdout`); ``val`` without it is an error."""
    images, labels = load_arrays("test" if split == "test" else "train", root)
    chosen = holdout_indices("cifar10", split, len(labels), holdout)
    if chosen is not None:
        images, labels = images[chosen], labels[chosen]
    aug = SmallImageAugment(crop_padding=4, hflip=True, erase=erase) if augment else None
    return TensorImageDataset(images, labels, INFO, augment=aug, seed=seed)
