"""Fold BatchNorm and activations into the MADD layers next to them (``maddnet.nn.fuse``).

A tree encoder node sends a row right when ``v > t`` for the value ``v`` it reads. When
``v = g(u)`` for a per-channel function ``g`` that only this encoder reads, the node can
compare ``u`` instead:

* ``g`` non-decreasing (ReLU, ReLU6, hard-tanh, clamp, LeakyReLU with slope >= 0, BatchNorm
  with a positive scale): ``g(u) > t  <=>  u > t'`` with ``t'`` the largest float32 ``u``
  with ``g(u) <= t``, found by bisection over the float32 values in order, evaluating the
  module itself. So the fused compare gives the codes of the unfused one *for every finite
  float32 input*, bit for bit, with the rounding of the module's own arithmetic (not a
  real-number inverse).
* ``g`` non-increasing (BatchNorm with a negative scale): ``g(u) > t  <=>  not (u > t')``: the
  node's outcome is inverted, which is a swap of its two subtrees: the thresholds below it and
  the LUT rows (codes) under it are permuted.
* no ``u`` (or every ``u``) satisfies it (ReLU with ``t < 0``, ReLU6 with ``t >= 6``, a zero
  BatchNorm scale): the outcome is a constant; the node gets the threshold ``+inf`` (always
  left; always right = swap the subtrees, then ``+inf``), so its compare can be dropped. Such
  nodes are counted (``compares_removed``).
* GELU / Hardswish (minimum at ``u*``): exact where ``t >= 0`` (only the increasing branch
  reaches it) or ``t`` is below the minimum (constant); for ``min <= t < 0`` the exact form
  needs two compares (``u < a or u > b``); with ``approximate=True`` the node keeps ``u > b``
  and is counted (``approximate_nodes``); otherwise the activation is left alone.
* Max pooling between them commutes with a non-decreasing ``g``
  (``maxpool(g(u)) = g(maxpool(u))`` exactly) and stays in place.

BatchNorm *after* a MADD layer (the layer's output read by the BatchNorm only) folds into the
layer's LUT and bias: ``lut[:, :, m] *= s_m``, ``bias_m = s_m bias_m + shift_m``. That is exact
in real arithmetic; in float32 the outputs differ by LUT-sum rounding (a few ulps), and the
integer LUT is re-quantised from the scaled float LUT (the difference is bounded by
``C (0.5 / scale'_m + |s_m| 0.5 / scale_m)`` per output, reported per layer). This rule is
used only for a BatchNorm the exact threshold rule could not take.

Folded modules become ``nn.Identity``; the pass is recorded in the conversion plan
(:func:`maddnet.nn.plan.record_pass`, with a JSON report) so a saved fused model loads into a
fresh skeleton. BatchNorm folds use the running statistics (eval mode): a fused model is an
inference model. Hardware-exact mode (FP16 compares) sees the fused thresholds rounded to
float16: constant nodes stay constant, others can differ from the unfused FP16 datapath only
for inputs whose float16 rounding crosses the threshold (measured by the tests/benchmark).

Reference for the encoding: Blalock & Guttag, "Multiplying Matrices Without Multiplying",
ICML 2021 (MADDness hash trees).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .encoders import TreeEncoderModule
from .graph import (
    BATCHNORMS,
    PASS_THROUGH,
    call_counts,
    check_pass_input,
    module_of,
    producer_chains,
    shape_of,
    trace,
)
from .layers import MaddConv2d, MaddLayer, MaddLinear
from .plan import module_names, record_pass, register_pass, replace_module

__all__ = ["FuseReport", "fuse", "fuse_report", "permute_tree"]

_MAX = torch.finfo(torch.float32).max
_NON_MONOTONIC = (nn.GELU, nn.Hardswish)
# node states while folding: a compare, or a constant outcome of "v > t"
_COMPARE, _ALWAYS_FALSE, _ALWAYS_TRUE = 0, 1, 2


@dataclass
class LayerFold:
    """What :func:`fuse` did at one MADD layer."""

    folded: list[str] = field(default_factory=list)  # modules folded into the thresholds
    bn_after: str | None = None  # BatchNorm folded into the LUT and bias
    compares_removed: int = 0  # nodes that became constant (of ncompares)
    ncompares: int = 0
    flipped_nodes: int = 0
    approximate_nodes: int = 0
    int8_bound: float | None = None  # max re-quantisation bound over outputs (BN after)
    left_alone: str = ""  # why the chain in front of the layer was not (fully) folded


@dataclass
class FuseReport:
    """Per MADD layer :class:`LayerFold`, and the modules left alone with the reason."""

    layers: dict[str, LayerFold] = field(default_factory=dict)
    left_alone: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": {k: asdict(v) for k, v in self.layers.items()}, "left_alone": self.left_alone}


# ---------------------------------------------------------------------- float32 order
def _ordinal(x: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 keys in the order of the values (-0.0 and +0.0 share 0)."""
    bits = x.float().contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF))


