"""Layer-by-layer retraining: replace a layer, fine-tune what follows, freeze, go on.

Step 0 is the dense model (loaded, or trained for ``baseline_steps``). Step i (1..n)
replaces the i-th layer in forward order with a MADD layer learned on the activations
the current, partly converted network produces, then fine-tunes
``steps_per_layer`` steps. Step n+1 fine-tunes everything still trainable.
Every step ends with a checkpoint (conversion plan + state) and a metrics row, so a
killed run started again with the same command continues at the step it was in.

Under torchrun (``WORLD_SIZE`` > 1; gloo on CPU, nccl on CUDA) the same steps run on every
rank: the first ``calib_batches`` calibration batches (the ones one process would take)
are split into contiguous blocks, one per rank; each rank records at most its share of
the layer's row capacity and rank 0 gathers them (so rank 0 holds no more rows than one
process would, and the same rows in the same order when no reservoir sampling is
needed); rank 0 learns the MADD layer and broadcasts it, and a state checksum checks that
all ranks hold the same model. Fine-tuning uses DistributedDataParallel (``batch_size`` is
per rank, gradients are averaged), evaluation adds correct counts over the shards, and
rank 0 alone writes checkpoints, metrics and config; a resume reads the checkpoint on
every rank. See docs/retrain.md ("Several processes and GPUs").
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import json
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..data.holdout import check_validation_unseen
from ..data.registry import create_dataset
from ..models.registry import create_model
from ..nn import MaddLayer, conversion_plan, convert_layer, madd_layers, rebuild, record_inputs
from ..nn.budget import write_allocation
from ..nn.diagnostics import dead_layer_message, dead_layers
from ..nn.mapping import LAYER_TYPES, input_dim
from ..nn.plan import replace_module
from ..nn.recording import capacity_for
from ..nn.spec import former_trees_hint
from ..threads import set_threads
from ..train import (
    JsonlWriter,
    capture_rng_state,
    evaluate,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    seed_everything,
    train_steps,
)
from ..train.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    broadcast_module,
    broadcast_object,
    check_same_model,
    fail_together,
    gather_objects,
    gather_rows,
    init_distributed,
    peak_memory_mib,
    process_device,
)
from ..train.optim import warmup_cosine_schedule
from ..train.runner import model_kwargs_for
from ..train.sampler import ResumableSampler
from .config import CHECKPOINT, RetrainConfig

# progress inside the final fine-tune (config.checkpoint_every), removed when the step ends
PROGRESS = "final_progress.pt"
METRICS = "metrics.jsonl"


# ---------------------------------------------------------------------------- setup
def build_data(
    config: RetrainConfig, dist_info: DistInfo | None = None
) -> tuple[DataLoader, DataLoader, DataLoader, Any]:
    """(train loader, calibration loader, eval loader, DatasetInfo).

    The train and eval loaders give this rank's shard (``dist_info``; one process: all);
    ``batch_size`` is per rank. The calibration loader is the same on every rank, with
    batches of ``batch_size * world_size`` samples (what one optimiser step sees in all);
    the pipeline splits its first ``calib_batches`` batches between the ranks."""
    dist_info = dist_info or DistInfo()
    train_set = create_dataset(
        config.dataset, "train", config.data_root, augment=config.augment, **config.dataset_kwargs
    )
    calib_set = create_dataset(
        config.dataset, "train", config.data_root, augment=False, **config.dataset_kwargs
    )
    eval_set = create_dataset(
        config.dataset, config.eval_split, config.data_root, augment=False, **config.dataset_kwargs
    )
    train_sampler = ResumableSampler(
        len(train_set), seed=config.seed, rank=dist_info.rank, world_size=dist_info.world_size
    )
    train = DataLoader(train_set, batch_size=config.batch_size, drop_last=True, sampler=train_sampler)
    calib_gen = torch.Generator().manual_seed(config.seed + 1)
    calib_batch = config.batch_size * dist_info.world_size
    calib = DataLoader(calib_set, batch_size=calib_batch, shuffle=True, generator=calib_gen)
    evaluation = DataLoader(
        eval_set, batch_size=config.eval_batch_size, sampler=eval_sampler(len(eval_set), dist_info)
    )
    return train, calib, evaluation, train_set.info


def eval_sampler(num_samples: int, dist_info: DistInfo) -> ResumableSampler:
    """In order, this rank's every world_size-th sample, unpadded (each sample counted once)."""
    return ResumableSampler(
        num_samples, shuffle=False, rank=dist_info.rank, world_size=dist_info.world_size, pad=False
    )


