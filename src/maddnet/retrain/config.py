"""Settings of a layer-by-layer retraining run (saved as ``config.json`` beside its results)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..nn import MaddConfig
from ..train.config import JsonConfig


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
        codebook_width, nprototypes, lut_bits, lut_granularity, ridge, qat, temperature:
            MADD layer settings (see :class:`maddnet.nn.MaddConfig`).
        calib_batches: training batches whose activations a layer is learned from.
        max_rows: rows kept per layer while recording.
        steps_per_layer: fine-tuning steps after each replacement.
        final_steps: fine-tuning steps of everything still trainable at the end.
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
        eval_samples: evaluate the intermediate steps on the first N samples of the eval
            split only (the dense, last-replacement and final steps always use all of it).
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
    nprototypes: int = 16
    lut_bits: int | None = 8
    lut_granularity: str = "codebook"
    ridge: float | None = 1.0
    qat: bool = True
    temperature: float | None = None
    calib_batches: int = 8
    max_rows: int = 16384
    steps_per_layer: int = 200
    final_steps: int = 500
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

    EXECUTION_KEYS: ClassVar[frozenset[str]] = frozenset(
        {"out_dir", "data_root", "device", "threads", "progress"}
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.distill <= 1.0:
            raise ValueError(f"distill must lie in [0, 1], got {self.distill}")
        if self.recon < 0:
            raise ValueError(f"recon must be >= 0, got {self.recon}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        for name in ("steps_per_layer", "final_steps", "baseline_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.calib_batches < 1:
            raise ValueError(f"calib_batches must be >= 1, got {self.calib_batches}")
        if self.checkpoint is None and self.baseline_steps == 0:
            raise ValueError(
                "give the trained dense model as checkpoint=..., or baseline_steps > 0 to train it here"
            )

    def madd_config(self) -> MaddConfig:
        extra = {} if self.temperature is None else {"temperature": self.temperature}
        return MaddConfig(
            layers=self.layers,
            exclude=list(self.exclude),
            ncodebooks=self.ncodebooks,
            codebook_width=self.codebook_width,
            nprototypes=self.nprototypes,
            lut_bits=self.lut_bits,
            lut_granularity=self.lut_granularity,
            ridge=self.ridge,
            qat=self.qat,
            max_rows=self.max_rows,
            seed=self.seed,
            **extra,
        )