def _from_ordinal(o: torch.Tensor) -> torch.Tensor:
    bits = torch.where(o >= 0, o, (-o) | 0x80000000)
    bits = torch.where(bits >= 2**31, bits - 2**32, bits)
    return bits.to(torch.int32).view(torch.float32)


# ---------------------------------------------------------------------- one op
def _evaluate(module: nn.Module, u: torch.Tensor, channels: torch.Tensor, nchannels: int, dims: int):
    """``module`` applied to value ``u[q]`` in channel ``channels[q]`` (eval mode)."""
    x = torch.zeros(u.shape[0], nchannels, dtype=torch.float32, device=u.device)
    rows = torch.arange(u.shape[0], device=u.device)
    x[rows, channels] = u
    x = x.reshape(x.shape + (1,) * (dims - 2))
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            y = module(x)
    finally:
        module.train(was_training)
    return y.reshape(u.shape[0], nchannels)[rows, channels]


def _bisect(pred, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Ordinals: ``pred(lo)`` differs from ``pred(hi)`` elementwise; returns the last ``lo``
    side point (``pred`` is monotonic between them)."""
    side = pred(lo)
    while bool((hi - lo > 1).any()):
        mid = lo + (hi - lo) // 2
        same = pred(mid) == side
        lo, hi = torch.where(same, mid, lo), torch.where(same, hi, mid)
    return lo


def _bn_scale(bn: nn.Module) -> torch.Tensor:
    """Per-channel scale of an eval-mode BatchNorm (weight 1 when not affine)."""
    weight = torch.ones_like(bn.running_var) if bn.weight is None else bn.weight.detach()
    return weight.float() / torch.sqrt(bn.running_var.float() + bn.eps)


def _fold_op(module, thr, state, flip, channels, nchannels, dims, approximate):
    """Move compares ``module(u) > thr`` to ``u`` (in place on thr/state/flip) at the
    compare nodes; returns the number of approximate nodes, or None if ``module`` cannot be
    folded exactly and ``approximate`` is off."""
    if isinstance(module, PASS_THROUGH + (nn.MaxPool2d,)):
        return 0
    active = state == _COMPARE
    t, ch = thr[active], channels[active]
    if t.numel() == 0:
        return 0

    def g(u, sub=slice(None)):
        return _evaluate(module, u, ch[sub], nchannels, dims)

    lo_key = _ordinal(torch.full_like(t, -_MAX))
    hi_key = _ordinal(torch.full_like(t, _MAX))
    new_t, new_state = t.clone(), torch.zeros_like(ch)
    napprox = 0
    if isinstance(module, _NON_MONOTONIC):
        # the minimum as the module computes it (GELU near -0.75, Hardswish at -1.5)
        grid = torch.linspace(-4.0, 0.0, 400001, device=t.device)
        with torch.no_grad():
            values = module(grid)
        fmin, umin = float(values.min()), grid[int(values.argmin())]
        exact = t >= 0
        always = t < fmin - 1e-4
        if not approximate and bool((~exact & ~always).any()):
            return None
        napprox = int((~exact & ~always).sum())
        lo_key = torch.where(t >= 0, lo_key, _ordinal(umin.expand_as(t)))
    decreasing = torch.zeros_like(ch, dtype=torch.bool)
    if isinstance(module, BATCHNORMS):
        decreasing = _bn_scale(module)[ch] < 0
    p_lo = _pred(g, lo_key, t)
    p_hi = _pred(g, hi_key, t)
    if isinstance(module, _NON_MONOTONIC):
        p_lo = torch.where(t < fmin - 1e-4, True, p_lo & (t >= 0))  # approximate nodes: right branch
    const = p_lo == p_hi
    new_state[const & p_lo] = _ALWAYS_TRUE
    new_state[const & ~p_lo] = _ALWAYS_FALSE
    search = ~const
    if bool(search.any()):
        where, ts = search.nonzero(as_tuple=True)[0], t[search]
        key = _bisect(lambda o: g(_from_ordinal(o), where) > ts, lo_key[search], hi_key[search])
        new_t[search] = _from_ordinal(key)
    # a decreasing g: "g(u) > t" is "u <= t'", the inverted compare
    toggle = search & decreasing
    idx = active.nonzero(as_tuple=True)
    thr[idx] = new_t
    state[idx] = new_state
    flip[idx] ^= toggle
    return napprox


def _pred(g, key: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Whether ``g(u) > t`` at the float32 values of the ordinals ``key``."""
    return g(_from_ordinal(key)) > t


# ---------------------------------------------------------------------- tree permutation
def permute_tree(
    thresholds: torch.Tensor, lut: torch.Tensor, flip: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Swap the two subtrees of every node where ``flip`` is set.

    Args:
        thresholds: (C, K-1) heap-order thresholds (float).
        lut: (C, K, ...) rows indexed by code.
        flip: (C, K-1) bool.

    Returns:
        (thresholds, lut) of the tree that sends each row to the same LUT row as the old
        tree with every flipped node's outcome inverted.
    """
    ncodebooks, nnodes = thresholds.shape
    depth = (nnodes + 1).bit_length() - 1
    device = thresholds.device
    new_thr = torch.empty_like(thresholds)
    position = torch.zeros(ncodebooks, 1, dtype=torch.int64, device=device)  # new index per old prefix
    for level in range(depth + 1):
        base = 2**level - 1
        if level == depth:
            new_lut = torch.empty_like(lut)
            new_lut.scatter_(
                1, position.reshape(ncodebooks, -1, *([1] * (lut.dim() - 2))).expand_as(lut), lut
            )
            return new_thr, new_lut
        new_thr.scatter_(1, base + position, thresholds[:, base : base + 2**level])
        bit = flip[:, base : base + 2**level].to(torch.int64)
        # children of old prefix p: 2p (left) and 2p+1; the new index adds the possibly inverted bit
        position = torch.stack([2 * position + bit, 2 * position + 1 - bit], dim=2).reshape(ncodebooks, -1)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------- the pass
def _split_channels(layer: MaddLayer) -> torch.Tensor:
    """(C, K-1) the input channel each node's split column belongs to."""
    depth = layer.depth
    levels = torch.cat([torch.full((2**d,), d, dtype=torch.int64) for d in range(depth)])
    columns = layer.split_dims[:, levels.to(layer.split_dims.device)]
    if isinstance(layer, MaddConv2d):
        kh, kw = layer.kernel_size
        return columns // (kh * kw)
    return columns


def _outcome_at_zero(thr: torch.Tensor, state: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """(C, K-1) bool: where each node sends the value 0 (right = True)."""
    cond = torch.where(state == _COMPARE, thr < 0, state == _ALWAYS_TRUE)
    return cond ^ flip


def _bn_fits(gm: fx.GraphModule, node: fx.Node, layer: MaddLayer) -> str:
    """Why the BatchNorm at ``node`` does not act on the layer's channels ('' if it does)."""
    bn = module_of(gm, node)
    if isinstance(layer, MaddConv2d):
        return "" if isinstance(bn, nn.BatchNorm2d) else f"{node.target}: a BatchNorm1d before a conv"
    shape = shape_of(node)
    if shape is None:
        return f"{node.target}: BatchNorm next to a linear layer needs fuse(..., example=) to know its shape"
    return (
        "" if len(shape) == 2 and isinstance(bn, nn.BatchNorm1d) else f"{node.target}: not a 2-D BatchNorm1d"
    )


def _fold_chain(gm, name: str, chain, approximate: bool, fold: LayerFold) -> tuple[list[str], int]:
    """Fold the chain's ops, nearest first, into the layer's tree as far as they go; returns
    (the modules folded, the number of chain ops passed)."""
    layer = gm.get_submodule(name)
    thr = layer.thresholds.detach().float().clone()
    state = torch.full(thr.shape, _COMPARE, dtype=torch.int64, device=thr.device)
    state[thr == float("inf")] = _ALWAYS_FALSE
    state[thr == float("-inf")] = _ALWAYS_TRUE
    before = int((state != _COMPARE).sum())
    flip = torch.zeros(thr.shape, dtype=torch.bool, device=thr.device)
    channels = _split_channels(layer)
    nchannels = layer.in_channels if isinstance(layer, MaddConv2d) else layer.in_features
    dims = 4 if isinstance(layer, MaddConv2d) else 2
    padded = isinstance(layer, MaddConv2d) and any(layer.padding)
    folded, past_pool, processed = [], False, 0
    fold.left_alone = chain.stop
    for node in chain.ops:
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.LeakyReLU) and module.negative_slope < 0:
            fold.left_alone = f"{node.target}: LeakyReLU with a negative slope is not monotonic"
            break
        if isinstance(module, BATCHNORMS):
            reason = _bn_fits(gm, node, layer)
            if not reason and module.running_var is None:
                reason = f"{node.target}: BatchNorm without running statistics"
            if not reason and past_pool and bool((_bn_scale(module)[channels] < 0).any()):
                reason = f"{node.target}: a negative BatchNorm scale does not commute with the max pool"
            if reason:
                fold.left_alone = reason
                break
        if past_pool and isinstance(module, _NON_MONOTONIC):
            fold.left_alone = f"{node.target}: a non-monotonic activation does not commute with the max pool"
            break
        saved = (thr.clone(), state.clone(), flip.clone())
        napprox = _fold_op(module, thr, state, flip, channels, nchannels, dims, approximate)
        if napprox is None:
            thr, state, flip = saved
            fold.left_alone = f"{node.target}: thresholds on its non-monotonic branch (approximate=False)"
            break
        # a padded tap reads 0 before and after folding: the node must decide 0 alike
        if padded and bool((_outcome_at_zero(*saved) != _outcome_at_zero(thr, state, flip)).any()):
            thr, state, flip = saved
            fold.left_alone = f"{node.target}: its value at 0 changes the compares of zero-padded taps"
            break
        fold.approximate_nodes += napprox
        processed += 1
        past_pool = past_pool or isinstance(module, nn.MaxPool2d)
        if not isinstance(module, PASS_THROUGH + (nn.MaxPool2d,)):
            folded.append(node.target)
    if not folded:
        return [], processed
    # constant outcomes: +inf (always left); always right = swap the subtrees, then +inf
    right = (state == _ALWAYS_TRUE) ^ flip
    constant = state != _COMPARE
    thr[constant] = float("inf")
    flip[constant] = right[constant]
    new_thr, new_lut = permute_tree(thr, layer.lut.detach(), flip)
    with torch.no_grad():
        layer.thresholds.copy_(new_thr)
        layer.lut.copy_(new_lut)
    fold.folded = folded
    fold.ncompares = thr.numel()
    fold.compares_removed = int(constant.sum()) - before
    fold.flipped_nodes = int(flip.sum())
    return folded, processed


def _fold_bn_after(layer: MaddLayer, bn: nn.Module, fold: LayerFold) -> None:
    scale = _bn_scale(bn).to(layer.lut.device)
    bias = torch.zeros_like(scale) if bn.bias is None else bn.bias.detach().float()
    shift = bias - bn.running_mean.float() * scale
    old_q = layer.quantized_lut()
    old_scale = None if old_q is None else old_q.scale.detach().float().clone()
    with torch.no_grad():
        layer.lut.mul_(scale.to(layer.lut.dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(shift.to(layer.lut.dtype))
        else:
            layer.bias.copy_(layer.bias * scale + shift)
    new_q = layer.quantized_lut()
    if old_scale is not None and new_q is not None:
        bound = layer.ncodebooks * (0.5 / new_q.scale.float() + scale.abs() * 0.5 / old_scale)
        fold.int8_bound = float(bound.max())


def fuse(
    model: nn.Module,
    example: torch.Tensor | None = None,
    approximate: bool = False,
    bn_after: bool = False,
) -> nn.Module:
    """Fold BatchNorm and activations into the MADD layers of ``model`` (in place; see the
    module docstring for the rules and their exactness).

    Args:
        model: a converted model (tree encoders); BatchNorm folds use running statistics.
        example: an input batch; needed only to fold a BatchNorm next to a ``MaddLinear``
            (its shape tells whether it normalises the layer's features).
        approximate: fold GELU / Hardswish also where the exact form needs two compares
            (single-compare approximation, counted in the report).
        bn_after: also fold a BatchNorm that follows a MADD layer into its LUT and bias.
            Off by default: it is exact in real arithmetic only (float32 rounding, integer
            LUT re-quantisation), and later layers' compares can turn such small changes
            into different codes.

    Returns:
        ``model``, with the pass and its report (:func:`fuse_report`) recorded in its plan.

    Raises:
        ValueError: a MADD layer is inference-only (no float LUT; named).
        GraphError: fx cannot trace ``model`` (nothing is changed).
    """
    check_pass_input(model, "fuse")
    gm = trace(model, example)
    report = FuseReport()
    removed: list[str] = []
    taken: set[str] = set()
    for name, chain in producer_chains(gm).items():
        layer = gm.get_submodule(name)
        if not isinstance(layer.encoder, TreeEncoderModule):
            report.left_alone[name] = f"encoder {layer.spec.encoder!r} has no thresholds to fold into"
            continue
        fold = LayerFold()
        report.layers[name] = fold
        folded, processed = _fold_chain(gm, name, chain, approximate, fold)
        removed += folded
        taken.update(folded)
        if fold.left_alone and chain.ops[processed:]:
            for node in chain.ops[processed:]:
                report.left_alone.setdefault(node.target, fold.left_alone)
    if bn_after:
        counts = call_counts(gm)
        for node in gm.graph.nodes:
            layer = module_of(gm, node)
            if not isinstance(layer, MaddLayer) or counts[node.target] != 1 or len(node.users) != 1:
                continue
            (user,) = node.users
            bn = module_of(gm, user)
            if not isinstance(bn, BATCHNORMS) or user.target in taken or counts[user.target] != 1:
                continue
            if bn.running_var is None:
                report.left_alone.setdefault(user.target, "BatchNorm without running statistics")
                continue
            if isinstance(layer, MaddLinear) and (shape_of(user) is None or len(shape_of(user)) != 2):
                report.left_alone.setdefault(
                    user.target, "BatchNorm after a linear layer of unknown/3-D shape"
                )
                continue
            fold = report.layers.setdefault(node.target, LayerFold())
            _fold_bn_after(layer, bn, fold)
            fold.bn_after = user.target
            report.left_alone.pop(user.target, None)
            removed.append(user.target)
    names = module_names(model)
    for target in removed:
        replace_module(model, target, nn.Identity(), names)
    record_pass(model, "fuse", {"identity": removed, "report": report.to_dict()})
    return model


def fuse_report(model: nn.Module) -> list[dict[str, Any]]:
    """The reports of every :func:`fuse` pass recorded on ``model`` (JSON-friendly dicts)."""
    from .plan import conversion_plan

    return [r["report"] for r in conversion_plan(model)["passes"] if r["pass"] == "fuse"]


def _replay(model: nn.Module, record: dict[str, Any]) -> None:
    names = module_names(model)
    for target in record["identity"]:
        try:
            model.get_submodule(target)
        except AttributeError as error:
            raise ValueError(f"fuse pass: the model has no module {target!r} to replace") from error
        replace_module(model, target, nn.Identity(), names)


register_pass("fuse", _replay)