def rank_block(count: int, dist_info: DistInfo) -> range:
    """This rank's contiguous block of ``count`` items (the first ranks get one more when
    ``count`` does not divide evenly; ranks past ``count`` get none)."""
    size, extra = divmod(count, dist_info.world_size)
    start = dist_info.rank * size + min(dist_info.rank, extra)
    return range(start, start + size + (dist_info.rank < extra))


def build_dense_model(config: RetrainConfig, info) -> nn.Module:
    check_validation_unseen(config.checkpoint, config.dataset, config.dataset_kwargs, config.eval_split)
    return create_model(
        config.model,
        num_classes=info.num_classes,
        in_chans=info.in_chans,
        checkpoint=config.checkpoint,
        **model_kwargs_for(config.model, info, config.model_kwargs),
    )


def trace_layers(
    model: nn.Module, names: list[str], batch: torch.Tensor
) -> tuple[list[str], dict[str, float]]:
    """One forward pass of ``batch`` in eval mode without gradients: ``names`` sorted by when
    the layers first run, and ``{name: rows one sample gives the layer}`` (summed over its
    calls; a conv gets one row per output position, a linear layer one per leading index).
    ValueError for a layer that never runs."""
    order: list[str] = []
    counts = dict.fromkeys(names, 0)

    def seen(name: str, output: torch.Tensor) -> None:
        if name not in order:
            order.append(name)
        channel_dim = 1 if isinstance(model.get_submodule(name), nn.Conv2d) and output.dim() == 4 else -1
        counts[name] += output.numel() // max(1, output.shape[channel_dim])

    handles = [
        model.get_submodule(name).register_forward_hook(lambda _m, _a, out, name=name: seen(name, out))
        for name in dict.fromkeys(names)
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(batch)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    missing = [n for n in names if n not in order]
    if missing:
        raise ValueError(f"layers {missing} never run in a forward pass; exclude them")
    return order, {name: counts[name] / batch.shape[0] for name in order}


def forward_order(model: nn.Module, names: list[str], batch: torch.Tensor) -> list[str]:
    """``names`` sorted by when the layers first run in a forward pass of ``batch``."""
    return trace_layers(model, names, batch)[0]


def first_n_batches(loader: DataLoader, count: int) -> list:
    return list(itertools.islice(iter(loader), count))


# ---------------------------------------------------------------------------- training
def parameter_groups(
    model: nn.Module, order: list[str], current: int, config: RetrainConfig, final: bool = False
) -> list[dict]:
    """Optimiser groups for step ``current`` (index into ``order``) and set requires_grad.

    Trainable: the dense layers after ``current`` (lr_dense), norms and other parameters
    outside the selected layers (lr_norm), the MADD layer being replaced (lr_lut,
    lr_threshold) and, with ``train_replaced`` (or in the final step), the earlier ones.
    Everything else is frozen. A group with lr 0 is frozen too. ``order`` names each layer
    once (a shared module under its first name); a parameter held by several modules (tied
    weights) goes into the first group that takes it, once.
    """
    groups: dict[str, list[nn.Parameter]] = {
        "dense": [],
        "dense_no_decay": [],
        "norm": [],
        "lut": [],
        "threshold": [],
    }
    owned: set[int] = set()
    for index, name in enumerate(order):
        module = model.get_submodule(name)
        params = list(module.parameters())
        owned.update(id(p) for p in params)
        for p in params:
            p.requires_grad_(False)
        if isinstance(module, MaddLayer):
            if index == current or final or (config.train_replaced and index < current):
                groups["lut"].append(module.lut)
                groups["threshold"].extend(module.encoder.parameters())
                if module.bias is not None:
                    groups["dense_no_decay"].append(module.bias)
        elif index > current or final:
            for pname, p in module.named_parameters():
                groups["dense" if pname == "weight" else "dense_no_decay"].append(p)
    for p in model.parameters():
        if id(p) not in owned:
            groups["norm"].append(p)
    lrs = {
        "dense": config.lr_dense,
        "dense_no_decay": config.lr_dense,
        "norm": config.lr_norm,
        "lut": config.lr_lut,
        "threshold": config.lr_threshold,
    }
    result = []
    seen: set[int] = set()
    for key, params in groups.items():
        params = [p for p in params if id(p) not in seen and not seen.add(id(p))]
        if not params or lrs[key] <= 0:
            continue
        for p in params:
            p.requires_grad_(True)
        result.append(
            {
                "params": params,
                "lr": lrs[key],
                "name": key,
                "weight_decay": config.weight_decay if key == "dense" else 0.0,
            }
        )
    return result


def make_optimizer(groups: list[dict], config: RetrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=config.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=groups[0]["lr"])


@dataclass(frozen=True, eq=False)
class RetrainLoss:
    """The ``compute_loss(model, inputs, labels) -> (loss, logits)`` of a retraining step.

    Cross-entropy (with ``config.label_smoothing``); with a ``teacher`` and
    ``config.distill`` = a > 0, ``(1 - a) CE + a T^2 KL(teacher || student)`` at
    temperature T = ``config.distill_temperature``, the teacher run on the same inputs;
    with ``layer`` (the MADD layer being replaced), its dense original ``dense_layer``
    and ``config.recon`` = w > 0, plus ``w ||layer(x) - dense_layer(x)||^2 /
    ||dense_layer(x)||^2`` on the inputs x the layer gets in this forward pass (summed
    over its calls if it runs more than once). Nothing is kept between calls.
    """

    config: RetrainConfig
    teacher: nn.Module | None = None
    layer: nn.Module | None = None
    dense_layer: nn.Module | None = None

    def __call__(
        self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        recon = cfg.recon > 0 and self.layer is not None and self.dense_layer is not None
        with _layer_calls(self.layer if recon else None) as calls:
            logits = model(inputs)
        loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
        if cfg.distill > 0 and self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(inputs)
            kd = distillation_loss(logits, teacher_logits, cfg.distill_temperature)
            loss = (1 - cfg.distill) * loss + cfg.distill * kd
        if calls:
            terms = [recon_error(output, self.dense_layer, x) for x, output in calls]
            loss = loss + cfg.recon * torch.stack(terms).sum()
        return loss, logits


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """``T^2 KL(softmax(teacher / T) || softmax(logits / T))``, batch mean."""
    kl = F.kl_div(
        F.log_softmax(logits / tau, 1),
        F.log_softmax(teacher_logits / tau, 1),
        reduction="batchmean",
        log_target=True,
    )
    return kl * tau * tau


def recon_error(output: torch.Tensor, dense_layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``||output - dense_layer(x)||^2 / ||dense_layer(x)||^2`` (no gradient into the dense layer)."""
    with torch.no_grad():
        target = dense_layer(x)
    return ((output - target) ** 2).sum() / (target**2).sum().clamp_min(1e-12)


@contextlib.contextmanager
def _layer_calls(layer: nn.Module | None) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """A list that gets (input, output) of every call of ``layer`` inside the block (the
    hook is removed when the block ends); stays empty for ``layer=None``."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    if layer is None:
        yield calls
        return
    handle = layer.register_forward_hook(lambda _m, args, output: calls.append((args[0], output)))
    try:
        yield calls
    finally:
        handle.remove()


# ---------------------------------------------------------------------------- the run
class Retrainer:
    """Runs (or resumes) the pipeline described by a :class:`RetrainConfig`."""

    def __init__(self, config: RetrainConfig):
        self.config = config
        self.out = Path(config.out_dir)
        self.device = process_device(config.device)
        self.dist = init_distributed(self.device, config.dist_timeout)
        if config.threads:
            set_threads(config.threads)
        data = fail_together(lambda: build_data(config, self.dist), "loading the data")
        self.train_loader, self.calib_loader, self.eval_loader, self.info = data
        self.metrics = JsonlWriter(self.out / METRICS)

    def _write_row(self, row: dict[str, Any]) -> None:
        """Rank 0 writes ``row`` with every rank's peak memory so far (a collective: all
        ranks call this)."""
        peaks = gather_objects(peak_memory_mib(self.device))
        if self.dist.is_main:
            self.metrics.write({**row, "peak_mib_per_rank": peaks})

    # -- state
    def _check_config(self) -> None:
        saved_path = self.out / "config.json"
        # a config without a checkpoint belongs to a run that died before its first step
        # (e.g. an unknown model name): nothing to protect, so the new config replaces it
        if saved_path.exists() and (self.out / CHECKPOINT).exists():
            saved = RetrainConfig.load(saved_path)
            diff = saved.differences(self.config)
            if diff:
                raise ValueError(
                    f"{self.out} holds a run with another config (differences: {diff}); "
                    f"use another out_dir or delete the old run{former_trees_hint(diff)}"
                )
        # every rank has read the old config before rank 0 replaces it
        barrier()
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.config.save(saved_path)
            allocation = self.config.codebook_allocation()  # a started run's frozen plan
            if allocation is not None:
                # before any layer is learned: a resumed run reads this plan, not the analysis
                write_allocation(allocation, self.out)
        barrier()

    def _save(self, model: nn.Module, next_step: int, order: list[str], dense_state: dict) -> None:
        """Rank 0 writes the checkpoint atomically (the ranks hold the same model)."""
        if not self.dist.is_main:
            return
        save_checkpoint(
            self.out / CHECKPOINT,
            {
                "next_step": next_step,
                "order": order,
                "plan": conversion_plan(model),
                "state_dict": model.state_dict(),
                "dense_state": dense_state,
            },
        )

    def _fresh_model(self) -> nn.Module:
        model = create_model(
            self.config.model,
            num_classes=self.info.num_classes,
            in_chans=self.info.in_chans,
            **model_kwargs_for(self.config.model, self.info, self.config.model_kwargs),
        )
        return model.to(self.device)

    def _evaluate(self, model: nn.Module, full: bool = True) -> dict[str, float]:
        """Top-1/5 on the eval split; intermediate evaluations (``full=False``) use its
        first ``eval_samples`` samples when that is set."""
        loader = self.eval_loader
        if not full and self.config.eval_samples:
            subset = Subset(loader.dataset, range(min(self.config.eval_samples, len(loader.dataset))))
            sampler = eval_sampler(len(subset), self.dist)
            loader = DataLoader(subset, batch_size=self.config.eval_batch_size, sampler=sampler)
        return evaluate(model, loader, device=self.device)

    def _train(
        self,
        model: nn.Module,
        groups: list[dict],
        steps: int,
        loss: RetrainLoss,
        desc: str,
        progress_step: int | None = None,
    ) -> dict:
        """Fine-tune ``steps`` optimiser steps; returns the mean loss / top-1 of the steps run
        here and their seconds. With ``progress_step`` (the pipeline step this belongs to)
        and ``config.checkpoint_every``, rank 0 saves the progress every that many steps and
        a rerun continues from the last save (the same weights, optimiser, schedule, RNG and
        data position)."""
        if steps == 0 or not groups:
            return {}
        optimizer = make_optimizer(groups, self.config)
        scheduler = warmup_cosine_schedule(optimizer, steps, max(1, steps // 20))
        every = self.config.checkpoint_every if progress_step is not None else 0
        start_step = self._restore_progress(model, optimizer, scheduler, progress_step, steps) if every else 0

        def save_progress(info) -> None:
            if info.step % every == 0 and info.step < steps and self.dist.is_main:
                state = {
                    "next_step": progress_step,
                    "step": info.step,
                    "steps": steps,
                    "state_dict": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": capture_rng_state(),
                }
                save_checkpoint(self.out / PROGRESS, state)

        trained = model
        if self.dist.enabled:
            # a new wrapper per call: which parameters train changes from step to step
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            trained = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        start = time.perf_counter()
        stats = train_steps(
            trained,
            self.train_loader,
            optimizer,
            scheduler,
            steps=steps,
            start_step=start_step,
            compute_loss=loss,
            device=self.device,
            callback=save_progress if every else None,
            progress=self.config.progress and self.dist.is_main,
            desc=desc,
        )
        stats["seconds"] = time.perf_counter() - start
        # DDP syncs buffers (BatchNorm statistics) before each forward, so after the last
        # one they differ between ranks: take rank 0's, as evaluation and checkpoint do
        broadcast_module(model)
        if self.dist.enabled:
            # every rank ran the same number of equal-sized batches: the mean of the
            # ranks' means is the mean over all samples
            world = self.dist.world_size
            loss_sum, top1_sum = all_reduce_sum([stats["loss"], stats["top1"]], self.device)
            stats = {**stats, "loss": loss_sum / world, "top1": top1_sum / world}
        return stats

    def _restore_progress(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        progress_step: int,
        steps: int,
    ) -> int:
        """Load ``final_progress.pt`` into the model, optimiser, schedule and RNG when it
        belongs to this step (and this budget of steps); returns the steps already done."""
        path = self.out / PROGRESS
        if not path.exists():
            return 0

        def read() -> dict:
            return load_checkpoint(path, map_location=self.device)

        saved = fail_together(read, f"reading {path}")
        if saved.get("next_step") != progress_step or saved.get("steps") != steps:
            return 0  # left by another step or budget: start the step afresh
        model.load_state_dict(saved["state_dict"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        restore_rng_state(saved["rng"])
        check_same_model(model, f"reading {path}", self.device)
        return int(saved["step"])

    def _reseed(self, step: int) -> None:
        """Seed every RNG a step uses from the step number alone, so a resumed step repeats exactly."""
        seed = self.config.seed + 1000 * step
        seed_everything(seed)
        self.train_loader.sampler.seed = seed + 1
        self.calib_loader.generator.manual_seed(seed + 2)

    # -- steps
    def run(self) -> dict[str, Any]:
        """Run the steps not done yet; returns the metrics rows, layer order and model."""
        self._check_config()
        start = time.time()
        model, next_step, dense_state, order = self._load_checkpoint()
        if next_step == 0:
            model, dense_state, order = self._dense_step()
            next_step = 1
        loss = RetrainLoss(self.config, self._teacher(dense_state))

        # the dense control replaces nothing and spends the whole budget in the final step
        replace_steps = [] if self.config.dense_control else range(next_step - 1, len(order))
        for index in replace_steps:
            self._reseed(index + 1)
            self._replace_step(model, order, index, loss, loss.teacher)
            self._save(model, index + 2, order, dense_state)

        if next_step <= len(order) + 1:
            self._final_step(model, order, loss, dense_state)
        if self.config.fuse or self.config.prune_unread:
            self._apply_passes(model)
        barrier()  # rank 0's last metrics row is written before anyone reads the rows
        return {
            "rows": self.metrics.read(),
            "order": order,
            "seconds_this_invocation": time.time() - start,
            "model": model,
            "rank": self.dist.rank,
        }

    def _load_checkpoint(self) -> tuple[nn.Module | None, int, dict | None, list[str]]:
        """(model, next step, dense state dict, layer order) of the checkpoint, or
        (None, 0, None, []) for a new run; metric rows after the checkpoint are dropped."""
        checkpoint_path = self.out / CHECKPOINT
        if not checkpoint_path.exists():
            if self.dist.is_main:
                self.metrics.truncate_after(-1)  # rows of a run killed before its first checkpoint
            return None, 0, None, []

        def read() -> tuple[nn.Module, dict]:
            saved = load_checkpoint(checkpoint_path, map_location=self.device)
            model = rebuild(self._fresh_model(), saved["plan"])
            model.load_state_dict(saved["state_dict"])
            return model, saved

        model, saved = fail_together(read, f"reading the checkpoint {checkpoint_path}")
        if self.dist.is_main:
            self.metrics.truncate_after(saved["next_step"] - 1)
        # all ranks hold the checkpoint before rank 0 may write the next one
        check_same_model(model, f"reading {checkpoint_path}", self.device)
        return model, saved["next_step"], saved["dense_state"], saved["order"]

    def _teacher(self, dense_state: dict) -> nn.Module:
        """The dense model of step 0, frozen in eval mode (the distillation teacher)."""
        teacher = self._fresh_model()
        teacher.load_state_dict(dense_state)
        return teacher.eval().requires_grad_(False)

    def _dense_step(self) -> tuple[nn.Module, dict, list[str]]:
        """Step 0: load (or train) and evaluate the dense model, find the layer order,
        checkpoint; returns (model, a copy of its state dict, layer order)."""
        cfg = self.config
        self._reseed(0)
        t0 = time.time()
        if cfg.checkpoint is not None:
            model = build_dense_model(cfg, self.info).to(self.device)
        else:
            model = self._fresh_model()
        # before any training: a bad selection or too little calibration data fails now
        order = self._layer_order(model)
        if cfg.checkpoint is not None:
            train_stats = {}
        else:
            groups = [
                {
                    "params": [p for p in model.parameters()],
                    "lr": cfg.lr_dense,
                    "name": "all",
                    "weight_decay": cfg.weight_decay,
                }
            ]
            # no teacher: plain cross-entropy
            train_stats = self._train(model, groups, cfg.baseline_steps, RetrainLoss(cfg), "dense baseline")
        metrics = self._evaluate(model)
        self._write_row(
            {
                "step": 0,
                "phase": "dense",
                "layer": None,
                **_prefixed(metrics),
                "train_loss": train_stats.get("loss"),
                "train_seconds": train_stats.get("seconds"),
                "seconds": time.time() - t0,
                "replaced": 0,
            }
        )
        dense_state = copy.deepcopy(model.state_dict())
        self._save(model, 1, order, dense_state)
        return model, dense_state, order

    def _apply_passes(self, model: nn.Module) -> None:
        """``fuse`` / ``prune_unread`` (docs/passes.md) on a copy of the final model: evaluate
        both, save the passed model as ``passes.pt`` (save_converted) and ``passes.json``."""
        from ..nn.passes import apply_passes
        from ..nn.plan import save_converted

        example = next(iter(self.calib_loader))[0][:8].to(self.device)
        passed = copy.deepcopy(model)
        reports = apply_passes(passed, example, self.config.fuse, self.config.prune_unread)
        before, after = self._evaluate(model.eval()), self._evaluate(passed)
        if self.dist.is_main:
            save_converted(passed, self.out / "passes.pt")
            summary = {"before": before, "after": after, "reports": reports}
            (self.out / "passes.json").write_text(json.dumps(summary, indent=2))

    def _final_step(self, model: nn.Module, order: list[str], loss: RetrainLoss, dense_state: dict) -> None:
        """Step n + 1: fine-tune everything still trainable (the dense control: for the
        whole budget), evaluate, checkpoint."""
        cfg = self.config
        final_step = len(order) + 1
        self._reseed(final_step)
        t0 = time.time()
        calib = [(b[0].to(self.device), b[1]) for b in first_n_batches(self.calib_loader, 1)]
        dead = self._check_dead_layers(model, calib, "final fine-tune") if madd_layers(model) else {}
        broadcast_module(model)  # the check runs in train mode: BatchNorm statistics moved
        groups = parameter_groups(model, order, len(order), cfg, final=True)
        steps = cfg.final_steps + (len(order) * cfg.steps_per_layer if cfg.dense_control else 0)
        train_stats = self._train(
            model,
            groups,
            steps,
            loss,
            "dense control" if cfg.dense_control else "final fine-tune",
            progress_step=final_step,
        )
        metrics = self._evaluate(model)
        checksum = check_same_model(model, "the final fine-tune", self.device)
        self._write_row(
            {
                "step": final_step,
                "phase": "final",
                "layer": None,
                **_prefixed(metrics),
                "train_loss": train_stats.get("loss"),
                "train_seconds": train_stats.get("seconds"),
                "train_steps": steps,
                "seconds": time.time() - t0,
                "replaced": len(madd_layers(model)),
                "dead_layers": dead,
                "state_checksum": checksum,
            }
        )
        self._save(model, final_step + 1, order, dense_state)
        if self.dist.is_main:
            (self.out / PROGRESS).unlink(missing_ok=True)

    def _layer_order(self, model: nn.Module) -> list[str]:
        """The selected layers in forward order, after checking that the calibration data
        gives every one of them enough rows (:meth:`_check_calibration_rows`)."""
        cfg = self.config
        selected = list(cfg.madd_config().select(model))
        batch = next(iter(self.calib_loader))[0][:2].to(self.device)
        try:
            order, per_sample = trace_layers(model, selected, batch)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as error:
            raise ValueError(
                f"model {cfg.model!r} with {cfg.model_kwargs} cannot run a batch of data set "
                f"{cfg.dataset!r} (input {tuple(batch.shape[1:])}): {error}"
            ) from error
        if not cfg.dense_control:
            self._check_calibration_rows(model, order, per_sample)
        return order

    def _check_calibration_rows(
        self, model: nn.Module, order: list[str], per_sample: dict[str, float]
    ) -> None:
        """ValueError naming the first layer whose recorded rows would fall short of
        ``max(min_rows, K)`` (what convert needs), with the flags that fix it."""
        cfg, madd = self.config, self.config.madd_config()
        needed = max(madd.min_rows, cfg.spec.nprototypes)
        nsamples = len(self.calib_loader.dataset)
        calib_batch = self.calib_loader.batch_size
        samples = min(cfg.calib_batches * calib_batch, nsamples)
        for name in order:
            rows_each = per_sample[name]
            capacity = capacity_for(
                input_dim(model.get_submodule(name)), cfg.max_rows, madd.max_bytes_per_layer
            )
            if capacity < needed:
                raise ValueError(
                    f"layer {name!r} can keep only {capacity} recorded rows (max_rows={cfg.max_rows}), "
                    f"fewer than the {needed} needed (max(MaddConfig.min_rows, K)); raise --max-rows"
                )
            rows = int(samples * rows_each)
            if rows >= needed:
                continue
            if nsamples * rows_each < needed:
                fix = f"the data set has only {nsamples} training samples; use a larger one"
            else:
                batches = math.ceil(needed / (calib_batch * rows_each))
                # a calibration batch is batch_size (per rank) times the number of ranks
                size = math.ceil(needed / (cfg.calib_batches * rows_each * self.dist.world_size))
                fix = f"use --calib-batches {batches} or --batch-size {size}"
            raise ValueError(
                f"layer {name!r} gets {rows_each:g} rows per sample, so {cfg.calib_batches} calibration "
                f"batches of {calib_batch} ({samples} samples) give {rows} rows, fewer than the "
                f"{needed} needed (max(MaddConfig.min_rows, K)); {fix}"
            )

    def _replace_step(
        self, model: nn.Module, order: list[str], index: int, loss: RetrainLoss, teacher: nn.Module
    ) -> None:
        """Step index + 1: learn layer ``order[index]`` from the current network's
        activations, swap it in, evaluate, fine-tune (with the recon term on this layer
        when ``recon`` > 0), evaluate again. ``loss`` carries the ``teacher``."""
        cfg = self.config
        name = order[index]
        t0 = time.time()
        batches = self._calibration_batches()
        rows = self._record_rows(model, name, batches)
        dense_layer = copy.deepcopy(model.get_submodule(name)).requires_grad_(False)
        layer = self._learn_layer(model, name, rows)
        where = f"step {index + 1}/{len(order)} ({name})"
        # rank 0 has the first batch, as one process has: its check (train mode, which
        # moves BatchNorm statistics) is the one that counts, and its state is broadcast
        dead = self._check_dead_layers(model, batches[:1], where) if self.dist.is_main else {}
        broadcast_module(model)
        check_same_model(model, f"learning layer {name!r}", self.device)
        after_replace = self._evaluate(model, full=False)
        groups = parameter_groups(model, order, index, cfg)
        step_loss = dataclasses.replace(loss, teacher=teacher, layer=layer, dense_layer=dense_layer)
        train_stats = self._train(
            model, groups, cfg.steps_per_layer, step_loss, f"step {index + 1}/{len(order)} {name}"
        )
        metrics = self._evaluate(model, full=index + 1 == len(order))
        checksum = check_same_model(model, f"fine-tuning after {name!r}", self.device)
        self._write_row(
            {
                "step": index + 1,
                "phase": "replace",
                "layer": name,
                "kind": layer.kind,
                "D": layer.in_dim,
                "M": layer.out_dim,
                "C": layer.ncodebooks,
                "K": layer.nprototypes,
                "calib_rows": 0 if rows is None else int(rows.shape[0]),
                **_prefixed(after_replace, "replaced_"),
                **_prefixed(metrics),
                "train_loss": train_stats.get("loss"),
                "train_seconds": train_stats.get("seconds"),
                "seconds": time.time() - t0,
                "replaced": len(madd_layers(model)),
                "dead_layers": dead,
                "state_checksum": checksum,
            }
        )

    def _calibration_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's block (:func:`rank_block`) of the first ``calib_batches`` batches of
        the calibration loader, inputs on the device; only that block is loaded."""
        loader = self.calib_loader
        # iterating a DataLoader draws its workers' base seed from the generator before the
        # sampler's permutation: draw it too, so the batches are those the loader gives
        torch.empty((), dtype=torch.int64).random_(generator=loader.generator)
        index_batches = list(itertools.islice(iter(loader.batch_sampler), self.config.calib_batches))
        batches = []
        for position in rank_block(len(index_batches), self.dist):
            inputs, labels = loader.collate_fn([loader.dataset[i] for i in index_batches[position]])
            batches.append((inputs.to(self.device), labels))
        return batches

    def _record_rows(self, model: nn.Module, name: str, batches: list) -> torch.Tensor | None:
        """Input rows (N, D) float32 of layer ``name`` on ``batches``, on the device.

        One process: all rows (a reservoir sample of ``capacity`` rows when there are
        more). Distributed: each rank keeps at most its share of that capacity (capacity
        // world_size, one more on the first ranks) and rank 0 gets them all, in rank
        order (None on the other ranks)."""
        cfg, madd = self.config, self.config.madd_config()
        if not self.dist.enabled:
            rows = record_inputs(model, [name], batches, max_rows=cfg.max_rows, config=madd)[name]
            return rows.to(self.device)
        module = model.get_submodule(name)
        ndims = input_dim(module)
        capacity = capacity_for(ndims, cfg.max_rows, madd.max_bytes_per_layer)
        world, rank = self.dist.world_size, self.dist.rank
        share = max(1, capacity // world + (rank < capacity % world))
        # rank 0 samples as one process would; the others draw other reservoir slots
        seeded = dataclasses.replace(madd, seed=madd.seed + 7919 * rank)

        def record() -> torch.Tensor:
            if not batches:
                return torch.empty(0, ndims)
            return record_inputs(model, [name], batches, max_rows=share, config=seeded)[name]

        rows = fail_together(record, f"recording the inputs of layer {name!r}")
        return gather_rows(rows.to(self.device))

    def _learn_layer(self, model: nn.Module, name: str, rows: torch.Tensor | None) -> MaddLayer:
        """Rank 0 learns layer ``name`` from ``rows`` and swaps it in; the other ranks swap
        in an empty layer of the same config (the caller broadcasts rank 0's state)."""
        madd = self.config.madd_config()
        if not self.dist.enabled:
            return convert_layer(model, name, rows, madd)
        learned = fail_together(
            lambda: convert_layer(model, name, rows, madd) if self.dist.is_main else None,
            f"learning layer {name!r} on rank 0",
        )
        config = None if learned is None else {"kind": learned.kind, "config": learned.get_config()}
        entry = broadcast_object(config)
        if learned is not None:
            return learned
        dense = model.get_submodule(name)
        layer = LAYER_TYPES[entry["kind"]].from_config(entry["config"], device=self.device)
        layer.train(dense.training)
        replace_module(model, name, layer)
        return layer

    @staticmethod
    def _check_dead_layers(model: nn.Module, batches: list, where: str) -> dict[str, float]:
        """``{name: share}`` of the MADD layers that training could not move (train mode, on
        ``batches``; :func:`maddnet.nn.diagnostics.dead_layers`), with a warning naming them."""
        dead = dead_layers(model, batches, train=True, warn=False)
        if dead:
            warnings.warn(f"{where}: {dead_layer_message(dead)}", UserWarning, stacklevel=3)
        return dead


def _prefixed(metrics: dict[str, float], prefix: str = "") -> dict[str, float]:
    return {f"{prefix}{k}": v for k, v in metrics.items() if k in ("top1", "top5", "loss", "samples")}


def run_retrain(config: RetrainConfig) -> dict[str, Any]:
    """Run or resume the pipeline; returns the metrics rows, layer order and model."""
    return Retrainer(config).run()
