"""Loading weights from a local file into a model."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model state dict stored in ``path``.

    Accepts a bare state dict (torchvision/timm), a maddnet checkpoint (key ``"model"``),
    or the common ``{"state_dict": ...}`` wrapping; strips a DDP ``module.`` prefix.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    data = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(data, dict) and key in data and isinstance(data[key], dict):
            data = data[key]
            break
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in data.items()}


def load_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> list[str]:
    """Load the state dict from ``path`` into ``model``; returns the names not loaded.

    ``strict=True`` raises on any missing, unexpected or mis-shaped tensor.
    ``strict=False`` loads what fits and warns about the rest (fine-tuning a new head).
    """
    state = read_state_dict(path)
    own = model.state_dict()
    mis_shaped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if strict:
        if mis_shaped:
            details = ", ".join(f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mis_shaped)
            raise ValueError(f"{path}: tensors of the wrong shape: {details}")
        model.load_state_dict(state, strict=True)
        return []
    fitting = {k: v for k, v in state.items() if k not in mis_shaped}
    result = model.load_state_dict(fitting, strict=False)
    skipped = sorted(set(mis_shaped) | set(result.missing_keys) | set(result.unexpected_keys))
    if skipped:
        warnings.warn(f"{path}: not loaded: {', '.join(skipped)}", stacklevel=2)
    return skipped
