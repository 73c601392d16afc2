"""Conversion plans: what it takes to rebuild a converted model's structure without data.

A plan (JSON-friendly, saved beside the state_dict) has

* ``"format"``: :data:`PLAN_FORMAT`;
* ``"passes"``: the structural passes applied to the model after (or besides) the MADD
  swaps, in order, each ``{"pass": name, ...record}``: a registered replay function redoes
  the pass's structural change (e.g. a BatchNorm replaced by ``nn.Identity``, a conv
  rebuilt with fewer channels) on a fresh model; values come from the state_dict;
* ``"layers"``: ``{name: {"kind": ..., "config": ...}}`` of every MADD layer as it is at
  save time (configs taken from the live layers, so later changes of a layer are kept).
  A layer registered under several names (a shared module: weight tying, a block reused
  twice) has one entry under its first name (``named_modules()`` order) with
  ``"aliases": [other names]``; :func:`rebuild` swaps one layer in at all of them.

:func:`rebuild` replays the passes in order, then swaps zero-initialised MADD layers in.
A pass registers its replay with :func:`register_pass` and logs itself on the model with
:func:`record_pass`. Plans of format 1 (a bare ``{name: {"kind", "config"}}``) load as
plans with no passes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._atomic import atomic_torch_save
from .layers import _MaddLayer
from .mapping import LAYER_TYPES

PLAN_FORMAT = 2
_PASS_LOG_ATTR = "_maddnet_passes"  # list of pass records on the model object (not state)
PassReplay = Callable[[nn.Module, dict[str, Any]], None]
_PASSES: dict[str, PassReplay] = {}


def register_pass(name: str, replay: PassReplay) -> None:
    """Make the structural pass ``name`` replayable: ``replay(model, record)`` redoes it."""
    if not name or name in ("layers", "format"):
        raise ValueError(f"invalid pass name {name!r}")
    _PASSES[name] = replay


def record_pass(model: nn.Module, name: str, record: dict[str, Any]) -> None:
    """Log that pass ``name`` (registered) changed ``model``'s structure as ``record`` says."""
    if name not in _PASSES:
        raise ValueError(f"pass {name!r} is not registered (maddnet.nn.plan.register_pass)")
    log = getattr(model, _PASS_LOG_ATTR, None)
    if log is None:
        log = []
        object.__setattr__(model, _PASS_LOG_ATTR, log)  # not a submodule, not state
    log.append({"pass": name, **record})


def madd_layers(model: nn.Module) -> dict[str, _MaddLayer]:
    """``{name: layer}`` of the MADD layers in ``model``, each layer once (a shared layer
    under its first name; :func:`module_names` has all of them)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _MaddLayer)}


def module_names(model: nn.Module) -> dict[int, list[str]]:
    """``{id(module): names}``: every name each submodule is registered under, first the one
    ``named_modules()`` gives it. A module shared by two attributes or parents (weight tying,
    a block used twice) has several; ``named_modules()`` alone lists it once."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def conversion_plan(model: nn.Module) -> dict[str, Any]:
    """The plan of ``model`` (see the module docstring): enough to rebuild it from a fresh one."""
    names = module_names(model)
    layers = {}
    for name, m in madd_layers(model).items():
        entry = {"kind": m.kind, "config": m.get_config()}
        aliases = [n for n in names[id(m)] if n != name]
        if aliases:
            entry["aliases"] = aliases
        layers[name] = entry
    return {
        "format": PLAN_FORMAT,
        "passes": [dict(record) for record in getattr(model, _PASS_LOG_ATTR, [])],
        "layers": layers,
    }


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) with ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def replace_module(
    model: nn.Module, name: str, module: nn.Module, names: dict[int, list[str]] | None = None
) -> list[str]:
    """Swap ``module`` in for the submodule called ``name`` at *every* name that submodule is
    registered under (so a shared module stays one module); returns those names.
    ``names``: :func:`module_names` of ``model``, if already at hand."""
    old = model.get_submodule(name)
    everywhere = (module_names(model) if names is None else names).get(id(old), [name])
    for alias in everywhere:
        set_submodule(model, alias, module)
    if isinstance(module, _MaddLayer):
        module.placed_as = everywhere[0]  # its errors name it
    return everywhere


