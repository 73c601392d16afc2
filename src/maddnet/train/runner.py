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


def build_loaders(config: TrainConfig, dist_info: DistInfo, device: torch.device
                  ) -> tuple[DataLoader, DataLoader, DatasetInfo]:
    train_set = create_dataset(config.dataset, "train", config.data_root, augment=config.augment,
                               seed=config.seed, **config.dataset_kwargs)
    eval_set = create_dataset(config.dataset, config.eval_split, config.data_root, augment=False,
                              seed=config.seed, **config.dataset_kwargs)
    pin = device.type == "cuda"
    train_loader = DataLoader(
        train_set, batch_size=config.batch_size, drop_last=True, num_workers=config.num_workers,
        pin_memory=pin,
        sampler=ResumableSampler(len(train_set), shuffle=True, seed=config.seed,
                                 rank=dist_info.rank, world_size=dist_info.world_size))
    eval_loader = DataLoader(
        eval_set, batch_size=config.eval_batch_size, num_workers=config.num_workers,
        pin_memory=pin,
        sampler=ResumableSampler(len(eval_set), shuffle=False, rank=dist_info.rank,
                                 world_size=dist_info.world_size, pad=False))
    return train_loader, eval_loader, train_set.info


def build_model(config: TrainConfig, info: DatasetInfo) -> nn.Module:
    kwargs = model_kwargs_for(config.model, info, config.model_kwargs)
    return create_model(config.model, num_classes=info.num_classes, in_chans=info.in_chans,
                        checkpoint=config.init_checkpoint, strict=False, **kwargs)


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
        raise ValueError(f"{out_dir} holds a run with a different config ({details}); "
                         "use another out_dir or delete the old run")
    now = config.to_dict()
    return {k: v for k, v in now.items() if saved.to_dict()[k] != v}


def run_training(config: TrainConfig) -> dict[str, Any]:
    """Train (or continue training) the run described by ``config``; returns results.json's
    content (final top1/top5/loss on ``eval_split``, steps, wall time in seconds).
    When ``max_steps`` stops the run early the returned dict has ``finished: False``.
    ``config.threads`` applies during the run only (the caller's setting is restored)."""
    threads_before = (torch.get_num_threads(), numba.get_num_threads())
    if config.threads:
        set_threads(config.threads)
    try:
        return _run_training(config)
    finally:
        torch.set_num_threads(threads_before[0])
        numba.set_num_threads(threads_before[1])


def _run_training(config: TrainConfig) -> dict[str, Any]:
    device = pick_device(config.device)
    dist_info = init_distributed(device)
    if dist_info.enabled and config.device == "auto" and device.type == "cuda":
        device = pick_device("auto", dist_info.local_rank)
    out_dir = Path(config.out_dir)
    # every process checks (reading only), so a refused resume stops all of them
    changed_settings = _check_resumable(out_dir, config)
    if dist_info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not (out_dir / "config.json").exists():
            config.save(out_dir / "config.json")  # the first piece's config stays
    barrier()

    seed_everything(config.seed)
    train_loader, eval_loader, info = build_loaders(config, dist_info, device)
    model = build_model(config, info).to(device)
    optimizer = build_optimizer(model, config.optimizer, config.lr, config.weight_decay,
                                config.momentum, config.nesterov)
    steps_per_epoch = len(train_loader)
    total_steps = int(round(config.epochs * steps_per_epoch))
    scheduler = warmup_cosine_schedule(optimizer, total_steps,
                                       int(round(config.warmup_epochs * steps_per_epoch)),
                                       config.min_lr_ratio)
    metrics = JsonlWriter(out_dir / "metrics.jsonl")
    ckpt_path = out_dir / CHECKPOINT_NAME
    state: dict[str, Any] = {"step": 0, "elapsed": 0.0, "epoch_sums": [0.0, 0.0, 0.0],
                             "last_eval": None}
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, map_location=device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        restore_rng_state(ckpt["rng"])
        state = ckpt["state"]
        if dist_info.is_main:
            metrics.truncate_after(state["step"])
            metrics.write({"kind": "resume", "step": state["step"], "time": time.time(),
                           "changed_settings": changed_settings})
    if dist_info.enabled:
        model = nn.parallel.DistributedDataParallel(model)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    eval_loss_fn = nn.CrossEntropyLoss()
    started = time.perf_counter()
    elapsed_before = state["elapsed"]

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - started

    def checkpoint() -> None:
        state["elapsed"] = elapsed()
        if dist_info.is_main:
            save_checkpoint(ckpt_path, {
                "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": capture_rng_state(),
                "state": state, "config": config.to_dict()})
        barrier()

    def on_step(info_: StepInfo) -> bool:
        state["step"] = info_.step
        sums = state["epoch_sums"]
        sums[0] += info_.loss * info_.samples
        sums[1] += info_.correct
        sums[2] += info_.samples
        if dist_info.is_main and info_.step % config.log_every == 0:
            metrics.write({"kind": "train", "step": info_.step, "epoch": info_.epoch,
                           "loss": info_.loss, "lr": info_.lr, "elapsed": elapsed()})
        if info_.epoch_done:
            loss_sum, correct, samples = all_reduce_sum(sums, device)
            result = evaluate(model, eval_loader, device=device, loss_fn=eval_loss_fn)
            record = {"kind": "eval", "split": config.eval_split, "step": info_.step,
                      "epoch": info_.epoch + 1, **result,
                      "train_loss": loss_sum / max(samples, 1),
                      "train_top1": correct / max(samples, 1), "elapsed": elapsed()}
            state["last_eval"] = record
            state["epoch_sums"] = [0.0, 0.0, 0.0]
            if dist_info.is_main:
                metrics.write(record)
                if config.progress:
                    print(json.dumps(record), flush=True)
        if info_.epoch_done or info_.step % config.checkpoint_every == 0:
            checkpoint()
        return config.max_steps is not None and info_.step >= config.max_steps

    if state["step"] < total_steps:
        train_steps(model, train_loader, optimizer, scheduler, steps=total_steps,
                    start_step=state["step"], loss_fn=loss_fn, device=device,
                    grad_clip=config.grad_clip, callback=on_step,
                    progress=config.progress and dist_info.is_main,
                    desc=f"{config.model}/{config.dataset}")
        checkpoint()
    finished = state["step"] >= total_steps
    final = state["last_eval"] if finished and state["last_eval"] else None
    if final is None or final["step"] != state["step"]:
        final = {"kind": "eval", "step": state["step"], "split": config.eval_split,
                 **evaluate(model, eval_loader, device=device, loss_fn=eval_loss_fn)}
    results = {**{k: final[k] for k in ("top1", "top5", "loss", "samples", "split")},
               "step": state["step"], "total_steps": total_steps, "epochs": config.epochs,
               "finished": finished, "wall_time_s": elapsed(),
               "world_size": dist_info.world_size, "device": str(device),
               "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
               "num_parameters": sum(p.numel() for p in unwrap(model).parameters())}
    if dist_info.is_main and finished:
        save_checkpoint(out_dir / "model.pt", unwrap(model).state_dict())
        (out_dir / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    barrier()
    return results
