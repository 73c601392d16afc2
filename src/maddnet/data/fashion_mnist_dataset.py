"""Fashion-MNIST as a registered data set (the IDX reading is in ``fashion_mnist``)."""

from __future__ import annotations

import os

from maddnet.data import fashion_mnist
from maddnet.data.holdout import holdout_indices
from maddnet.data.registry import DatasetInfo, register_dataset
from maddnet.data.tensor_images import SmallImageAugment, TensorImageDataset

INFO = DatasetInfo(
    name="fashion_mnist",
    classes=fashion_mnist.CLASSES,
    input_shape=(1, 28, 28),
    mean=(0.2860,),
    std=(0.3530,),
)


@register_dataset("fashion_mnist")
def fashion_mnist_dataset(
    split: str = "train",
    root: str | os.PathLike | None = None,
    augment: bool = False,
    subset: int | None = None,
    seed: int = 0,
    erase: bool = False,
    download: bool = False,
    holdout: int = 0,
) -> TensorImageDataset:
    """60 000 train / 10 000 test 28×28 grey images. The data set has no validation split:
    ``holdout=n`` holds n training images out as ``val`` (:mod:`maddnet.data.holdout`);
    ``val`` without it is an error. ``subset`` keeps the first n samples of the split.
    ``download=True`` fetches the files into ``root`` when they are not found."""
    if download and root is not None and not fashion_mnist.is_available(root):
        fashion_mnist.download(root)
    images, labels = fashion_mnist.load_arrays("test" if split == "test" else "train", root)
    chosen = holdout_indices("fashion_mnist", split, len(labels), holdout)
    if chosen is not None:
        images, labels = images[chosen], labels[chosen]
    if subset is not None:
        images, labels = images[:subset], labels[:subset]
    # pad-and-crop and mirror are the usual Fashion-MNIST augmentation (clothes are symmetric)
    aug = SmallImageAugment(crop_padding=2, hflip=True, erase=erase) if augment else None
    return TensorImageDataset(images, labels, INFO, augment=aug, seed=seed)
