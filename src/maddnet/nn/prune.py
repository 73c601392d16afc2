"""Compute only what the next MADD layer reads (``needed_inputs``, ``prune_unread``).

A tree encoder reads a few input columns (the split dims; 4 per codebook at K = 16), so a
MADD layer may read only some of its input channels. :func:`needed_inputs` reports, for every
MADD layer, the (channel, ky, kx) taps and the channels its encoder compares (levels whose
nodes all have constant outcomes, see :mod:`maddnet.nn.fuse`, read nothing), and, walking the
fx graph backwards, the output channels each producer (a MADD or dense conv / linear) must
compute: through per-channel ops (BatchNorm, activations, dropout, pooling, depthwise convs,
flatten of a 1x1 map) a channel set passes back unchanged; a value with several readers (a
residual add, a concatenation, two layers) needs the union; a reader that mixes channels (a
dense layer, an unknown op, the model output) needs all of them.

:func:`prune_unread` makes it real where a producer's output flows only through per-channel
modules into MADD layers: the producer computes only the needed channels (a MADD layer keeps
those LUT columns and bias entries; a dense conv / linear those weight rows), the per-channel
modules between are sliced to match (BatchNorm statistics, depthwise filters), and the
consumers' split dims are re-indexed. Outputs are unchanged: the removed channels were read
by nobody (bit for bit with float LUTs and with ``lut_granularity="column"`` integer LUTs; an
integer LUT of ``"codebook"`` granularity keeps the values it computed with: the kept
columns' float LUT becomes the de-quantised integer LUT, which re-quantises onto the same
grid, so outputs equal the unpruned ones up to the float32 rounding of the offsets, see
``_grid_lut``). The pass is recorded in the
conversion plan, so a pruned model saves and loads into a fresh skeleton.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx, nn

from .graph import (
    ACTIVATIONS,
    BATCHNORMS,
    CHANNEL_POOLS,
    PASS_THROUGH,
    call_counts,
    check_pass_input,
    module_of,
    trace,
)
from .layers import MaddConv2d, MaddLayer, MaddLinear
from .plan import module_names, record_pass, register_pass, replace_module

__all__ = ["needed_inputs", "prune_unread", "read_columns"]

# a need: (channel axis, sorted channel tuple) or None for "every channel"
Need = tuple[int, frozenset[int]] | None


def read_columns(layer: MaddLayer) -> torch.Tensor:
    """The input columns (sorted int64) the layer's tree encoder compares: the split dims of
    the levels with at least one node whose threshold is finite."""
    thr = layer.thresholds.detach()
    active = torch.stack(
        [torch.isfinite(thr[:, 2**d - 1 : 2 ** (d + 1) - 1]).any(1) for d in range(layer.depth)], dim=1
    )
    return torch.unique(layer.split_dims[active])


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels and m.groups > 1


def _per_channel(m: nn.Module) -> bool:
    return isinstance(m, ACTIVATIONS + BATCHNORMS + PASS_THROUGH + CHANNEL_POOLS) or _is_depthwise(m)


def _ndim(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    return len(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _layer_need(layer: MaddLayer, ndim: int | None) -> Need:
    cols = read_columns(layer)
    if isinstance(layer, MaddConv2d):
        kh, kw = layer.kernel_size
        return (1, frozenset((cols // (kh * kw)).tolist()))
    return (ndim - 1, frozenset(cols.tolist())) if ndim else None


def _need_from(gm: fx.GraphModule, user: fx.Node, node: fx.Node, need: dict[fx.Node, Need]) -> Need:
    """What ``user`` needs of ``node``'s output."""
    module = module_of(gm, user)
    first = user.args[0] if user.args else None
    if isinstance(module, MaddLayer):
        return _layer_need(module, _ndim(node)) if first is node else None
    if module is not None:
        if not _per_channel(module) or first is not node:
            return None
        out = need.get(user)
        if out is None or isinstance(module, ACTIVATIONS + PASS_THROUGH):
            return out
        return out if out[0] == 1 else None  # BatchNorm, pools, depthwise: channels on dim 1
    if user.op == "call_function" and user.target is torch.flatten and first is node:
        shape, start = _shape(node), (user.args[1] if len(user.args) > 1 else user.kwargs.get("start_dim", 0))
        out = need.get(user)
        if out is not None and shape is not None and start == 1 and all(s == 1 for s in shape[2:]):
            return (1, out[1]) if out[0] == 1 else None  # (N, C, 1, 1) -> (N, C): same index
        return None
    if user.op == "call_function" and user.target in (operator.add, torch.add, operator.mul, torch.mul):
        others = [a for a in user.args if a is not node]
        if _shape(node) is not None and all(
            _shape(a) == _shape(node) for a in others if isinstance(a, fx.Node)
        ):
            return need.get(user)
        return None
    return None


