"""The configuration of a training run, and the standard recipe per model/data pair."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar


class JsonConfig:
    """JSON round trip for config dataclasses, and the comparison a resume makes.

    ``EXECUTION_KEYS`` name the fields that only say how a run executes (device, threads,
    output folder...): a resumed run may change them, but no other field.
    """

    EXECUTION_KEYS: ClassVar[frozenset[str]] = frozenset()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    @classmethod
    def load(cls, path: str | os.PathLike):
        return cls.from_dict(json.loads(Path(path).read_text()))

    def differences(self, other: JsonConfig) -> dict[str, tuple[Any, Any]]:
        """Fields (other than EXECUTION_KEYS) where ``self`` and ``other`` differ, with both values."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {
            k: (mine[k], theirs[k]) for k in mine if k not in self.EXECUTION_KEYS and mine[k] != theirs[k]
        }


@dataclass
class TrainConfig(JsonConfig):
    """Everything that determines a run; saved as ``config.json`` next to its results.

    Epoch-based quantities (warmup) are converted to optimiser steps by the runner.
    ``max_steps`` stops this invocation early (the run can be continued later); it does
    not change the schedule.
    """

    model: str
    dataset: str
    out_dir: str = "runs/default"
    data_root: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)
    init_checkpoint: str | None = None
    epochs: float = 10
    batch_size: int = 128
    eval_batch_size: int = 512
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.0
    grad_clip: float | None = None
    augment: bool = True
    eval_split: str = "test"
    seed: int = 0
    # how the run executes, not what it computes: may differ between a run and its resume
    device: str = "auto"
    num_workers: int = 0
    threads: int | None = None
    checkpoint_every: int = 200
    log_every: int = 50
    max_steps: int | None = None
    progress: bool = True

    # keys that only say how a run executes; a resume may change them
    EXECUTION_KEYS: ClassVar[frozenset[str]] = frozenset(
        {
            "device",
            "num_workers",
            "threads",
            "checkpoint_every",
            "log_every",
            "max_steps",
            "progress",
            "out_dir",
            "data_root",
        }
    )


EXECUTION_KEYS = TrainConfig.EXECUTION_KEYS


def config_differences(a: TrainConfig, b: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """The keys (other than EXECUTION_KEYS) where two configs differ, with both values."""
    return a.differences(b)


# Standard recipes: (model name prefix, data set) → settings. The first match wins;
# "*" matches any data set. Numbers come from the usual public recipes, scaled to the
# data set size; the Fashion-MNIST ones are measured in experiments/ (see README there).
RECIPES: list[tuple[str, str, dict[str, Any]]] = [
    (
        "resnet9",
        "fashion_mnist",
        dict(
            model_kwargs={"width": 16},
            epochs=8,
            batch_size=256,
            optimizer="sgd",
            lr=0.2,
            weight_decay=5e-4,
            label_smoothing=0.1,
            warmup_epochs=1,
        ),
    ),
    (
        "resnet9",
        "cifar10",
        dict(
            model_kwargs={"width": 64},
            epochs=24,
            batch_size=512,
            optimizer="sgd",
            lr=0.4,
            weight_decay=5e-4,
            label_smoothing=0.2,
            warmup_epochs=5,
            dataset_kwargs={"erase": True},
        ),
    ),
    (
        "resnet",
        "imagenet",
        dict(
            epochs=90,
            batch_size=256,
            optimizer="sgd",
            lr=0.1,
            weight_decay=1e-4,
            label_smoothing=0.1,
            warmup_epochs=5,
            num_workers=8,
        ),
    ),
    (
        "levit",
        "imagenet",
        dict(
            epochs=300,
            batch_size=256,
            optimizer="adamw",
            lr=2.5e-4,
            weight_decay=0.025,
            label_smoothing=0.1,
            warmup_epochs=5,
            grad_clip=5.0,
            num_workers=8,
        ),
    ),
    (
        "levit",
        "*",
        dict(
            epochs=15,
            batch_size=128,
            optimizer="adamw",
            lr=1e-3,
            weight_decay=0.05,
            label_smoothing=0.1,
            warmup_epochs=1,
            grad_clip=5.0,
        ),
    ),
    (
        "ds_cnn",
        "*",
        dict(
            epochs=30,
            batch_size=100,
            optimizer="adamw",
            lr=3e-3,
            weight_decay=1e-4,
            label_smoothing=0.1,
            warmup_epochs=1,
        ),
    ),
    (
        "resnet",
        "*",
        dict(
            epochs=15,
            batch_size=128,
            optimizer="sgd",
            lr=0.1,
            weight_decay=5e-4,
            label_smoothing=0.1,
            warmup_epochs=1,
        ),
    ),
]


def recipe_for(model: str, dataset: str) -> dict[str, Any]:
    """The recipe settings for a model/data pair ({} when none matches)."""
    for prefix, data_name, settings in RECIPES:
        if model.startswith(prefix) and data_name in (dataset, "*"):
            return json.loads(json.dumps(settings))  # deep copy
    return {}


def make_config(model: str, dataset: str, **overrides: Any) -> TrainConfig:
    """TrainConfig defaults < recipe for (model, dataset) < ``overrides``.
    ``model_kwargs``/``dataset_kwargs`` are merged key by key."""
    values: dict[str, Any] = {"model": model, "dataset": dataset}
    for layer in (recipe_for(model, dataset), overrides):
        for key, value in layer.items():
            if key in ("model_kwargs", "dataset_kwargs"):
                values[key] = {**values.get(key, {}), **(value or {})}
            else:
                values[key] = value
    return TrainConfig.from_dict(values)
