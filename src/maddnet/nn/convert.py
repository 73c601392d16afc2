"""Model conversion in the shape of torch.ao post-training quantisation.

::

    prepare(model, MaddConfig())          # hooks record input rows of the chosen layers
    for x, _ in calibration_loader:       # calibrate
        model(x)
    convert(model)                        # learn each layer, swap it in place

    convert(model, calibration_loader, MaddConfig())   # the same in one call

Layer by layer (the retraining pipeline replaces one layer at a time, learning it from
what the partly converted network produces)::

    rows = record_inputs(model, ["layer1.0.conv1"], loader)["layer1.0.conv1"]
    convert_layer(model, "layer1.0.conv1", rows, config)

Saving: ``save_converted(model, path)`` stores the conversion plan (each MADD layer's
config) with the state_dict; ``load_converted(build_dense_model(), path)`` rebuilds the
skeleton from the plan (no data) and loads the weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import MaddConfig, input_dim
from .layers import MaddConv2d, MaddLinear, _MaddLayer
from .recording import RowRecorder, capacity_for, record_hook

_PREPARED_ATTR = "_maddnet_prepared"
LAYER_TYPES: dict[str, type[_MaddLayer]] = {"linear": MaddLinear, "conv2d": MaddConv2d}
ForwardFn = Callable[[nn.Module, Any], Any]


@dataclass
class _Prepared:
    config: MaddConfig
    recorders: dict[str, RowRecorder]
    handles: list = field(default_factory=list)

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


# ---------------------------------------------------------------------- prepare / calibrate
def prepare(model: nn.Module, config: MaddConfig | None = None) -> nn.Module:
    """Attach row recorders to the layers ``config`` selects (in place); returns ``model``."""
    config = config or MaddConfig()
    if getattr(model, _PREPARED_ATTR, None) is not None:
        raise RuntimeError("model is already prepared; call convert(model) or unprepare(model) first")
    layers = config.select(model)
    prepared = _Prepared(config, {})
    for index, (name, module) in enumerate(layers.items()):
        capacity = capacity_for(input_dim(module), config.max_rows, config.max_bytes_per_layer)
        recorder = RowRecorder(capacity, seed=config.seed + index)
        prepared.recorders[name] = recorder
        prepared.handles.append(module.register_forward_pre_hook(record_hook(recorder, module)))
    object.__setattr__(model, _PREPARED_ATTR, prepared)  # not a submodule / state
    return model


def unprepare(model: nn.Module) -> nn.Module:
    """Remove the recorders of :func:`prepare` without converting."""
    prepared = getattr(model, _PREPARED_ATTR, None)
    if prepared is not None:
        prepared.remove_hooks()
        object.__delattr__(model, _PREPARED_ATTR)
    return model


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Sequence) and not isinstance(batch, torch.Tensor):
        batch = batch[0]  # (inputs, targets) pairs
    if isinstance(batch, dict):
        return model(**batch)
    return model(batch)


def calibrate(model: nn.Module, loader: Iterable, forward_fn: ForwardFn | None = None) -> None:
    """Run ``loader``'s batches through ``model`` in eval mode without gradients.

    Batches are ``inputs``, ``(inputs, targets, ...)`` or a dict of keyword inputs; pass
    ``forward_fn(model, batch)`` for anything else. The model's train/eval mode is restored.
    """
    forward_fn = forward_fn or _default_forward
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                forward_fn(model, batch)
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------- convert
def convert(
    model: nn.Module,
    calibration_loader: Iterable | None = None,
    config: MaddConfig | None = None,
    forward_fn: ForwardFn | None = None,
) -> nn.Module:
    """Learn every selected layer from its recorded rows and swap it in (in place).

    With a ``calibration_loader`` this prepares (with ``config``) and calibrates first;
    without one the model must have been prepared and calibrated.
    """
    prepared = getattr(model, _PREPARED_ATTR, None)
    if calibration_loader is not None:
        if prepared is None:
            prepare(model, config)
            prepared = getattr(model, _PREPARED_ATTR)
        calibrate(model, calibration_loader, forward_fn)
    if prepared is None:
        raise RuntimeError(
            "model is not prepared: call prepare(model, config) and run calibration batches, "
            "or pass a calibration_loader to convert()"
        )
    if config is not None and config is not prepared.config:
        raise ValueError("convert() got a config different from the one the model was prepared with")
    # Check every layer before changing any, so a failure leaves the model as it was.
    for name, recorder in prepared.recorders.items():
        _check_rows(name, recorder.rows(), prepared.config)
    prepared.remove_hooks()
    object.__delattr__(model, _PREPARED_ATTR)
    for name, recorder in prepared.recorders.items():
        convert_layer(model, name, recorder.rows(), prepared.config)
    return model


def _check_rows(name: str, rows: torch.Tensor | None, config: MaddConfig) -> None:
    if rows is None or rows.shape[0] == 0:
        raise RuntimeError(
            f"no calibration data recorded for layer {name!r}: run batches through the "
            "prepared model (or pass calibration_loader) before convert()"
        )
    needed = max(config.min_rows, config.nprototypes)
    if rows.shape[0] < needed:
        raise ValueError(
            f"layer {name!r} has {rows.shape[0]} recorded rows, fewer than the {needed} needed "
            "(MaddConfig.min_rows); calibrate on more data"
        )


def learn_layer(name: str, module: nn.Module, rows: torch.Tensor, config: MaddConfig) -> _MaddLayer:
    """A MADD layer learned from dense ``module`` and its input ``rows`` (N, D)."""
    _check_rows(name, rows, config)
    kwargs = {
        "ncodebooks": config.codebooks_for(name, module),
        "nprototypes": config.nprototypes,
        "lut_bits": config.lut_bits,
        "lut_granularity": config.lut_granularity,
        "ridge": config.ridge,
        "ncandidates": config.ncandidates,
        "qat": config.qat,
        "temperature": config.temperature,
        "surrogate": config.surrogate,
    }
    if type(module) is nn.Linear:
        return MaddLinear.from_dense(module, rows, **kwargs)
    if type(module) is nn.Conv2d:
        return MaddConv2d.from_dense(module, rows, **kwargs)
    raise TypeError(
        f"layer {name!r} is a {type(module).__name__}; only nn.Linear and nn.Conv2d can be "
        "converted to MADD layers"
    )


def convert_layer(
    model: nn.Module, name: str, rows: torch.Tensor, config: MaddConfig | None = None
) -> _MaddLayer:
    """Learn the layer called ``name`` from ``rows`` (N, D) and swap it in; returns it.

    ``rows`` may live on any device; learning runs there, the layer lands on the dense
    layer's device.
    """
    config = config or MaddConfig()
    module = model.get_submodule(name)
    layer = learn_layer(name, module, rows, config)
    layer.train(module.training)
    set_submodule(model, name, layer)
    return layer


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) with ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def record_inputs(
    model: nn.Module,
    names: Sequence[str],
    loader: Iterable,
    max_rows: int | None = None,
    config: MaddConfig | None = None,
    forward_fn: ForwardFn | None = None,
) -> dict[str, torch.Tensor]:
    """Input rows of the named layers on ``loader``'s batches: ``{name: (N, D) CPU rows}``.

    Bounded like :func:`prepare` (``max_rows`` overrides ``config.max_rows``). The model
    runs as it is now, e.g. with some layers already converted.
    """
    config = config or MaddConfig()
    max_rows = config.max_rows if max_rows is None else max_rows
    recorders, handles = {}, []
    try:
        for index, name in enumerate(names):
            module = model.get_submodule(name)
            if type(module) not in (nn.Linear, nn.Conv2d):
                raise TypeError(f"layer {name!r} is a {type(module).__name__}, not nn.Linear / nn.Conv2d")
            capacity = capacity_for(input_dim(module), max_rows, config.max_bytes_per_layer)
            recorders[name] = RowRecorder(capacity, seed=config.seed + index)
            handles.append(module.register_forward_pre_hook(record_hook(recorders[name], module)))
        calibrate(model, loader, forward_fn)
    finally:
        for handle in handles:
            handle.remove()
    result = {}
    for name, recorder in recorders.items():
        rows = recorder.rows()
        if rows is None:
            raise RuntimeError(f"layer {name!r} saw no input while running the loader")
        result[name] = rows
    return result


# ---------------------------------------------------------------------- inspect / save
def madd_layers(model: nn.Module) -> dict[str, _MaddLayer]:
    """``{name: layer}`` of the MADD layers in ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _MaddLayer)}