def _needs(gm: fx.GraphModule) -> dict[fx.Node, Need]:
    need: dict[fx.Node, Need] = {}
    for node in reversed(list(gm.graph.nodes)):
        if not node.users:
            need[node] = None
            continue
        total: Need = (0, frozenset())
        for user in node.users:
            part = _need_from(gm, user, node, need)
            if part is None or (total[1] and part[0] != total[0]):
                total = None
                break
            total = (part[0], total[1] | part[1])
        need[node] = total
    return need


def _producer_channels(module: nn.Module) -> tuple[int, int] | None:
    """(channel axis code: 1 conv / -1 linear, output channels) of a prunable producer."""
    if isinstance(module, MaddConv2d) or (isinstance(module, nn.Conv2d) and module.groups == 1):
        return 1, module.out_channels
    if isinstance(module, MaddLinear | nn.Linear):
        return -1, module.out_features
    return None


def needed_inputs(model: nn.Module, example: torch.Tensor) -> dict[str, Any]:
    """Per MADD layer the inputs its encoder reads; per producer the channels it must compute.

    Args:
        model: a converted model (tree encoders).
        example: an input batch (shapes tell flatten and residual adds apart; one forward
            pass in eval mode).

    Returns:
        JSON-friendly ``{"layers": {name: {"in_channels", "channels": [...], "taps":
        [[c, ky, kx], ...] (convs) or "features": [...] (linear)}}, "producers": {name:
        {"out_channels", "needed": [...] or None (all), "kind"}}}``.

    Raises:
        ValueError: a MADD layer is inference-only (no float LUT; named).
        GraphError: fx cannot trace ``model``.
    """
    gm = trace(model, example)
    need = _needs(gm)
    layers: dict[str, Any] = {}
    producers: dict[str, Any] = {}
    for node in gm.graph.nodes:
        module = module_of(gm, node)
        if isinstance(module, MaddLayer):
            cols = read_columns(module)
            if isinstance(module, MaddConv2d):
                kh, kw = module.kernel_size
                taps = torch.stack([cols // (kh * kw), (cols % (kh * kw)) // kw, cols % kw], 1)
                layers[node.target] = {
                    "in_channels": module.in_channels,
                    "channels": sorted(set((cols // (kh * kw)).tolist())),
                    "taps": taps.tolist(),
                }
            else:
                layers[node.target] = {"in_channels": module.in_features, "features": cols.tolist()}
        axis_out = _producer_channels(module) if module is not None else None
        if axis_out is not None:
            n = need.get(node)
            ndim = _ndim(node)
            axis = 1 if axis_out[0] == 1 else (ndim - 1 if ndim else None)
            ok = n is not None and axis is not None and n[0] == axis
            producers[node.target] = {
                "kind": type(module).__name__,
                "out_channels": axis_out[1],
                "needed": sorted(n[1]) if ok else None,
            }
    return {"layers": layers, "producers": producers}


# ---------------------------------------------------------------------- pruning
def _region(gm: fx.GraphModule, start: fx.Node, counts: dict[str, int]):
    """(per-channel module nodes, consumer MADD nodes) fed by ``start``, or a reason string."""
    channelwise, consumers, frontier = [], [], [start]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            module = module_of(gm, user)
            stateless = module is not None and not any(True for _ in module.state_dict())
            if module is None or (counts[user.target] != 1 and not stateless) or user.args[0] is not node:
                return f"{node.name} is read by {user.name} ({user.op} {user.target})"
            if isinstance(module, MaddLayer):
                consumers.append(user)
            elif _per_channel(module):
                channelwise.append(user)
                frontier.append(user)
            else:
                return f"{node.name} is read by {user.target} ({type(module).__name__}), which mixes channels"
    return channelwise, consumers


def _check_consumers(gm: fx.GraphModule, region, nkeep: int):
    """``region``, or why a consumer cannot read ``nkeep`` channels (C > its new D)."""
    for node in region[1]:
        layer = gm.get_submodule(node.target)
        taps = layer.kernel_size[0] * layer.kernel_size[1] if isinstance(layer, MaddConv2d) else 1
        if layer.ncodebooks > nkeep * taps:
            return (
                f"consumer {node.target} has C = {layer.ncodebooks} codebooks, more than the "
                f"{nkeep * taps} columns left"
            )
    return region


def _dense_spec(module: nn.Module) -> dict[str, Any]:
    """JSON spec of the dense module of ``module``'s (new) shape, for the plan's replay."""
    if isinstance(module, nn.Conv2d | MaddConv2d):
        return {
            "type": "conv2d",
            "in_channels": module.in_channels,
            "out_channels": module.out_channels,
            "kernel_size": list(module.kernel_size),
            "stride": list(module.stride),
            "padding": list(module.padding) if not isinstance(module.padding, str) else module.padding,
            "dilation": list(module.dilation),
            "groups": module.groups,
            "bias": module.bias is not None,
        }
    if isinstance(module, nn.Linear | MaddLinear):
        return {
            "type": "linear",
            "in_features": module.in_features,
            "out_features": module.out_features,
            "bias": module.bias is not None,
        }
    if isinstance(module, BATCHNORMS):
        return {
            "type": type(module).__name__,
            "num_features": module.num_features,
            "eps": module.eps,
            "momentum": module.momentum,
            "affine": module.affine,
            "track_running_stats": module.track_running_stats,
        }
    raise ValueError(f"no dense spec for {type(module).__name__}")


def _build(spec: dict[str, Any], device) -> nn.Module:
    spec = dict(spec)
    kind = spec.pop("type")
    if kind == "conv2d":
        return nn.Conv2d(**spec, device=device)
    if kind == "linear":
        return nn.Linear(**spec, device=device)
    if kind in ("BatchNorm1d", "BatchNorm2d"):
        return getattr(nn, kind)(**spec, device=device)
    raise ValueError(f"prune_unread pass: unknown module type {kind!r} in the plan")


def _grid_lut(layer: MaddLayer) -> torch.Tensor:
    """The float LUT to slice: for a codebook-granular integer LUT, the values it represents.

    The integer LUT is what the layer computes (and, with QAT, what it was trained
    through). With ``lut_granularity="codebook"`` its offsets and shared scale come from
    all M columns, so re-quantising the trained float LUT's kept columns would round every
    entry onto another grid (up to a point of accuracy lost on DS-CNN). The represented
    values ``q / scale + offset`` instead lie on the old grid, and re-quantising any subset
    of columns gives the same values: the new offset is one of them and the new
    power-of-two scale is the old one or finer by a power of two. The kept columns' float
    LUT therefore becomes the de-quantised one (what later fine-tuning starts from), and
    outputs equal the unpruned ones up to the float32 rounding of the offsets. Column
    granularity slices exactly as it is (per-column offsets and scales); a float16 /
    bfloat16 LUT that cannot hold the represented values exactly keeps its trained values
    (and is re-quantised).
    """
    lut = layer.lut.detach()
    qlut = layer.quantized_lut()
    if qlut is None or layer.lut_granularity != "codebook":
        return lut
    represented = qlut.values.float() / qlut.scale + qlut.offsets[:, None, :]
    stored = represented.to(lut.dtype)
    return stored if torch.equal(stored.float(), represented) else lut


def _slice_out(module: nn.Module, keep: torch.Tensor) -> nn.Module:
    """``module`` computing only output channels ``keep`` (and, depthwise, reading them)."""
    device = keep.device
    if isinstance(module, MaddLayer):
        config = module.get_config()
        config["out_channels" if isinstance(module, MaddConv2d) else "out_features"] = len(keep)
        new = type(module).from_config(config, device=module.lut.device)
        state = module.state_dict()
        state["lut"] = _grid_lut(module)[:, :, keep]
        if module.bias is not None:
            state["bias"] = state["bias"][keep]
        for key in ("lut_q_values", "lut_q_offsets", "lut_q_scale"):
            state.pop(key, None)  # re-derived from the sliced float LUT
        new.load_state_dict(state, strict=False)
        new.train(module.training)
        return new
    if _is_depthwise(module) or isinstance(module, (nn.Conv2d, nn.Linear, *BATCHNORMS)):
        spec = _dense_spec(module)
        if spec["type"] == "conv2d":
            spec["out_channels"] = len(keep)
            if _is_depthwise(module):
                spec["in_channels"] = spec["groups"] = len(keep)
        elif spec["type"] == "linear":
            spec["out_features"] = len(keep)
        else:
            spec["num_features"] = len(keep)
        new = _build(spec, next(iter(module.state_dict().values())).device)
        state = {k: (v[keep] if v.dim() > 0 else v) for k, v in module.state_dict().items()}
        new.load_state_dict(state)
        new.train(module.training)
        return new.to(device)
    raise ValueError(f"cannot slice {type(module).__name__}")


def _reindex_consumer(layer: MaddLayer, keep: torch.Tensor) -> MaddLayer:
    """``layer`` reading an input that has only channels ``keep`` (sorted), same outputs."""
    config = layer.get_config()
    nin = layer.in_channels if isinstance(layer, MaddConv2d) else layer.in_features
    position = torch.zeros(nin, dtype=torch.int64, device=keep.device)
    position[keep] = torch.arange(len(keep), device=keep.device)
    dims = layer.split_dims
    if isinstance(layer, MaddConv2d):
        kh, kw = layer.kernel_size
        config["in_channels"] = len(keep)
        new_dims = position[dims // (kh * kw)] * (kh * kw) + dims % (kh * kw)
    else:
        config["in_features"] = len(keep)
        new_dims = position[dims]
    new = type(layer).from_config(config, device=layer.lut.device)
    state = layer.state_dict()
    state["encoder.split_dims"] = new_dims
    new.load_state_dict(state)
    new.train(layer.training)
    return new


def prune_unread(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """Make every producer compute only the channels the MADD layers after it read (in place;
    see the module docstring). A producer whose output has a reader that mixes channels or
    that is not a module called once (a residual add, a concatenation, a flatten) is left
    alone; the reasons are in the pass's recorded report.

    Args:
        model: a converted model (tree encoders).
        example: an input batch (shapes; forward passes in eval mode).

    Returns:
        ``model``; the recorded plan entry ``{"pass": "prune_unread", "modules": {name: dense
        spec}, "report": {"pruned": {producer: [kept, of]}, "left_alone": {producer: why}}}``.

    Raises:
        GraphError: fx cannot trace ``model``.
        ValueError: a consumer would end up with more codebooks than input columns (named).
    """
    check_pass_input(model, "prune_unread")
    specs: dict[str, dict[str, Any]] = {}
    pruned: dict[str, list[int]] = {}
    left_alone: dict[str, str] = {}
    while True:
        gm = trace(model, example)
        need, counts = _needs(gm), call_counts(gm)
        step = None
        for node in gm.graph.nodes:
            module = module_of(gm, node)
            info = _producer_channels(module) if module is not None else None
            if info is None or node.target in pruned or node.target in left_alone:
                continue
            n = need.get(node)
            if n is None or not n[1] or len(n[1]) >= info[1]:
                continue
            region = _region(gm, node, counts)
            if not isinstance(region, str):
                region = _check_consumers(gm, region, len(n[1]))
            if isinstance(region, str):
                left_alone[node.target] = region
                continue
            step = (node, n[1], region)
            break
        if step is None:
            break
        node, channels, (channelwise, consumers) = step
        device = next(iter(model.state_dict().values())).device
        keep = torch.tensor(sorted(channels), dtype=torch.int64, device=device)
        names = module_names(model)
        changed = {node.target: _slice_out(gm.get_submodule(node.target), keep)}
        for n in channelwise:
            changed[n.target] = _slice_out(gm.get_submodule(n.target), keep) if _has_channels(gm, n) else None
        for n in consumers:
            changed[n.target] = _reindex_consumer(gm.get_submodule(n.target), keep)
        for target, new in changed.items():
            if new is not None:
                replace_module(model, target, new, names)
                specs[target] = _dense_spec(new)
        pruned[node.target] = [len(keep), _producer_channels(module_of(gm, node))[1]]
    record_pass(
        model, "prune_unread", {"modules": specs, "report": {"pruned": pruned, "left_alone": left_alone}}
    )
    return model


def _has_channels(gm: fx.GraphModule, node: fx.Node) -> bool:
    module = module_of(gm, node)
    return isinstance(module, BATCHNORMS) or _is_depthwise(module)


def _replay(model: nn.Module, record: dict[str, Any]) -> None:
    names = module_names(model)
    for target, spec in record["modules"].items():
        try:
            old = model.get_submodule(target)
        except AttributeError as error:
            raise ValueError(f"prune_unread pass: the model has no module {target!r}") from error
        device = next(iter(old.state_dict().values()), torch.empty(0)).device
        replace_module(model, target, _build(spec, device), names)


register_pass("prune_unread", _replay)
