"""One registry for every data set: ``create_dataset(name, split, root, ...)``.

Each builder returns a torch ``Dataset`` of ``(input, label)`` pairs with an ``info``
attribute (:class:`DatasetInfo`: classes, input shape, normalisation).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from torch.utils.data import Dataset

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a data set.

    ``input_shape`` is (channels, height, width) of one input after the transforms; for
    audio features height = frames and width = coefficients.
    """

    name: str
    classes: tuple[str, ...]
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        return self.input_shape[0]

    @property
    def image_size(self) -> int:
        return self.input_shape[1]


DatasetBuilder = Callable[..., Dataset]
_DATASETS: dict[str, DatasetBuilder] = {}


def register_dataset(name: str) -> Callable[[DatasetBuilder], DatasetBuilder]:
    """Decorator filing ``builder(split, root=None, augment=False, **kwargs)`` under ``name``."""

    def decorate(builder: DatasetBuilder) -> DatasetBuilder:
        if name in _DATASETS:
            raise ValueError(f"data set {name!r} is registered twice")
        _DATASETS[name] = builder
        return builder

    return decorate


def list_datasets() -> list[str]:
    _import_builders()
    return sorted(_DATASETS)


def create_dataset(
    name: str, split: str = "train", root: str | os.PathLike | None = None, augment: bool = False, **kwargs
) -> Dataset:
    """Data set ``name``, split ``"train"``, ``"val"`` or ``"test"`` (where it has one).

    ``augment`` switches on the training augmentation of that data set; random choices
    are seeded per (seed, epoch, index), see :class:`maddnet.data.transforms.SeededSampleMixin`.
    """
    _import_builders()
    if name not in _DATASETS:
        raise KeyError(f"unknown data set {name!r}; known data sets: {', '.join(sorted(_DATASETS))}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    return _DATASETS[name](split=split, root=root, augment=augment, **kwargs)


def _import_builders() -> None:
    from maddnet.data import (  # noqa: F401
        cifar10,
        digits,
        fashion_mnist_dataset,
        imagenet,
        speech_commands,
        synthetic,
    )
