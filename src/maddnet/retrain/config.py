"""Settings of a layer-by-layer retraining run (saved as ``config.json`` beside its results)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..data.registry import SPLITS
from ..nn import MaddConfig
from ..nn.budget import Allocation, CodebookBudget
from ..nn.spec import DEFAULT_TEMPERATURE, LayerSpec
from ..train.config import JsonConfig
from ..train.distributed import pick_device

# the run folder's checkpoint (written by the pipeline); a folder holding one is a started run
CHECKPOINT = "checkpoint.pt"


@dataclass
class RetrainConfig(JsonConfig):
    """What a retraining run does. Learning rates of 0 freeze a parameter group.

    Attributes:
        model, model_kwargs: registry name and builder arguments (``maddnet.models``).
        dataset, data_root, dataset_kwargs: registry name, folder and arguments
            (``maddnet.data``).
        checkpoint: weights of the trained dense model (a maddnet training checkpoint or
            a plain state dict). Without one, ``baseline_steps`` train it from scratch.
        baseline_steps: optimiser steps to train the dense model when no checkpoint is
            given (step 0 of the run).
        layers: layer names (or fnmatch patterns) to replace, in forward order; ``None``:
            every nn.Linear and nn.Conv2d (groups=1), the first conv and the classifier
            included.
        exclude: name patterns kept dense.
        ncodebooks: C per layer name (others follow the MaddConfig rule), or one int.
        codebook_width: target D/C of linear and 1x1 layers (see :class:`maddnet.nn.MaddConfig`).
        codebook_budget: C per layer chosen from a single-layer analysis under a network
            budget (:class:`maddnet.nn.budget.CodebookBudget`, or a mapping of its fields);
            excludes ``ncodebooks``. Recomputed from the saved settings on resume.
        spec: the MADD layer settings (K, encoder, ridge, LUT bits, QAT, surrogate, ...), a
            :class:`maddnet.nn.spec.LayerSpec` passed whole to every layer; saved as the
            ``spec`` section of config.json (a mapping of its fields is accepted too).
        calib_batches: training batches whose activations a layer is learned from.
        max_rows: rows kept per layer while recording.
        steps_per_layer: fine-tuning steps after each replacement.
        final_steps: fine-tuning steps of everything still trainable at the end.
        checkpoint_every: the final fine-tune (the dense control's whole budget) saves its
            progress every this many optimiser steps (``final_progress.pt``: weights,
            optimiser, schedule, RNG), and a rerun continues from there; 0: only whole steps
            are checkpointed.
        optimizer: "adamw" or "sgd"; lr_dense (the dense layers that follow),
            lr_norm (BatchNorm/LayerNorm and other parameters outside conv/linear layers),
            lr_lut and lr_threshold (MADD layers); weight_decay applies to dense weights.
        train_replaced: replaced layers keep training their LUT/thresholds after their
            own step (else they are frozen once their step ends).
        distill: weight in [0, 1] of knowledge distillation from the dense model
            (loss = (1 - distill) CE + distill T^2 KL), at temperature distill_temperature.
        recon: weight of a per-layer output-reconstruction loss on the layer being
            replaced: ||madd(x) - dense(x)||^2 / ||dense(x)||^2 on its actual inputs.
        label_smoothing, batch_size, eval_batch_size, augment, seed: as in training.
        dense_control: replace nothing; fine-tune the dense model for the run's whole budget
            (``len(layers) * steps_per_layer + final_steps`` steps) with the same loss and
            optimiser, in one final step. Separates what the extra training does from what
            the replacement costs.
        fuse, prune_unread: after the final step, apply the inter-layer passes
            :func:`maddnet.nn.fuse` (fold BatchNorm/activations into MADD layers) and/or
            :func:`maddnet.nn.prune_unread` (producers compute only the channels MADD layers
            read) to the final model, evaluate it, and save it as ``passes.pt`` with a
            ``passes.json`` report (docs/passes.md); the resumable checkpoint is unchanged.
        eval_samples: evaluate the intermediate steps on the first N samples of the eval
            split only (the dense, last-replacement and final steps always use all of it).
        device, threads, progress, checkpoint_every: how the run executes (may change on
            resume); device
            ``"auto"`` becomes ``"cuda"`` when torch sees a GPU, else ``"cpu"``.
        dist_timeout: seconds a rank waits in a collective under torchrun before it
            raises (a dead or stuck rank then stops the job instead of hanging it).

    ``from_dict``/``load`` also read the flat config.json of runs made before the ``spec``
    section, so their folders still resume and compare.
    """

    model: str
    dataset: str
    out_dir: str = "runs/retrain"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data_root: str | None = None
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    baseline_steps: int = 0
    layers: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    ncodebooks: dict[str, int] | int | None = None
    codebook_width: int = 8
    codebook_budget: CodebookBudget | None = None
    spec: LayerSpec = field(default_factory=LayerSpec)
    calib_batches: int = 8
    max_rows: int = 16384
    steps_per_layer: int = 200
    final_steps: int = 500
    checkpoint_every: int = 200
    optimizer: str = "adamw"
    lr_dense: float = 1e-3
    lr_norm: float = 1e-3
    lr_lut: float = 1e-3
    lr_threshold: float = 1e-3
    weight_decay: float = 5e-4
    momentum: float = 0.9
    train_replaced: bool = True
    distill: float = 0.5
    distill_temperature: float = 4.0
    recon: float = 0.0
    dense_control: bool = False
    fuse: bool = False
    prune_unread: bool = False
    label_smoothing: float = 0.0
    batch_size: int = 128
    eval_batch_size: int = 512
    augment: bool = False
    eval_split: str = "test"
    eval_samples: int | None = None
    seed: int = 0
    # execution only: may differ between a run and its resume
    device: str = "cpu"
    threads: int | None = None
    progress: bool = True
    dist_timeout: float = 600.0

    EXECUTION_KEYS: ClassVar[frozenset[str]] = frozenset(
        {"out_dir", "data_root", "device", "threads", "progress", "dist_timeout", "checkpoint_every"}
    )

    def __post_init__(self) -> None:
        if isinstance(self.spec, Mapping):
            self.spec = LayerSpec.from_dict(self.spec)
        if not isinstance(self.spec, LayerSpec):
            raise ValueError(f"spec must be a LayerSpec or a mapping of its fields, got {self.spec!r}")
        if self.device == "auto":
            self.device = str(pick_device("auto"))
        self._check_numbers()
        if not 0.0 <= self.distill <= 1.0:
            raise ValueError(f"distill must lie in [0, 1], got {self.distill}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.eval_split not in SPLITS:
            raise ValueError(f"eval_split must be one of {SPLITS}, got {self.eval_split!r}")
        self._check_ncodebooks()
        if isinstance(self.codebook_budget, Mapping):
            self.codebook_budget = CodebookBudget.from_dict(self.codebook_budget)
        if self.codebook_budget is not None and self.ncodebooks is not None:
            raise ValueError("give ncodebooks or codebook_budget (--ncodebooks-from), not both")
        if self.checkpoint is None and self.baseline_steps == 0:
            self._check_names()  # a more specific problem is worth more than "no checkpoint"
            raise ValueError(
                "give the trained dense model as checkpoint=... (--checkpoint), or baseline_steps > 0 "
                "(--baseline-steps) to train it here"
            )

    def _check_numbers(self) -> None:
        """Counts are ints (positive, or >= 0 where 0 means none), rates are finite and >= 0."""
        for names, minimum in ((_POSITIVE_INTS, 1), (_NON_NEGATIVE_INTS, 0)):
            for name in names:
                value = getattr(self, name)
                if value is None and name in _OPTIONAL:
                    continue
                if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        for name in _NON_NEGATIVE_FLOATS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not self.distill_temperature > 0:
            raise ValueError(f"distill_temperature must be > 0, got {self.distill_temperature!r}")
        if isinstance(self.dist_timeout, bool) or not isinstance(self.dist_timeout, int | float):
            raise ValueError(f"dist_timeout must be a number of seconds, got {self.dist_timeout!r}")
        if not 0 < self.dist_timeout < math.inf:
            raise ValueError(f"dist_timeout must be > 0 seconds, got {self.dist_timeout!r}")

    def _check_ncodebooks(self) -> None:
        values = self.ncodebooks.values() if isinstance(self.ncodebooks, Mapping) else [self.ncodebooks]
        for value in values:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(
                    f"ncodebooks must be None, a positive int or {{layer: positive int}}, "
                    f"got {self.ncodebooks!r}"
                )

    def _check_names(self) -> None:
        """Model and data set names (and the arguments their builders take), the device,
        and the layer selection (--layers, --exclude, --ncodebooks names) on the model built
        with ``model_kwargs`` (its default classes and channels): raises for the first
        problem found. Building the model costs time, so only the error path calls this."""
        from ..cli_args import resolve_device
        from ..data.registry import builder_arguments, dataset_builder
        from ..models.registry import create_model, model_builder

        model_builder(self.model)
        named, var_keyword = builder_arguments(dataset_builder(self.dataset))
        named = [name for name in named if name not in ("split", "root", "augment")]
        unknown = [] if var_keyword else sorted(set(self.dataset_kwargs) - set(named))
        if unknown:
            raise ValueError(
                f"data set {self.dataset!r} takes no argument {', '.join(map(repr, unknown))}; "
                f"its arguments: {', '.join(named)}"
            )
        if self.device != "cpu":
            resolve_device(self.device)
        self.madd_config().select(create_model(self.model, **self.model_kwargs))

    def codebook_allocation(self) -> Allocation | None:
        """C per layer under ``codebook_budget`` (None without one), for the model built on
        the meta device with the data set's input shape.

        A run that has started keeps its plan: once its folder holds a checkpoint,
        ``out_dir/budget.json`` (written by the pipeline before the first layer is learned)
        is read instead of the analysis report, so a resumed run replaces its remaining
        layers at the C it planned even if the report has changed or moved since. Raises
        ``ValueError`` when that file was planned under another budget than this config's."""
        if self.codebook_budget is None:
            return None
        from ..hw.network import dataset_info, meta_model
        from ..nn.budget import allocate_for_model

        frozen = Path(self.out_dir) / "budget.json"
        if frozen.is_file() and (Path(self.out_dir) / CHECKPOINT).is_file():
            allocation = Allocation.from_dict(json.loads(frozen.read_text()))
            if allocation.budget.to_dict() != self.codebook_budget.to_dict():
                raise ValueError(
                    f"{frozen} was planned under the budget {allocation.budget.to_dict()}, this run's "
                    f"config asks for {self.codebook_budget.to_dict()}: use another --out, or the "
                    "run's own settings to resume it"
                )
            return allocation

        info = dataset_info(self.dataset, self.dataset_kwargs)
        model = meta_model(self.model, info, self.model_kwargs)
        return allocate_for_model(model, info.input_shape, self._madd_config(None), self.codebook_budget)

    def madd_config(self) -> MaddConfig:
        allocation = self.codebook_allocation()
        return self._madd_config(self.ncodebooks if allocation is None else allocation.ncodebooks)

    def _madd_config(self, ncodebooks: dict[str, int] | int | None) -> MaddConfig:
        return MaddConfig(
            layers=self.layers,
            exclude=list(self.exclude),
            ncodebooks=ncodebooks,
            codebook_width=self.codebook_width,
            spec=self.spec,
            max_rows=self.max_rows,
            seed=self.seed,
        )

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        values = super().to_dict()
        values["spec"] = self.spec.to_dict()
        if self.codebook_budget is not None:
            values["codebook_budget"] = self.codebook_budget.to_dict()
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RetrainConfig:
        """Inverse of :meth:`to_dict`; also reads the flat ``config.json`` of runs made before
        the ``spec`` section (see :func:`migrate_flat_spec`)."""
        return super().from_dict(migrate_flat_spec(values))

    @classmethod
    def from_saved(cls, values: Mapping[str, Any]) -> RetrainConfig:
        """The values of a run's saved ``config.json`` (any maddnet version): :meth:`from_dict`
        with the spec read by :meth:`LayerSpec.from_saved`, so a field added since means what
        the run used (the tree's input objective and no refinement for runs made before
        2026-12-01). A ``--config`` file is read by :meth:`from_dict` instead: a field it
        does not name takes today's default."""
        values = migrate_flat_spec(values)
        values["spec"] = LayerSpec.from_saved(values.get("spec") or {})
        return cls.from_dict(values)

    @classmethod
    def load(cls, path: str | os.PathLike) -> RetrainConfig:
        """A run's saved ``config.json`` (:meth:`from_saved`)."""
        return cls.from_saved(json.loads(Path(path).read_text()))

    def differences(self, other: JsonConfig) -> dict[str, tuple[Any, Any]]:
        """As :meth:`JsonConfig.differences`, with the spec compared field by field
        (keys ``spec.<field>``)."""
        mine, theirs = _flat_spec(self.to_dict()), _flat_spec(other.to_dict())
        return {
            key: (mine.get(key), theirs.get(key))
            for key in sorted(set(mine) | set(theirs))
            if key not in self.EXECUTION_KEYS and mine.get(key) != theirs.get(key)
        }


# counts checked by RetrainConfig._check_numbers (None allowed for those in _OPTIONAL)
_POSITIVE_INTS = (
    "codebook_width",
    "calib_batches",
    "max_rows",
    "batch_size",
    "eval_batch_size",
    "eval_samples",
    "threads",
)
_NON_NEGATIVE_INTS = ("baseline_steps", "steps_per_layer", "final_steps", "checkpoint_every", "seed")
_OPTIONAL = frozenset({"eval_samples", "threads"})
_NON_NEGATIVE_FLOATS = ("lr_dense", "lr_norm", "lr_lut", "lr_threshold", "weight_decay", "momentum", "recon")

# LayerSpec settings that config.json files of older runs held as top-level keys
LEGACY_SPEC_KEYS = ("nprototypes", "lut_bits", "lut_granularity", "ridge", "qat", "temperature")


def migrate_flat_spec(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with top-level LayerSpec keys (the flat layout of older ``config.json``
    files: nprototypes, lut_bits, lut_granularity, ridge, qat, temperature, or any other
    LayerSpec field) moved into the ``spec`` section. A flat ``temperature: null`` meant
    "the default" and is dropped. A key given both flat and in ``spec`` is an error."""
    values = dict(values)
    spec_fields = {f.name for f in dataclasses.fields(LayerSpec)}
    flat = {key: values.pop(key) for key in list(values) if key in spec_fields}
    if not flat:
        return values
    if flat.get("temperature", DEFAULT_TEMPERATURE) is None:
        del flat["temperature"]
    spec = values.get("spec") or {}
    if isinstance(spec, LayerSpec):
        spec = spec.to_dict()
    both = sorted(set(flat) & set(spec))
    if both:
        raise ValueError(f"settings {both} are given both at the top level and in the spec section")
    values["spec"] = {**spec, **flat}
    return values


def _flat_spec(values: dict[str, Any]) -> dict[str, Any]:
    spec = values.pop("spec", {}) or {}
    return {**values, **{f"spec.{key}": value for key, value in spec.items()}}
