"""A validation split held out of the training data, for data sets that ship none.

Fashion-MNIST, CIFAR-10 and scikit-learn's digits come as train and test only. Settings
must be chosen on data the reported number is not measured on, so their ``"val"`` split
exists only when the caller holds ``holdout`` training samples out: ``"val"`` is then
those samples and ``"train"`` the rest, and ``"test"`` is untouched. The held-out samples
are fixed by :data:`HOLDOUT_SEED`, not by the run's seed, so every run with the same
``holdout`` validates on the same samples and never trains on them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

HOLDOUT_SEED = 20_261_130


def check_holdout(name: str, holdout: int) -> None:
    """ValueError naming data set ``name`` unless ``holdout`` is an integer count >= 0."""
    if isinstance(holdout, (bool, np.bool_)) or not isinstance(holdout, (int, np.integer)):
        raise ValueError(f"data set {name!r}: holdout must be an integer count, got {holdout!r}")
    if holdout < 0:
        raise ValueError(f"data set {name!r}: holdout={holdout} must be >= 0")


def holdout_indices(name: str, split: str, n_train: int, holdout: int) -> np.ndarray | None:
    """Indices into the ``n_train`` training samples that form ``split``, or None for
    "all of them" (``"train"`` with ``holdout=0``) and for ``"test"`` (not drawn from the
    training data; ``n_train`` is not read then).

    Returns a sorted int64 array: the ``holdout`` samples of a fixed random permutation
    (:data:`HOLDOUT_SEED`) for ``"val"``, the other ``n_train - holdout`` for ``"train"``.

    Raises:
        ValueError: ``"val"`` with ``holdout=0`` (the data set has no validation split of
            its own), or ``holdout`` not an integer in ``[0, n_train)``; the message names
            the data set.
    """
    check_holdout(name, holdout)
    if split not in ("train", "val", "test"):
        raise ValueError(f"data set {name!r}: unknown split {split!r}; use 'train', 'val' or 'test'")
    if split == "test":  # n_train is then the test split's size: nothing to check it against
        return None
    if holdout >= n_train:
        raise ValueError(f"data set {name!r}: holdout={holdout} must be below its {n_train} training samples")
    if split == "val" and holdout == 0:
        raise ValueError(
            f"data set {name!r} has no validation split of its own: pass holdout=N "
            "(e.g. --data-kw holdout=5000) to hold N training samples out as 'val'"
        )
    if split == "train" and holdout == 0:
        return None
    order = np.random.default_rng(HOLDOUT_SEED).permutation(n_train)
    chosen = order[:holdout] if split == "val" else order[holdout:]
    return np.sort(chosen).astype(np.int64)


def check_validation_unseen(
    checkpoint: str | os.PathLike | None,
    dataset: str,
    dataset_kwargs: Mapping[str, Any],
    eval_split: str,
) -> None:
    """Refuse to validate weights on samples they were trained on.

    A run that evaluates on ``"val"`` from the weights in ``checkpoint`` reads the
    ``config.json`` that ``maddnet train`` / ``maddnet retrain`` wrote beside them; when those
    weights were trained on the same data set with another ``holdout`` (e.g. on all 60,000
    Fashion-MNIST images, ``holdout`` 0), the validation samples were in their training data
    and every validation number would be biased. Nothing is checked for other splits, for
    weights without a ``config.json`` beside them, or for another data set.

    Raises:
        ValueError: naming the checkpoint, both ``holdout`` values and the fix.
    """
    if eval_split != "val" or checkpoint is None:
        return
    sidecar = Path(checkpoint).parent / "config.json"
    try:
        trained = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(trained, dict) or trained.get("dataset") != dataset:
        return
    theirs = (trained.get("dataset_kwargs") or {}).get("holdout", 0)
    ours = dataset_kwargs.get("holdout", 0)
    if theirs != ours:
        raise ValueError(
            f"{checkpoint} was trained on data set {dataset!r} with holdout={theirs} ({sidecar}), "
            f"this run validates on holdout={ours}: its validation samples were in those weights' "
            f"training data. Train the weights with --data-kw holdout={ours}, or evaluate on "
            "another split"
        )
