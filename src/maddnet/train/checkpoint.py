"""Checkpoints written atomically, and the RNG state that makes resumed runs repeat exactly."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maddnet._atomic import atomic_torch_save
from maddnet.models.weights import read_checkpoint


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` with ``torch.save`` to ``path`` atomically
    (:func:`maddnet._atomic.atomic_torch_save`): a kill at any moment leaves either the old
    or the new checkpoint, never a truncated one; a full disk raises :class:`OSError`
    naming ``path``, the previous checkpoint unchanged.
    """
    return atomic_torch_save(state, path, "checkpoint")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (or any ``torch.save`` dict).

    A missing ``path`` raises :class:`FileNotFoundError`, a truncated or corrupt file (or
    one that does not hold a dict) :class:`ValueError`; both name the file."""
    path = Path(path)
    data = read_checkpoint(path, map_location=map_location)
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a checkpoint dict")
    return data


def capture_rng_state() -> dict[str, Any]:
    """RNG states of Python, numpy, torch CPU and (if present) all CUDA devices."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002 (code we call may use it)
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))  # noqa: NPY002
    torch.manual_seed(seed)
