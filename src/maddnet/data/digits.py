"""scikit-learn's 8×8 handwritten digits (1797 images, shipped with scikit-learn)."""

from __future__ import annotations

import os

import numpy as np

from maddnet.data.holdout import holdout_indices
from maddnet.data.registry import DatasetInfo, register_dataset
from maddnet.data.tensor_images import SmallImageAugment, TensorImageDataset

INFO = DatasetInfo(
    name="digits",
    classes=tuple(str(d) for d in range(10)),
    input_shape=(1, 8, 8),
    mean=(0.305,),
    std=(0.375,),
)
TEST_FRACTION = 0.2


@register_dataset("digits")
def digits_dataset(
    split: str = "train",
    root: str | os.PathLike | None = None,
    augment: bool = False,
    seed: int = 0,
    holdout: int = 0,
) -> TensorImageDataset:
    """A fixed random 80/20 train/test split (1,438 / 359); pixel values 0..16. ``holdout=n``
    holds n training images out as ``val`` (:mod:`maddnet.data.holdout`); ``val`` without
    it is an error."""
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(1234).permutation(len(data.target))
    n_test = int(round(TEST_FRACTION * len(order)))
    chosen = order[:n_test] if split == "test" else order[n_test:]
    kept = holdout_indices("digits", split, len(chosen), holdout)
    if kept is not None:
        chosen = chosen[kept]
    images = data.images[chosen].astype(np.float32)
    aug = SmallImageAugment(crop_padding=1, hflip=False) if augment else None
    return TensorImageDataset(images, data.target[chosen], INFO, augment=aug, value_range=16.0, seed=seed)
