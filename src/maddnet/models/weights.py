"""Reading checkpoint files, and loading weights from a local file into a model."""

from __future__ import annotations

import os
import pickle
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

# what torch.load raises on a file that is not (or no longer) a whole torch.save file
_CORRUPT_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    RuntimeError,
    ValueError,
    OSError,
    struct.error,
    zipfile.BadZipFile,
    IndexError,
)
# keys only MADD layers have in their state dicts
_MADD_KEY_ENDINGS = (".lut", ".encoder.thresholds")


def read_checkpoint(
    path: str | os.PathLike,
    map_location: str | torch.device | None = "cpu",
    weights_only: bool = False,
) -> Any:
    """``torch.load`` of ``path`` with errors that name the file.

    A missing path raises :class:`FileNotFoundError`; a file that is not a readable
    ``torch.save`` file (text, empty, truncated, corrupt) raises :class:`ValueError`
    ``"<path> is not a readable checkpoint (truncated or not a torch.save file): <cause>"``.
    With ``weights_only=True`` a whole file holding objects safe loading refuses raises
    a :class:`ValueError` saying so.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise ValueError(f"checkpoint {path} is not a file")
    if path.stat().st_size == 0:
        raise ValueError(
            f"{path} is not a readable checkpoint (truncated or not a torch.save file): empty file"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except _CORRUPT_ERRORS as error:
        if isinstance(error, (PermissionError, IsADirectoryError)):
            raise
        if isinstance(error, RuntimeError) and "deserialize object on" in str(error):
            raise  # a device problem (map_location), not a broken file
        cause = _short_cause(error)
        if isinstance(error, pickle.UnpicklingError) and cause.startswith("Unsupported global"):
            raise ValueError(
                f"{path} holds objects that safe (weights_only) loading refuses: {cause}"
            ) from error
        raise ValueError(
            f"{path} is not a readable checkpoint (truncated or not a torch.save file): {cause}"
        ) from error


def _short_cause(error: BaseException) -> str:
    # weights_only loading wraps the unpickler's own error in a long advice text
    inner = error.__context__
    if isinstance(error, pickle.UnpicklingError) and isinstance(inner, pickle.UnpicklingError):
        error = inner
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if isinstance(error, EOFError) and not text:
        text = "unexpected end of file"
    text = text.split(". ")[0].rstrip(".") or type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def is_converted(data: Any) -> bool:
    """Whether ``data`` (a loaded checkpoint) holds a converted model: a ``"plan"`` and the
    converted ``"state_dict"`` (``save_converted`` files, ``maddnet retrain`` checkpoints)."""
    return (
        isinstance(data, dict)
        and isinstance(data.get("plan"), dict)
        and isinstance(data.get("state_dict"), dict)
    )


def dense_state_dict(data: Any, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The dense model state dict in ``data``, the contents of checkpoint file ``path``.

    Accepts a bare state dict (torchvision/timm), a maddnet checkpoint (key ``"model"``),
    the common ``{"state_dict": ...}`` wrapping and a ``maddnet retrain`` checkpoint (its
    ``"dense_state"``: the dense model of step 0); strips a DDP ``module.`` prefix.
    A converted (MADD) model without its dense state raises :class:`ValueError`.
    """
    if is_converted(data) and isinstance(data.get("dense_state"), dict):
        data = data["dense_state"]
    else:
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(data, dict) and key in data and isinstance(data[key], dict):
                data = data[key]
                break
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a state dict")
    madd = [k for k in data if isinstance(k, str) and k.endswith(_MADD_KEY_ENDINGS)]
    if madd:
        raise ValueError(
            f"{path} holds a converted (MADD) model, not dense weights; give the dense model's "
            "weights here (a maddnet retrain run's checkpoint.pt gives its dense model), or load "
            "a converted model with maddnet.nn.load_converted / maddnet eval"
        )
    return {k.removeprefix("module."): v for k, v in data.items()}


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The dense model state dict stored in ``path`` (see :func:`dense_state_dict`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} does not exist")
    return dense_state_dict(read_checkpoint(path), path)


def load_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> list[str]:
    """Load the state dict from ``path`` into ``model``; returns the names not loaded.

    ``strict=True`` raises on any missing, unexpected or mis-shaped tensor.
    ``strict=False`` loads what fits and warns about the rest (fine-tuning a new head).
    """
    return load_state(model, read_state_dict(path), path, strict=strict)


def load_state(
    model: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike, strict: bool = True
) -> list[str]:
    """:func:`load_weights` for a state dict already read from ``path`` (named in errors)."""
    own = model.state_dict()
    mis_shaped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if strict:
        if mis_shaped:
            details = ", ".join(f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mis_shaped)
            raise ValueError(f"{path}: tensors of the wrong shape: {details}")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            missing = [k for k in own if k not in state]
            unexpected = [k for k in state if k not in own]
            pairs = (("missing", missing), ("unexpected", unexpected))
            parts = [f"{label} {_names(keys)}" for label, keys in pairs if keys]
            details = "; ".join(parts) or str(error).strip().splitlines()[-1].strip()
            raise ValueError(f"{path} does not fit the model: {details}") from error
        return []
    fitting = {k: v for k, v in state.items() if k not in mis_shaped}
    result = model.load_state_dict(fitting, strict=False)
    skipped = sorted(set(mis_shaped) | set(result.missing_keys) | set(result.unexpected_keys))
    if skipped:
        warnings.warn(f"{path}: not loaded: {', '.join(skipped)}", stacklevel=2)
    return skipped


def _names(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown
