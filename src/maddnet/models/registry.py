"""One registry for every model: ``create_model(name, num_classes, in_chans, **kwargs)``.

Modelled on timm: builders register themselves with :func:`register_model`; the
registry maps a name to a function ``builder(num_classes, in_chans, **kwargs) -> nn.Module``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from torch import nn

from maddnet.data.registry import build_with
from maddnet.models.weights import load_weights

ModelBuilder = Callable[..., nn.Module]
_MODELS: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator that files ``builder`` under ``name`` (names must be unique)."""

    def decorate(builder: ModelBuilder) -> ModelBuilder:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = builder
        return builder

    return decorate


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    _import_builders()
    return sorted(_MODELS)


def create_model(
    name: str,
    num_classes: int = 10,
    in_chans: int = 3,
    checkpoint: str | os.PathLike | None = None,
    strict: bool = True,
    **kwargs,
) -> nn.Module:
    """Build model ``name``; optionally load weights from a local ``checkpoint`` file.

    ``checkpoint`` may hold a plain state dict (torchvision/timm files load as they are)
    or a maddnet training checkpoint (``{"model": state_dict, ...}``); a ``maddnet retrain``
    run's ``checkpoint.pt`` gives its dense model (``"dense_state"``). A file that holds a
    converted (MADD) model only, or is not a readable checkpoint, raises ``ValueError``.
    With ``strict=False`` tensors whose shape does not fit (e.g. a 1000-class head into a
    10-class model) are skipped and reported instead of raising.
    """
    builder = model_builder(name)
    model = build_with(builder, f"model {name!r}", kwargs, num_classes=num_classes, in_chans=in_chans)
    if checkpoint is not None:
        load_weights(model, checkpoint, strict=strict)
    return model


def model_builder(name: str) -> ModelBuilder:
    """The builder registered as ``name``; KeyError naming the known models if unknown."""
    _import_builders()
    if name not in _MODELS:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(sorted(_MODELS))}")
    return _MODELS[name]


def _import_builders() -> None:
    # importing the modules runs their @register_model decorators
    from maddnet.models import ds_cnn, levit, resnet, resnet9  # noqa: F401
