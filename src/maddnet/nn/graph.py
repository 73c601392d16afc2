"""The data-flow graph of a converted model, as the inter-layer passes need it.

:func:`trace` records a converted model with ``torch.fx`` (MADD layers and ``torch.nn``
modules kept as leaves, so each is one ``call_module`` node). :func:`producer_chains` finds,
for every MADD layer, the chain of per-channel ops (BatchNorm, activations, dropout,
identity, max pooling) between the layer and the value it reads, stopping where a value has
another reader (a residual add, a concatenation, a second layer): a pass may fold an op into
the layer only when the layer's encoder is the only reader of everything the op computes.

Models that ``torch.fx`` cannot trace (data-dependent control flow, unsupported Python)
raise :class:`GraphError` with fx's reason; the passes then leave the model alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .layers import MaddLayer

# elementwise ops an encoder's thresholds can absorb (monotonic per channel)
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.GELU, nn.Hardswish)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
# identities in eval mode
PASS_THROUGH = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)
# keep every channel separate but are not elementwise
CHANNEL_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)


class GraphError(RuntimeError):
    """The model's data flow could not be recorded (the reason is fx's)."""


class _LeafTracer(fx.Tracer):
    """Records MADD layers (and, as fx does by default, ``torch.nn`` modules) as one call each."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, MaddLayer) or super().is_leaf_module(m, module_qualified_name)


def check_pass_input(model: nn.Module, what: str) -> None:
    """Refuse ``model`` when it has no MADD layer, is in train mode, or a MADD layer is
    inference-only (its float LUT dropped, e.g.
    loaded from ``save_converted(..., for_inference=True)``): the passes rewrite LUT columns
    and rows, which needs the float LUT.

    Raises:
        ValueError: naming the problem (the layers and the call that gives them their float
            LUT back, for inference-only ones).
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MaddLayer)]
    if not layers:
        raise ValueError(f"{what}: the model has no MADD layer; convert it first (maddnet.nn.convert)")
    if model.training:
        raise ValueError(
            f"{what}: the model is in train mode; call model.eval() first (the passes fold BatchNorm "
            "running statistics and keep eval-mode outputs)"
        )
    names = [n for n, m in layers if not m.has_float_lut]
    if names:
        raise ValueError(
            f"{what}: layer(s) {', '.join(names)} are inference-only (no float LUT); call "
            "restore_float_lut() on them (or load a full save_converted file) first"
        )


def trace(model: nn.Module, example: torch.Tensor | None = None) -> fx.GraphModule:
    """The fx graph of ``model`` (its submodules are shared, not copied).

    Args:
        model: a (converted) model.
        example: an input batch; when given, every node gets ``node.meta["tensor_meta"]``
            (its output's shape and dtype) from one eager run in eval mode, without gradients.

    Raises:
        GraphError: fx cannot trace the model (the message names the model class and fx's
            reason).
    """
    gm = _trace(model, train=False)
    if example is not None:
        try:
            _propagate(gm, model, example)
        except Exception:  # noqa: BLE001 (retried below; a second failure is raised)
            # eval-mode caches (e.g. timm LeViT's attention-bias cache) trace into graphs
            # that cannot run; the train-mode branch computes the same values
            gm = _trace(model, train=True)
            try:
                _propagate(gm, model, example)
            except Exception as error:
                raise GraphError(f"the fx graph of {type(model).__name__} does not run: {error}") from error
    return gm


def _trace(model: nn.Module, train: bool) -> fx.GraphModule:
    was_training = model.training
    model.train(train)
    try:
        graph = _LeafTracer().trace(model)
    except Exception as error:  # fx raises many types (TraceError, TypeError, ...)
        raise GraphError(f"torch.fx cannot trace {type(model).__name__}: {error}") from error
    finally:
        model.train(was_training)
    return fx.GraphModule(model, graph)


def _propagate(gm: fx.GraphModule, model: nn.Module, example: torch.Tensor) -> None:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example)
    finally:
        model.train(was_training)


def call_counts(gm: fx.GraphModule) -> dict[str, int]:
    """How often each module (by its first name) is called in the graph."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts


def module_of(gm: fx.GraphModule, node: Any) -> nn.Module | None:
    """The module a ``call_module`` node calls, else None."""
    if isinstance(node, fx.Node) and node.op == "call_module":
        return gm.get_submodule(node.target)
    return None


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    """The output shape recorded by :func:`trace` with an example, else None."""
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


@dataclass
class Chain:
    """The per-channel ops between a MADD layer and the value it reads.

    ``ops``: the ``call_module`` nodes, nearest the layer first, each the only reader of
    the value before it and called once in the graph. ``stop``: why the chain ends (the
    node that feeds it has another reader, is not a per-channel op, ...)."""

    layer: fx.Node
    ops: list[fx.Node] = field(default_factory=list)
    stop: str = ""


def producer_chains(gm: fx.GraphModule) -> dict[str, Chain]:
    """``{MADD layer name: Chain}`` for every MADD layer called once in the graph."""
    counts = call_counts(gm)
    chains: dict[str, Chain] = {}
    for node in gm.graph.nodes:
        if not isinstance(module_of(gm, node), MaddLayer) or counts[node.target] != 1:
            continue
        chain = Chain(node)
        value = node.args[0] if node.args else None
        reader = node
        while True:
            if not isinstance(value, fx.Node):
                chain.stop = "the layer's input is not a traced value"
                break
            others = [u.name for u in value.users if u is not reader]
            module = module_of(gm, value)
            if others:
                chain.stop = f"{value.name} is also read by {', '.join(others)}"
                break
            if not isinstance(module, ACTIVATIONS + BATCHNORMS + PASS_THROUGH + (nn.MaxPool2d,)):
                chain.stop = f"{value.name} ({value.op} {value.target}) is not a per-channel op"
                break
            if counts[value.target] != 1:
                chain.stop = f"module {value.target} is called {counts[value.target]} times"
                break
            chain.ops.append(value)
            reader, value = value, value.args[0] if value.args else None
        chains[node.target] = chain
    return chains