def summary(model: nn.Module, print_fn: Callable[[str], Any] | None = print) -> str:
    """Table of the MADD layers (name, kind, D, M, C, K, LUT bits/bytes, encoder reads)."""
    header = ("name", "kind", "D", "M", "C", "K", "D/C", "lut_bits", "lut_bytes", "reads")
    rows = []
    total_bytes = total_reads = 0
    for name, layer in madd_layers(model).items():
        rows.append((
            name, layer.kind, layer.in_dim, layer.out_dim, layer.ncodebooks, layer.nprototypes,
            f"{layer.in_dim / layer.ncodebooks:.1f}", layer.lut_bits or "float",
            layer.lut_bytes, layer.encoder_reads,
        ))
        total_bytes += layer.lut_bytes
        total_reads += layer.encoder_reads
    rows.append(("total", f"{len(rows)} layers", "", "", "", "", "", "", total_bytes, total_reads))
    cells = [tuple(str(v) for v in row) for row in (header, *rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    def align(row: tuple[str, ...]) -> str:
        # name and kind left-aligned, numbers right-aligned
        cells = zip(row, widths, strict=True)
        return "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(cells))

    lines = [align(row) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    if print_fn is not None:
        print_fn(text)
    return text


def conversion_plan(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{name: {"kind": ..., "config": ...}}`` of every MADD layer: enough to rebuild them."""
    return {name: {"kind": m.kind, "config": m.get_config()} for name, m in madd_layers(model).items()}


def rebuild(model: nn.Module, plan: dict[str, dict[str, Any]]) -> nn.Module:
    """Swap zero-initialised MADD layers into a dense ``model`` following ``plan`` (in place).

    Each named layer must exist and match the plan's shapes; load the saved state_dict next.
    """
    for name, entry in plan.items():
        kind = entry.get("kind")
        if kind not in LAYER_TYPES:
            raise ValueError(
                f"plan entry {name!r} has unknown kind {kind!r}; expected one of {sorted(LAYER_TYPES)}"
            )
        dense = model.get_submodule(name)
        config = dict(entry["config"])
        _check_matches(name, dense, kind, config)
        device = next(iter(dense.parameters()), torch.empty(0)).device
        layer = LAYER_TYPES[kind].from_config(config, device=device)
        layer.train(dense.training)
        set_submodule(model, name, layer)
    return model


def _check_matches(name: str, dense: nn.Module, kind: str, config: dict[str, Any]) -> None:
    if kind == "linear":
        ok = isinstance(dense, nn.Linear) and (dense.in_features, dense.out_features) == (
            config["in_features"], config["out_features"])
    else:
        ok = isinstance(dense, nn.Conv2d) and (
            dense.in_channels,
            dense.out_channels,
            list(dense.kernel_size),
        ) == (config["in_channels"], config["out_channels"], list(config["kernel_size"]))
    if not ok:
        raise ValueError(
            f"layer {name!r} of the model ({dense}) does not match the saved {kind} layer {config}"
        )


def save_converted(model: nn.Module, path: str | os.PathLike) -> None:
    """``torch.save`` the conversion plan and the state_dict of a converted model."""
    torch.save({"plan": conversion_plan(model), "state_dict": model.state_dict()}, path)


def load_converted(
    model: nn.Module, path: str | os.PathLike, map_location: str | torch.device | None = None
) -> nn.Module:
    """Load :func:`save_converted` output into a freshly built dense ``model`` (in place)."""
    saved = torch.load(path, map_location=map_location, weights_only=True)
    rebuild(model, saved["plan"])
    model.load_state_dict(saved["state_dict"])
    return model
