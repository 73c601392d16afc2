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
config and the structural passes applied, :mod:`maddnet.nn.plan`) with the state_dict;
``load_converted(build_dense_model(), path)`` rebuilds the skeleton from the plan (no
data) and loads the weights.

Which dense type becomes which MADD type, and which instances cannot be converted, is
:mod:`maddnet.nn.mapping`; every function here asks it.

A module registered under several names (``self.b = self.a``, a block used twice) is one
layer: it is selected, recorded (its hook sees every call site) and learned once, under its
first name, and the one MADD layer is swapped in at every name (:func:`~maddnet.nn.plan.replace_module`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import MaddConfig
from .diagnostics import _default_forward, dead_layers, has_batchnorm
from .layers import _MaddLayer
from .mapping import input_dim, kept_dense, madd_type_for, unsupported_reason
from .plan import madd_layers, module_names, replace_module
from .recording import RowRecorder, capacity_for, record_hook

_PREPARED_ATTR = "_maddnet_prepared"
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


def calibrate(model: nn.Module, loader: Iterable, forward_fn: ForwardFn | None = None) -> None:
    """Run ``loader``'s batches through ``model`` in eval mode without gradients.

    Batches are ``inputs``, ``(inputs, targets, ...)`` or a dict of keyword inputs; pass
    ``forward_fn(model, batch)`` for anything else. Every module's train/eval mode is
    restored (a model with some modules in eval mode, e.g. frozen BatchNorm, keeps them so).
    """
    forward_fn = forward_fn or _default_forward
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                forward_fn(model, batch)
    finally:
        for module, training in modes.items():
            module.training = training


def _keep_first(loader: Iterable, first: list) -> Iterable:
    for batch in loader:
        if not first:
            first.append(batch)
        yield batch


# ---------------------------------------------------------------------- convert
def convert(
    model: nn.Module,
    calibration_loader: Iterable | None = None,
    config: MaddConfig | None = None,
    forward_fn: ForwardFn | None = None,
    check_training: bool = True,
) -> nn.Module:
    """Learn every selected layer from its recorded rows and swap it in (in place).

    With a ``calibration_loader`` this prepares (with ``config``) and calibrates first;
    without one the model must have been prepared and calibrated. Then, with
    ``check_training``, a model with BatchNorm runs the first calibration batch once more in
    train mode (state restored) and a ``UserWarning`` names the MADD layers that training
    could not move (:func:`maddnet.nn.diagnostics.dead_layers`: calibration ran in eval mode,
    training normalises with batch statistics).
    """
    prepared = getattr(model, _PREPARED_ATTR, None)
    first: list = []
    if calibration_loader is not None:
        if prepared is None:
            prepare(model, config)
            prepared = getattr(model, _PREPARED_ATTR)
        calibrate(model, _keep_first(calibration_loader, first), forward_fn)
    if prepared is None:
        raise RuntimeError(
            "model is not prepared: call prepare(model, config) and run calibration batches, "
            "or pass a calibration_loader to convert()"
        )
    if config is not None and config is not prepared.config:
        raise ValueError("convert() got a config different from the one the model was prepared with")
    # Check and learn every layer before changing any, so a failure leaves the model as it
    # was (still prepared, its recorded rows kept: fix the cause and call convert again).
    for name, recorder in prepared.recorders.items():
        _check_rows(name, recorder.rows(), prepared.config)
    learned = {
        name: learn_layer(name, model.get_submodule(name), recorder.rows(), prepared.config)
        for name, recorder in prepared.recorders.items()
    }
    prepared.remove_hooks()
    object.__delattr__(model, _PREPARED_ATTR)
    names = module_names(model)
    warn_shared_parameters(model, list(learned))
    for name, layer in learned.items():
        layer.train(model.get_submodule(name).training)
        replace_module(model, name, layer, names)
    if check_training and first and has_batchnorm(model):
        _check_training(model, first[0], forward_fn)
    return model


def _check_training(model: nn.Module, batch: Any, forward_fn: ForwardFn | None) -> None:
    """:func:`~maddnet.nn.diagnostics.dead_layers` on one batch (it warns, naming the dead
    layers). A model that cannot run this batch in train mode (a batch of one through
    BatchNorm, a model that wants targets when training) is not checked: a warning says so."""
    try:
        dead_layers(model, [batch], train=True, forward_fn=forward_fn)
    except (RuntimeError, ValueError, TypeError, AssertionError) as error:
        warnings.warn(
            f"convert(): the dead-layer check could not run the first calibration batch in train "
            f"mode ({type(error).__name__}: {error}); call maddnet.nn.diagnostics.dead_layers(model, "
            "batches, forward_fn=...) yourself, or pass check_training=False",
            UserWarning,
            stacklevel=3,
        )


def _check_rows(name: str, rows: torch.Tensor | None, config: MaddConfig) -> None:
    if rows is None or rows.shape[0] == 0:
        raise RuntimeError(
            f"no calibration data recorded for layer {name!r}: run batches through the "
            "prepared model (or pass calibration_loader) before convert()"
        )
    needed = max(config.min_rows, config.spec.nprototypes)
    if rows.shape[0] < needed:
        raise ValueError(
            f"layer {name!r} has {rows.shape[0]} recorded rows, fewer than the {needed} needed "
            "(MaddConfig.min_rows); calibrate on more data (maddnet retrain / analyze: more "
            "--calib-batches or a larger --batch-size)"
        )


def learn_layer(name: str, module: nn.Module, rows: torch.Tensor, config: MaddConfig) -> _MaddLayer:
    """A MADD layer learned from dense ``module`` and its input ``rows`` (N, D).

    Raises ``ValueError`` / ``TypeError`` whose message starts with the layer's name.
    """
    _check_rows(name, rows, config)
    madd_type = madd_type_for(module)
    reason = unsupported_reason(module)
    if reason is not None:
        error = ValueError if madd_type is not None else TypeError
        raise error(f"layer {name!r} cannot be converted to a MADD layer: {reason}")
    try:
        return madd_type.from_dense(module, rows, config.codebooks_for(name, module), config.spec)
    except (ValueError, TypeError) as error:
        if str(error).startswith(f"layer {name!r}"):
            raise
        raise type(error)(f"layer {name!r}: {error}") from error


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
    warn_shared_parameters(model, [name])
    replace_module(model, name, layer)
    return layer


def warn_shared_parameters(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Warn about layers among ``names`` whose parameters other modules hold too (tied
    weights: ``head.weight = embed.weight``). The MADD layer's LUT is learned from the
    weight's value now; the other module keeps the dense parameter, so the tie ends (later
    updates of one do not reach the other). A layer shared as a whole module is not tied in
    this sense: it is replaced at all its names. Returns the warning lines."""
    owners: dict[int, list[str]] = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(pname)
    aliases = module_names(model)
    lines = []
    for name in names:
        module = model.get_submodule(name)
        own_prefixes = tuple(f"{alias}." for alias in aliases.get(id(module), [name]))
        for pname, param in module.named_parameters(recurse=False):
            others = [o for o in owners.get(id(param), []) if not o.startswith(own_prefixes)]
            if others:
                lines.append(
                    f"layer {name!r} shares its parameter {pname!r} with {others}: the MADD layer is "
                    "learned from its value now and the tie ends (the other module keeps the dense "
                    "parameter; later updates of one do not reach the other)"
                )
    for line in lines:
        warnings.warn(line, UserWarning, stacklevel=3)
    return lines


def record_inputs(
    model: nn.Module,
    names: Sequence[str],
    loader: Iterable,
    max_rows: int | None = None,
    config: MaddConfig | None = None,
    forward_fn: ForwardFn | None = None,
    seed_index: Mapping[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Input rows of the named layers on ``loader``'s batches: ``{name: (N, D) CPU rows}``.

    Bounded like :func:`prepare` (``max_rows`` overrides ``config.max_rows``). The model
    runs as it is now, e.g. with some layers already converted. A shared module is recorded
    once (the inputs of all its call sites); two names of it get the same rows. Each layer's
    row sample is seeded by ``config.seed`` plus its position in ``names``, or
    ``seed_index[name]`` when given (so that a layer gets the same rows whichever other
    layers are recorded with it).
    """
    config = config or MaddConfig()
    max_rows = config.max_rows if max_rows is None else max_rows
    recorders, handles = {}, []
    by_module: dict[int, RowRecorder] = {}  # one recorder per module: names of a shared one share it
    try:
        for index, name in enumerate(names):
            module = model.get_submodule(name)
            if id(module) in by_module:
                recorders[name] = by_module[id(module)]
                continue
            reason = unsupported_reason(module)
            if reason is not None:
                raise TypeError(f"layer {name!r} cannot be recorded for a MADD layer: {reason}")
            capacity = capacity_for(input_dim(module), max_rows, config.max_bytes_per_layer)
            seed = config.seed + (index if seed_index is None else seed_index[name])
            recorders[name] = by_module[id(module)] = RowRecorder(capacity, seed=seed)
            handles.append(module.register_forward_pre_hook(record_hook(recorders[name], module)))
        calibrate(model, loader, forward_fn)
    finally:
        for handle in handles:
            handle.remove()
    result, rows_of = {}, {}
    for name, recorder in recorders.items():
        rows = rows_of.setdefault(id(recorder), recorder.rows())
        if rows is None:
            raise RuntimeError(f"layer {name!r} saw no input while running the loader")
        result[name] = rows
    return result


# ---------------------------------------------------------------------- inspect
def summary(model: nn.Module, print_fn: Callable[[str], Any] | None = print) -> str:
    """Table of the MADD layers (name, kind, D, M, C, K, LUT bits/bytes, encoder reads).

    A shared layer is one row (counted once in the totals), named ``first (= other, ...)``."""
    header = ("name", "kind", "D", "M", "C", "K", "D/C", "lut_bits", "lut_bytes", "reads")
    rows = []
    total_bytes = total_reads = 0
    names = module_names(model)
    for name, layer in madd_layers(model).items():
        aliases = [n for n in names[id(layer)] if n != name]
        rows.append(
            (
                f"{name} (= {', '.join(aliases)})" if aliases else name,
                layer.kind,
                layer.in_dim,
                layer.out_dim,
                layer.ncodebooks,
                layer.nprototypes,
                f"{layer.in_dim / layer.ncodebooks:.1f}",
                layer.lut_bits or "float",
                layer.lut_bytes,
                layer.encoder_reads,
            )
        )
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
    lines += _kept_dense_lines(model)
    text = "\n".join(lines)
    if print_fn is not None:
        print_fn(text)
    return text


def _kept_dense_lines(model: nn.Module) -> list[str]:
    """The weight-multiplying modules still dense, with why, and the share of the weights
    (dense-equivalent D x M per MADD layer) that the MADD layers replace."""
    kept = kept_dense(model)
    if not kept:
        return []
    replaced = sum(layer.in_dim * layer.out_dim for layer in madd_layers(model).values())
    dense = sum(int(row["weights"]) for row in kept)
    share = 100 * replaced / max(replaced + dense, 1)
    lines = [
        "",
        f"kept dense ({len(kept)} modules, {dense} weights; {share:.1f} % of the weights are replaced):",
    ]
    lines += [f"  {row['name']} ({row['type']}, {row['weights']} weights): {row['reason']}" for row in kept]
    return lines
