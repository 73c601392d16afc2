"""A whole training run from a TrainConfig: data, model, loop, evaluation, checkpoints.

Files in ``config.out_dir``:
  config.json      the run's config as first started (a resume checks that it matches;
                   changed execution settings such as threads go to the resume record)
  metrics.jsonl    one JSON object per line: ``kind`` "train" (every log_every steps),
                   "eval" (every epoch end), "resume" (each continuation)
  checkpoint.pt    model/optimizer/scheduler/RNG state and step (atomic, every
                   checkpoint_every steps and at each epoch end)
  model.pt         final weights only (a plain state dict)
  results.json     final evaluation, steps, wall time
Running the same command again after a kill continues from checkpoint.pt.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numba
import torch
from torch import nn
from torch.utils.data import DataLoader

from maddnet.data import DatasetInfo, create_dataset
from maddnet.data.holdout import check_validation_unseen
from maddnet.models import create_model
from maddnet.threads import set_threads
from maddnet.train.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    seed_everything,
)
from maddnet.train.config import TrainConfig, config_differences
from maddnet.train.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    init_distributed,
    pick_device,
)
from maddnet.train.loops import StepInfo, evaluate, train_steps, unwrap
from maddnet.train.metrics import JsonlWriter
from maddnet.train.optim import build_optimizer, warmup_cosine_schedule
from maddnet.train.sampler import ResumableSampler

CHECKPOINT_NAME = "checkpoint.pt"


def model_kwargs_for(model: str, info: DatasetInfo, given: dict[str, Any]) -> dict[str, Any]:
    """Model arguments that follow from the data: the image size for LeViT, and the
    small-image stems for LeViT/ResNet-18/50 when images are smaller than 64 pixels."""
    kwargs = dict(given)
    small = info.image_size < 64
    if model.startswith("levit"):
        kwargs.setdefault("img_size", info.image_size)
        kwargs.setdefault("small_input", small)
    elif model in ("resnet18", "resnet50"):
        kwargs.setdefault("small_input", small)
    return kwargs


def build_loaders(
    config: TrainConfig, dist_info: DistInfo, device: torch.device
) -> tuple[DataLoader, DataLoader, DatasetInfo]:
    train_set = create_dataset(
        config.dataset,
        "train",
        config.data_root,
        augment=config.augment,
        seed=config.seed,
        **config.dataset_kwargs,
    )
    eval_set = create_dataset(
        config.dataset,
        config.eval_split,
        config.data_root,
        augment=False,
        seed=config.seed,
        **config.dataset_kwargs,
    )
    pin = device.type == "cuda"
    train_loader = DataLoader(
        train_set,
        batch_size=config.batch_size,
        drop_last=True,
        num_workers=config.num_workers,
        pin_memory=pin,
        sampler=ResumableSampler(
            len(train_set),
            shuffle=True,
            seed=config.seed,
            rank=dist_info.rank,
            world_size=dist_info.world_size,
        ),
    )
    eval_loader = DataLoader(
        eval_set,
        batch_size=config.eval_batch_size,
        num_workers=config.num_workers,
        pin_memory=pin,
        sampler=ResumableSampler(
            len(eval_set), shuffle=False, rank=dist_info.rank, world_size=dist_info.world_size, pad=False
        ),
    )
    return train_loader, eval_loader, train_set.info


def build_model(config: TrainConfig, info: DatasetInfo) -> nn.Module:
    check_validation_unseen(config.init_checkpoint, config.dataset, config.dataset_kwargs, config.eval_split)
    kwargs = model_kwargs_for(config.model, info, config.model_kwargs)
    return create_model(
        config.model,
        num_classes=info.num_classes,
        in_chans=info.in_chans,
        checkpoint=config.init_checkpoint,
        strict=False,
        **kwargs,
    )


def _check_resumable(out_dir: Path, config: TrainConfig) -> dict[str, Any]:
    """Refuse to continue a run with a different config; returns the execution settings
    (threads, device, ...) that differ from the saved config.json, for the metrics log."""
    saved_path = out_dir / "config.json"
    if not saved_path.exists():
        return {}
    saved = TrainConfig.load(saved_path)
    differences = config_differences(saved, config)
    if differences:
        details = "; ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in differences.items())
        raise ValueError(
            f"{out_dir} holds a run with a different config ({details}); "
            "use another out_dir or delete the old run"
        )
    now = config.to_dict()
    return {k: v for k, v in now.items() if saved.to_dict()[k] != v}


def run_training(config: TrainConfig) -> dict[str, Any]:
    """Train (or continue training) the run described by ``config``; returns results.json's
    content (final top1/top5/loss on ``eval_split``, steps, wall time in seconds).
    When ``max_steps`` stops the run early the returned dict has ``finished: False``.
    ``config.threads`` applies during the run only (the caller's setting is restored)."""
    threads_before = (torch.get_num_threads(), numba.get_num_threads())
    # the first numba.get_num_threads() of a process starts numba's thread pool, which
    # (OpenMP layer) can reset torch's count to all cores: keep the caller's setting
    torch.set_num_threads(threads_before[0])
    if config.threads:
        set_threads(config.threads)
    try:
        return _run_training(config)
    finally:
        torch.set_num_threads(threads_before[0])
        numba.set_num_threads(threads_before[1])


def _run_training(config: TrainConfig) -> dict[str, Any]:
    device, dist_info = _start_process(config)
    changed_settings = _prepare_out_dir(Path(config.out_dir), config, dist_info)
    run = _TrainingRun(config, device, dist_info)
    run.resume(changed_settings)
    run.train()
    return run.finish()


def _start_process(config: TrainConfig) -> tuple[torch.device, DistInfo]:
    """The device of this process, after joining the process group under torchrun."""
    device = pick_device(config.device)
    dist_info = init_distributed(device)
    if dist_info.enabled and config.device == "auto" and device.type == "cuda":
        device = pick_device("auto", dist_info.local_rank)
    return device, dist_info


def _prepare_out_dir(out_dir: Path, config: TrainConfig, dist_info: DistInfo) -> dict[str, Any]:
    """Check that a run in ``out_dir`` may be continued, write config.json if it is new;
    returns the changed execution settings (see :func:`_check_resumable`)."""
    # every process checks (reading only), so a refused resume stops all of them
    changed_settings = _check_resumable(out_dir, config)
    if dist_info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not (out_dir / "config.json").exists():
            config.save(out_dir / "config.json")  # the first piece's config stays
    barrier()
    return changed_settings


class _TrainingRun:
    """This process's part of a run: what it trains, and the state a checkpoint keeps
    (``state``: step, elapsed seconds, the epoch's running train sums, the last eval)."""

    def __init__(self, config: TrainConfig, device: torch.device, dist_info: DistInfo):
        self.config, self.device, self.dist_info = config, device, dist_info
        self.out_dir = Path(config.out_dir)
        seed_everything(config.seed)
        self.train_loader, self.eval_loader, info = build_loaders(config, dist_info, device)
        self.model = build_model(config, info).to(device)
        self.optimizer = build_optimizer(
            self.model, config.optimizer, config.lr, config.weight_decay, config.momentum, config.nesterov
        )
        steps_per_epoch = len(self.train_loader)
        self.total_steps = int(round(config.epochs * steps_per_epoch))
        self.scheduler = warmup_cosine_schedule(
            self.optimizer,
            self.total_steps,
            int(round(config.warmup_epochs * steps_per_epoch)),
            config.min_lr_ratio,
        )
        self.metrics = JsonlWriter(self.out_dir / "metrics.jsonl")
        self.ckpt_path = self.out_dir / CHECKPOINT_NAME
        self.state: dict[str, Any] = {
            "step": 0,
            "elapsed": 0.0,
            "epoch_sums": [0.0, 0.0, 0.0],
            "last_eval": None,
        }
        self.eval_loss_fn = nn.CrossEntropyLoss()
        self.elapsed_before, self.started = 0.0, time.perf_counter()

    def resume(self, changed_settings: dict[str, Any]) -> None:
        """Load checkpoint.pt if there is one (and log the resume); then wrap the model
        for DistributedDataParallel when distributed and start the clock."""
        if self.ckpt_path.exists():
            ckpt = load_checkpoint(self.ckpt_path, map_location=self.device)
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            restore_rng_state(ckpt["rng"])
            self.state = ckpt["state"]
            if self.dist_info.is_main:
                self.metrics.truncate_after(self.state["step"])
                self.metrics.write(
                    {
                        "kind": "resume",
                        "step": self.state["step"],
                        "time": time.time(),
                        "changed_settings": changed_settings,
                    }
                )
        if self.dist_info.enabled:
            self.model = nn.parallel.DistributedDataParallel(self.model)
        self.elapsed_before, self.started = self.state["elapsed"], time.perf_counter()

    def elapsed(self) -> float:
        """Seconds of training summed over this piece and the pieces before it."""
        return self.elapsed_before + time.perf_counter() - self.started

    def checkpoint(self) -> None:
        self.state["elapsed"] = self.elapsed()
        if self.dist_info.is_main:
            save_checkpoint(
                self.ckpt_path,
                {
                    "model": unwrap(self.model).state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "rng": capture_rng_state(),
                    "state": self.state,
                    "config": self.config.to_dict(),
                },
            )
        barrier()

    def on_step(self, info: StepInfo) -> bool:
        """train_steps' callback: sums, train/eval metrics, checkpoints; True stops (max_steps)."""
        config = self.config
        self.state["step"] = info.step
        sums = self.state["epoch_sums"]
        sums[0] += info.loss * info.samples
        sums[1] += info.correct
        sums[2] += info.samples
        if self.dist_info.is_main and info.step % config.log_every == 0:
            self.metrics.write(
                {
                    "kind": "train",
                    "step": info.step,
                    "epoch": info.epoch,
                    "loss": info.loss,
                    "lr": info.lr,
                    "elapsed": self.elapsed(),
                }
            )
        if info.epoch_done:
            self._end_epoch(info)
        if info.epoch_done or info.step % config.checkpoint_every == 0:
            self.checkpoint()
        return config.max_steps is not None and info.step >= config.max_steps

    def _end_epoch(self, info: StepInfo) -> None:
        """Evaluate, and log the evaluation with the epoch's train loss/accuracy."""
        loss_sum, correct, samples = all_reduce_sum(self.state["epoch_sums"], self.device)
        result = evaluate(self.model, self.eval_loader, device=self.device, loss_fn=self.eval_loss_fn)
        record = {
            "kind": "eval",
            "split": self.config.eval_split,
            "step": info.step,
            "epoch": info.epoch + 1,
            **result,
            "train_loss": loss_sum / max(samples, 1),
            "train_top1": correct / max(samples, 1),
            "elapsed": self.elapsed(),
        }
        self.state["last_eval"] = record
        self.state["epoch_sums"] = [0.0, 0.0, 0.0]
        if self.dist_info.is_main:
            self.metrics.write(record)
            if self.config.progress:
                print(json.dumps(record), flush=True)

    def train(self) -> None:
        """Train from the current step to the end (or to max_steps), then checkpoint."""
        config = self.config
        if self.state["step"] >= self.total_steps:
            return
        loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        train_steps(
            self.model,
            self.train_loader,
            self.optimizer,
            self.scheduler,
            steps=self.total_steps,
            start_step=self.state["step"],
            loss_fn=loss_fn,
            device=self.device,
            grad_clip=config.grad_clip,
            callback=self.on_step,
            progress=config.progress and self.dist_info.is_main,
            desc=f"{config.model}/{config.dataset}",
        )
        self.checkpoint()

    def finish(self) -> dict[str, Any]:
        """The final evaluation (the last epoch's, or a new one) and results.json; when
        the run is finished, model.pt and results.json are written."""
        config, state, model = self.config, self.state, self.model
        finished = state["step"] >= self.total_steps
        final = state["last_eval"] if finished and state["last_eval"] else None
        if final is None or final["step"] != state["step"]:
            final = {
                "kind": "eval",
                "step": state["step"],
                "split": config.eval_split,
                **evaluate(model, self.eval_loader, device=self.device, loss_fn=self.eval_loss_fn),
            }
        results = {
            **{k: final[k] for k in ("top1", "top5", "loss", "samples", "split")},
            "step": state["step"],
            "total_steps": self.total_steps,
            "epochs": config.epochs,
            "finished": finished,
            "wall_time_s": self.elapsed(),
            "world_size": self.dist_info.world_size,
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "num_parameters": sum(p.numel() for p in unwrap(model).parameters()),
        }
        if self.dist_info.is_main and finished:
            save_checkpoint(self.out_dir / "model.pt", unwrap(model).state_dict())
            (self.out_dir / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        barrier()
        return results
