"""Training and evaluation: reusable loops, checkpoints, recipes, the ``maddnet train`` run.

Python API for other code (e.g. layer-wise retraining):
  train_steps(model, loader, optimizer, scheduler, steps=..., compute_loss=..., callback=...)
  evaluate(model, loader) -> {"top1", "top5", "loss", "samples"}
  save_checkpoint(path, state) / load_checkpoint(path)   (atomic writes)
  build_optimizer, parameter_groups, warmup_cosine_schedule
  run_training(make_config("resnet9", "fashion_mnist", out_dir=...))
"""

from maddnet.train.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    seed_everything,
)
from maddnet.train.config import RECIPES, TrainConfig, make_config, recipe_for
from maddnet.train.loops import ComputeLoss, StepInfo, evaluate, logits_loss, train_steps, unwrap
from maddnet.train.metrics import JsonlWriter, topk_correct
from maddnet.train.optim import (
    build_optimizer,
    parameter_groups,
    warmup_cosine_factor,
    warmup_cosine_schedule,
)
from maddnet.train.runner import build_loaders, build_model, run_training
from maddnet.train.sampler import ResumableSampler

__all__ = [
    "RECIPES",
    "ComputeLoss",
    "JsonlWriter",
    "ResumableSampler",
    "StepInfo",
    "TrainConfig",
    "build_loaders",
    "build_model",
    "build_optimizer",
    "capture_rng_state",
    "evaluate",
    "load_checkpoint",
    "logits_loss",
    "make_config",
    "parameter_groups",
    "recipe_for",
    "restore_rng_state",
    "run_training",
    "save_checkpoint",
    "seed_everything",
    "topk_correct",
    "train_steps",
    "unwrap",
    "warmup_cosine_factor",
    "warmup_cosine_schedule",
]
