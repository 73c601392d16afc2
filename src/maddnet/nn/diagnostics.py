"""Checks that a converted model can train: dead MADD layers, BatchNorm statistics.

A MADD layer's forward pass is the hard tree encoding; its thresholds, and every layer
before it, get gradients only through the surrogate ``p = (1 + tanh((x - v) / tau)) / 2``
of each tree node (:mod:`maddnet.nn.functional`). A row whose split value ``x`` lies many
temperatures ``tau`` away from the threshold ``v`` it is compared with adds (in float32
exactly) nothing. When (almost) all rows of a layer do, the layer is *dead*: training runs,
the loss moves through the LUTs and other layers, but its thresholds and the layers in
front of it (unless a skip connection bypasses it) learn nothing, silently.

The usual cause is a shift between the activations the layer was learned on and those it
gets while training: calibration runs in eval mode (BatchNorm normalises with its running
statistics), training in train mode (batch statistics). When the running statistics do not
describe the data (a randomly initialised model, or one trained on other data), the two
differ by orders of magnitude. :func:`reestimate_batchnorm` on the calibration data before
converting removes that shift.

* :func:`threshold_activity`: per MADD layer, the share of tree decisions (row, codebook,
  level, along each row's hard path) whose split value lies within ``width`` temperatures of
  the node's threshold, on some batches, in train mode by default (as training sees it).
* :func:`dead_layers`: the layers whose share is below ``min_share``, with a warning that
  names them and says what to do.
* :func:`reestimate_batchnorm`: BatchNorm running statistics re-estimated on batches (the
  cumulative average over them, as ``torch.optim.swa_utils.update_bn``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .encoders import TreeEncoderModule
from .layers import _MaddLayer
from .plan import madd_layers

#: A decision counts as live when ``|x - v| <= DEAD_WIDTH * tau``: there the surrogate's slope
#: is at least ``1 - tanh(3)^2 ~ 1%`` of its peak (it is exactly 0 in float32 beyond ~9 tau).
DEAD_WIDTH = 3.0
#: A layer is dead when fewer than this share of its decisions are live.
DEAD_SHARE = 0.01
_CHUNK_ROWS = 1 << 16  # rows of a linear layer gathered at once
_CHUNK_IMAGES = 8  # images of a conv gathered at once

ForwardFn = Callable[[nn.Module, Any], Any]


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Sequence) and not isinstance(batch, torch.Tensor):
        batch = batch[0]  # (inputs, targets) pairs
    if isinstance(batch, dict):
        return model(**batch)
    return model(batch)


def _count_live(layer: _MaddLayer, x: torch.Tensor, width: float) -> tuple[int, int]:
    """(live decisions, decisions) of the tree on the rows of one input ``x``."""
    encoder = layer.encoder
    thresholds, tau = encoder.thresholds.detach(), encoder.temperature.detach()
    x = x.detach()
    if layer.kind == "linear":
        chunks = x.reshape(-1, x.shape[-1]).split(_CHUNK_ROWS)
    else:  # a conv: whole images (unbatched input as it is)
        chunks = x.split(_CHUNK_IMAGES) if x.dim() == 4 else (x,)
    live = total = 0
    for chunk in chunks:
        values, _ = layer._gather(chunk)
        values = values.to(thresholds.dtype)  # (N, C, L)
        node = torch.zeros(values.shape[:2], dtype=torch.int64, device=values.device)
        for level in range(values.shape[2]):
            v = thresholds.gather(1, (node + (1 << level) - 1).T).T  # (N, C)
            margin = values[:, :, level] - v
            live += int((margin.abs() <= width * tau[:, level]).sum())
            node = 2 * node + (margin > 0).long()
        total += values.numel()
    return live, total


def _modes(model: nn.Module) -> dict[nn.Module, bool]:
    return {m: m.training for m in model.modules()}


def _restore_modes(modes: dict[nn.Module, bool]) -> None:
    for module, training in modes.items():
        module.training = training  # per module: a model with frozen (eval) parts keeps them


def threshold_activity(
    model: nn.Module,
    batches: Iterable,
    *,
    train: bool = True,
    width: float = DEAD_WIDTH,
    forward_fn: ForwardFn | None = None,
) -> dict[str, float]:
    """``{name: share}`` of the tree-encoded MADD layers: the share of their tree decisions
    (one per row, codebook and level, along the row's hard path) whose split value lies within
    ``width`` temperatures of the threshold it is compared with, on ``batches``.

    Runs the model in train mode (``train=True``, what training sees: BatchNorm with batch
    statistics, dropout on) or eval mode, without gradients; the model's buffers (BatchNorm
    running statistics), its modes and the random number generators are as before afterwards.
    A layer called several times (shared) counts all calls; a layer no batch reaches is left
    out. Batches as for :func:`~maddnet.nn.calibrate`.
    """
    forward_fn = forward_fn or _default_forward
    layers = madd_layers(model)
    layers = {name: layer for name, layer in layers.items() if isinstance(layer.encoder, TreeEncoderModule)}
    counts = {name: [0, 0] for name in layers}

    def hook(name: str):
        def count(module, args):
            live, total = _count_live(module, args[0], width)
            counts[name][0] += live
            counts[name][1] += total

        return count

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    modes = _modes(model)
    # what a forward pass may change (BatchNorm statistics); MADD layers' buffers it does not
    inside_madd = {id(b) for layer in madd_layers(model).values() for b in layer.buffers()}
    buffers = [(b, b.detach().clone()) for b in model.buffers() if id(b) not in inside_madd]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            model.train(train)
            for batch in batches:
                forward_fn(model, batch)
    finally:
        for handle in handles:
            handle.remove()
        _restore_modes(modes)
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
    return {name: live / total for name, (live, total) in counts.items() if total}


def dead_layers(
    model: nn.Module,
    batches: Iterable,
    *,
    train: bool = True,
    width: float = DEAD_WIDTH,
    min_share: float = DEAD_SHARE,
    forward_fn: ForwardFn | None = None,
    warn: bool = True,
) -> dict[str, float]:
    """``{name: share}`` of the MADD layers that would get (almost) no surrogate gradient:
    fewer than ``min_share`` of their tree decisions within ``width`` temperatures of their
    thresholds (:func:`threshold_activity`), in train mode by default. With ``warn``, a
    ``UserWarning`` names them and says what to do (:func:`dead_layer_message`)."""
    shares = threshold_activity(model, batches, train=train, width=width, forward_fn=forward_fn)
    dead = {name: share for name, share in shares.items() if share < min_share}
    if dead and warn:
        warnings.warn(dead_layer_message(dead, width, train), UserWarning, stacklevel=3)
    return dead


def dead_layer_message(dead: dict[str, float], width: float = DEAD_WIDTH, train: bool = True) -> str:
    """The warning of :func:`dead_layers` for ``{name: share}``."""
    listed = ", ".join(f"{name!r} ({100 * share:.2f}%)" for name, share in dead.items())
    mode = "train" if train else "eval"
    return (
        f"{len(dead)} MADD layer(s) get (almost) no threshold or input gradient in {mode} mode (share "
        f"of their tree decisions within {width:g} surrogate temperatures of the threshold): {listed}. "
        "Their inputs moved far from the ones they were learned on; the usual cause is BatchNorm "
        "running statistics that do not match the data (calibration runs in eval mode, training "
        "uses batch statistics). Fix: maddnet.nn.diagnostics.reestimate_batchnorm(model, "
        "calibration_batches) on the dense model, then convert (or relearn these layers)."
    )


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm with running statistics (train and eval mode differ)."""
    return bool(_batchnorms(model))


def reestimate_batchnorm(
    model: nn.Module, batches: Iterable, forward_fn: ForwardFn | None = None, max_batches: int | None = None
) -> int:
    """Re-estimate the running statistics of every BatchNorm in ``model`` on ``batches``.

    Statistics are reset and then averaged over the batches (cumulative average, momentum
    None while running), the model in train mode without gradients; the modules' modes and
    momenta are restored afterwards. Run it on the calibration data before converting, so
    that eval mode (calibration) and train mode (training) give the MADD layers the same
    inputs. Returns the number of BatchNorm modules updated (0: nothing ran).
    """
    forward_fn = forward_fn or _default_forward
    norms = _batchnorms(model)
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    modes = _modes(model)
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        with torch.no_grad():
            for index, batch in enumerate(batches):
                if max_batches is not None and index >= max_batches:
                    break
                forward_fn(model, batch)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        _restore_modes(modes)
    return len(norms)