def _normalise(plan: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(plan, dict):
        raise ValueError(f"a conversion plan is a dict, got {type(plan).__name__}")
    if "format" not in plan:  # format 1: {name: {"kind", "config"}}
        return {"format": 1, "passes": [], "layers": plan}
    if plan["format"] > PLAN_FORMAT:
        raise ValueError(f"plan format {plan['format']} is newer than this maddnet reads ({PLAN_FORMAT})")
    return plan


def rebuild(model: nn.Module, plan: dict[str, Any]) -> nn.Module:
    """Apply ``plan`` to a freshly built dense ``model`` (in place): replay its passes, then
    swap zero-initialised MADD layers in. Load the saved state_dict next.

    Raises ``ValueError`` naming the layer or pass that does not fit the model.
    """
    plan = _normalise(plan)
    for record in plan["passes"]:
        name = record.get("pass")
        if name not in _PASSES:
            raise ValueError(
                f"plan has pass {name!r}, which this maddnet does not know; known: {sorted(_PASSES)}"
            )
        _PASSES[name](model, record)
        record_pass(model, name, {k: v for k, v in record.items() if k != "pass"})
    names = module_names(model)
    for name, entry in plan["layers"].items():
        kind = entry.get("kind")
        if kind not in LAYER_TYPES:
            raise ValueError(
                f"plan entry {name!r} has unknown kind {kind!r}; expected one of {sorted(LAYER_TYPES)}"
            )
        try:
            dense = model.get_submodule(name)
        except AttributeError as error:
            raise ValueError(f"plan entry {name!r} names no module of the model") from error
        _check_names(name, entry, names.get(id(dense), [name]), dense)
        config = dict(entry["config"])
        _check_matches(name, dense, kind, config)
        layer = LAYER_TYPES[kind].from_config(
            config, device=next(iter(dense.parameters()), torch.empty(0)).device
        )
        layer.train(dense.training)
        replace_module(model, name, layer, names)
    return model


def _check_names(name: str, entry: dict[str, Any], model_names: list[str], dense: nn.Module) -> None:
    """A shared layer must be shared in the fresh model too: the names the saved layer had
    (its plan name and ``aliases``) against the names the model registers its dense module
    under. Plans without ``aliases`` (older ones) only must not name one module twice."""
    if isinstance(dense, _MaddLayer):
        raise ValueError(
            f"plan entry {name!r} names a module that an earlier plan entry already replaced: the "
            "model registers one module under both names, the saved model had two layers there"
        )
    if "aliases" in entry and {name, *entry["aliases"]} != set(model_names):
        raise ValueError(
            f"plan entry {name!r} is one layer registered as {sorted({name, *entry['aliases']})}, but "
            f"the model registers that module as {sorted(model_names)}: the model does not share "
            "modules as the saved one did"
        )


def _check_matches(name: str, dense: nn.Module, kind: str, config: dict[str, Any]) -> None:
    """The saved layer's shape (plan config) against the fresh model's dense module."""
    if kind == "linear":
        ok = isinstance(dense, nn.Linear) and (dense.in_features, dense.out_features) == (
            config.get("in_features"),
            config.get("out_features"),
        )
    else:
        ok = isinstance(dense, nn.Conv2d) and (
            dense.in_channels,
            dense.out_channels,
            list(dense.kernel_size),
        ) == (config.get("in_channels"), config.get("out_channels"), list(config.get("kernel_size", ())))
    if not ok:
        raise ValueError(
            f"layer {name!r} of the model ({dense}) does not match the saved {kind} layer {config}"
        )


def save_converted(model: nn.Module, path: str | os.PathLike, for_inference: bool = False) -> None:
    """``torch.save`` the conversion plan and the state_dict of a converted model.

    ``for_inference``: store what inference reads only: MADD layers with an integer LUT are
    saved without their float LUT (``layer.drop_float_lut()``, a quarter of the LUT bytes at
    8 bits); ``model`` itself is not changed. The loaded model gives the same eval outputs
    bit for bit; its layers are inference-only until ``restore_float_lut()``.
    """
    plan = conversion_plan(model)
    state = model.state_dict()
    if for_inference:
        names = module_names(model)
        for name, layer in madd_layers(model).items():
            if layer.lut_bits is None or not layer.has_float_lut:
                continue
            plan["layers"][name]["config"]["float_lut"] = False
            for alias in names[id(layer)]:
                state.pop(f"{alias}.lut" if alias else "lut", None)
    atomic_torch_save({"plan": plan, "state_dict": state}, path, "converted model")


def load_converted(
    model: nn.Module, path: str | os.PathLike, map_location: str | torch.device | None = None
) -> nn.Module:
    """Load :func:`save_converted` output into a freshly built dense ``model`` (in place).

    Files written by earlier maddnet versions (format 1 plans, the tree's tensors on the
    layer) load too."""
    from maddnet.models.weights import read_checkpoint

    saved = read_checkpoint(path, map_location=map_location, weights_only=True)
    if not isinstance(saved, dict) or "plan" not in saved or "state_dict" not in saved:
        raise ValueError(f"{path} is not a converted model saved by maddnet.nn.save_converted")
    rebuild(model, saved["plan"])
    model.load_state_dict(saved["state_dict"])
    return model
