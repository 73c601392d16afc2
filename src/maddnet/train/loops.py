"""Reusable train and evaluation loops (plain PyTorch objects in, numbers out).

``train_steps`` runs a fixed budget of optimiser steps over a loader, counting steps from
the start of a run so that it can continue a run in the middle of an epoch; the loss of a
batch comes from ``compute_loss(model, inputs, labels) -> (loss, logits)`` (or, for losses
of the logits alone, ``loss_fn(logits, labels)``). ``evaluate`` returns top-1/top-5
accuracy and mean loss.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from maddnet.train.distributed import all_reduce_sum
from maddnet.train.metrics import topk_correct

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# compute_loss(model, inputs, labels) -> (loss, logits): runs the model itself
ComputeLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def logits_loss(loss_fn: LossFn | None = None) -> ComputeLoss:
    """The ``compute_loss`` of a plain ``loss_fn(logits, labels)`` (cross-entropy by default):
    one forward pass of the model, then ``loss_fn`` on its logits."""
    loss_fn = loss_fn or nn.CrossEntropyLoss()

    def compute_loss(
        model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(inputs)
        return loss_fn(logits, labels), logits

    return compute_loss


@dataclass(frozen=True)
class StepInfo:
    """What one optimiser step did. ``step`` counts completed steps since the run began."""

    step: int
    epoch: int
    steps_per_epoch: int
    loss: float
    correct: int
    samples: int
    lr: float

    @property
    def epoch_done(self) -> bool:
        return self.step % self.steps_per_epoch == 0


# a callback gets each StepInfo; returning True stops training after that step
StepCallback = Callable[[StepInfo], bool | None]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel/DataParallel wrapper (or the model)."""
    return getattr(model, "module", model)


def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell the sampler and the data set (for seeded augmentation) which epoch starts."""
    for part in (loader.sampler, getattr(loader.batch_sampler, "sampler", None), loader.dataset):
        if hasattr(part, "set_epoch"):
            part.set_epoch(epoch)


def train_steps(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    *,
    steps: int | None = None,
    epochs: float | None = None,
    start_step: int = 0,
    loss_fn: LossFn | None = None,
    compute_loss: ComputeLoss | None = None,
    device: torch.device | None = None,
    grad_clip: float | None = None,
    callback: StepCallback | None = None,
    progress: bool = True,
    desc: str = "train",
) -> dict[str, float]:
    """Train until ``steps`` optimiser steps (or ``epochs`` passes) have been done in total.

    The loss of a batch: ``compute_loss(model, inputs, labels) -> (loss, logits)`` runs
    the model on the batch itself (so it can add terms that need the inputs, such as
    distillation from a teacher, or a layer's activations), returning the scalar loss to
    minimise and the model's logits (used for the accuracy in :class:`StepInfo`).
    ``loss_fn(logits, labels)`` is the short form for losses of the logits alone; give at
    most one of the two (default: cross-entropy).

    ``start_step`` steps are taken as done already (resume): the loader is positioned
    at that step's epoch and batch. With a :class:`~maddnet.train.sampler.ResumableSampler`
    the skipped batches are never loaded; with other samplers they are loaded and dropped.
    ``scheduler.step()`` is called after every optimiser step (schedules are per step).
    Returns the mean loss and top-1 accuracy over the steps run in this call.
    """
    if loss_fn is not None and compute_loss is not None:
        raise ValueError("give at most one of loss_fn= and compute_loss=")
    steps_per_epoch, total = _step_budget(loader, steps, epochs)
    device = device or model_device(model)
    compute_loss = compute_loss or logits_loss(loss_fn)
    model.train()
    step, stop = start_step, False
    loss_sum, correct_sum, sample_sum = 0.0, 0, 0
    bar = tqdm(
        total=total, initial=start_step, disable=not progress, desc=desc, dynamic_ncols=True, mininterval=1.0
    )
    while step < total and not stop:
        epoch = step // steps_per_epoch
        for inputs, labels in _batches_from(loader, step, steps_per_epoch):
            batch = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            loss_value, correct, lr = _optimizer_step(
                model, optimizer, scheduler, compute_loss, *batch, grad_clip
            )
            step += 1
            info = StepInfo(step, epoch, steps_per_epoch, loss_value, correct, labels.shape[0], lr)
            loss_sum += info.loss * info.samples
            correct_sum += info.correct
            sample_sum += info.samples
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", epoch=epoch, refresh=False)
            stop = callback is not None and bool(callback(info))
            if stop or step >= total or step % steps_per_epoch == 0:
                break
    bar.close()
    return {
        "loss": loss_sum / max(sample_sum, 1),
        "top1": correct_sum / max(sample_sum, 1),
        "steps": step - start_step,
    }


def _step_budget(loader: DataLoader, steps: int | None, epochs: float | None) -> tuple[int, int]:
    """(batches per epoch, total steps) for ``steps=`` or ``epochs=`` (exactly one given)."""
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError("the loader yields no batches (data set smaller than one batch?)")
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps= or epochs=")
    return steps_per_epoch, steps if steps is not None else int(round(epochs * steps_per_epoch))


def _batches_from(loader: DataLoader, step: int, steps_per_epoch: int) -> Iterator:
    """The loader's batches from ``step`` (counted from the start of the run) to the end
    of that step's epoch. A ResumableSampler starts at the batch; other samplers load the
    batches before it, which are dropped."""
    epoch, offset = divmod(step, steps_per_epoch)
    set_loader_epoch(loader, epoch)
    if offset and hasattr(loader.sampler, "set_start") and loader.batch_size is not None:
        loader.sampler.set_start(offset * loader.batch_size)
        offset = 0
    return itertools.islice(loader, offset, None)


def _optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    compute_loss: ComputeLoss,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    grad_clip: float | None,
) -> tuple[float, int, float]:
    """One optimiser (and scheduler) step on a batch: (loss, correct top-1, lr used)."""
    loss, logits = compute_loss(model, inputs, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    lr = optimizer.param_groups[0]["lr"]
    if scheduler is not None:
        scheduler.step()
    with torch.no_grad():
        correct = int((logits.argmax(dim=1) == labels).sum())
    return float(loss.detach()), correct, lr


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    *,
    device: torch.device | None = None,
    loss_fn: LossFn | None = None,
    progress: bool = False,
    desc: str = "eval",
    reduce: bool = True,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (fractions in [0, 1]) and mean loss over ``loader``.

    Under torch.distributed each process evaluates its shard and the sums are added
    over processes, so all get the numbers of the whole data set; ``reduce=False`` keeps
    this process's numbers (each process evaluates a different model on all the data).
    The model's train/eval mode is restored afterwards.
    """
    model = unwrap(model)
    device = device or model_device(model)
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    was_training = model.training
    model.eval()
    loss_sum, top1, top5, count = 0.0, 0, 0, 0
    for inputs, labels in tqdm(loader, disable=not progress, desc=desc, dynamic_ncols=True, leave=False):
        inputs = inputs.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        logits = model(inputs)
        loss_sum += float(loss_fn(logits, labels)) * labels.shape[0]
        c1, c5 = topk_correct(logits, labels, (1, 5))
        top1 += c1
        top5 += c5
        count += labels.shape[0]
    model.train(was_training)
    if reduce:
        loss_sum, top1, top5, count = all_reduce_sum([loss_sum, top1, top5, count], device)
    if count == 0:
        raise ValueError("evaluate got an empty loader")
    return {"top1": top1 / count, "top5": top5 / count, "loss": loss_sum / count, "samples": int(count)}
