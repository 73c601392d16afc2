"""One registry for every data set: ``create_dataset(name, split, root, ...)``.

Each builder returns a torch ``Dataset`` of ``(input, label)`` pairs with an ``info``
attribute (:class:`DatasetInfo`: classes, input shape, normalisation).
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

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
    builder = dataset_builder(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    return build_with(builder, f"data set {name!r}", kwargs, split=split, root=root, augment=augment)


def builder_arguments(builder: Callable[..., Any]) -> tuple[list[str], bool]:
    """(names of the keyword arguments ``builder`` takes, whether it also takes ``**kwargs``)."""
    try:
        parameters = list(inspect.signature(builder).parameters.values())
    except (TypeError, ValueError):  # no signature to read
        return [], True
    named = [
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    return named, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def build_with(builder: Callable[..., Any], what: str, kwargs: Mapping[str, Any], **fixed: Any) -> Any:
    """``builder(**fixed, **kwargs)``, the user's ``kwargs`` checked against its signature.

    A keyword it does not take, or a TypeError / RuntimeError while building (a bad value
    such as a negative width), becomes a ValueError naming ``what``, the keyword arguments
    and the accepted ones; the original error is kept as ``__cause__``.
    """
    named, var_keyword = builder_arguments(builder)
    named = [name for name in named if name not in fixed]
    accepted = ", ".join(named + (["**kwargs"] if var_keyword else []))
    unknown = [] if var_keyword else sorted(set(kwargs) - set(named))
    if unknown:
        raise ValueError(
            f"{what} takes no argument {', '.join(map(repr, unknown))}; its arguments: {accepted}"
        )
    try:
        return builder(**fixed, **kwargs)
    except (TypeError, RuntimeError) as error:
        bad = re.search(r"unexpected keyword argument '(\w+)'", str(error))
        if bad:
            raise ValueError(
                f"{what} takes no argument {bad.group(1)!r} ({error}); its arguments: {accepted}"
            ) from error
        raise ValueError(f"{what} cannot be built with {dict(kwargs)}: {error}") from error


def dataset_builder(name: str) -> DatasetBuilder:
    """The builder registered as ``name``; KeyError naming the known data sets if unknown."""
    _import_builders()
    if name not in _DATASETS:
        raise KeyError(f"unknown data set {name!r}; known data sets: {', '.join(sorted(_DATASETS))}")
    return _DATASETS[name]


def _import_builders() -> None:
    from maddnet.data import (  # noqa: F401
        cifar10,
        digits,
        fashion_mnist_dataset,
        imagenet,
        speech_commands,
        synthetic,
    )
