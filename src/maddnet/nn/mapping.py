"""The one mapping from dense layer types to MADD layer types (as torch.ao's module mappings).

Selection, conversion, recording, analysis and rebuilding all ask here: which MADD type
replaces a dense module (:func:`madd_type_for`), and whether this instance can be
converted, and if not why (:func:`unsupported_reason`).
"""

from __future__ import annotations

from torch import nn

from .layers import MaddConv2d, MaddLinear, _MaddLayer, conv_padding

# exact dense type -> MADD type. Exact: subclasses (e.g. MultiheadAttention's
# NonDynamicallyQuantizableLinear out_proj) are used by their owner through .weight, not
# called, so swapping them would silently break the owner.
DEFAULT_MAPPING: dict[type[nn.Module], type[_MaddLayer]] = {nn.Linear: MaddLinear, nn.Conv2d: MaddConv2d}
# MADD layer kind (as saved in conversion plans) -> MADD type
LAYER_TYPES: dict[str, type[_MaddLayer]] = {madd.kind: madd for madd in DEFAULT_MAPPING.values()}


def madd_type_for(module: nn.Module) -> type[_MaddLayer] | None:
    """The MADD type that replaces ``module``'s exact type, or None."""
    return DEFAULT_MAPPING.get(type(module))


def unsupported_reason(module: nn.Module) -> str | None:
    """Why ``module`` cannot become a MADD layer, or None when it can."""
    madd = madd_type_for(module)
    if madd is None:
        supported = ", ".join(f"nn.{t.__name__}" for t in DEFAULT_MAPPING)
        return f"a {type(module).__name__} is not one of the convertible types ({supported})"
    if madd is MaddConv2d:
        if module.groups != 1:
            return f"grouped/depthwise conv (groups={module.groups}); MaddConv2d supports groups=1 only"
        try:
            conv_padding(module)
        except ValueError as error:
            return str(error)
    return None


def input_dim(module: nn.Module) -> int:
    """D of a Linear (in_features) or Conv2d (Cin kh kw / groups)."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return module.in_channels // module.groups * kh * kw
    raise TypeError(f"only nn.Linear and nn.Conv2d have a MADD input dimension, got {type(module).__name__}")


# modules that multiply their input by a weight but have no MADD replacement (yet)
_OTHER_MATMUL_TYPES: tuple[type[nn.Module], ...] = (
    nn.MultiheadAttention,
    nn.Conv1d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Bilinear,
    nn.RNNBase,
)


def kept_dense(model: nn.Module) -> list[dict[str, object]]:
    """The weight-multiplying modules of ``model`` that are not MADD layers, with why.

    Rows ``{"name", "type", "weights", "reason"}`` (``weights``: parameter count) for every
    ``nn.Linear``/``nn.Conv2d`` (subclasses included) that is still dense and every other
    module that multiplies by a weight (attention in-projections, other convolutions,
    recurrent layers). ``reason`` is :func:`unsupported_reason`, or "not selected" for a
    convertible layer the configuration left out. Modules inside a reported module are not
    listed again (e.g. ``nn.MultiheadAttention.out_proj``).
    """
    rows: list[dict[str, object]] = []
    covered: list[str] = []
    for name, module in model.named_modules():
        if not name or isinstance(module, _MaddLayer) or any(name.startswith(p + ".") for p in covered):
            continue
        if isinstance(module, nn.MultiheadAttention):
            reason = (
                "nn.MultiheadAttention uses its projection weights directly (in_proj_weight or "
                "q/k/v_proj_weight, out_proj.weight), not by calling Linear modules; no MADD attention yet"
            )
        elif isinstance(module, _OTHER_MATMUL_TYPES):
            reason = f"no MADD replacement for {type(module).__name__}"
        elif isinstance(module, nn.Linear | nn.Conv2d):
            reason = unsupported_reason(module) or "not selected (MaddConfig.layers / exclude)"
        else:
            continue
        covered.append(name)
        weights = sum(p.numel() for p in module.parameters())
        rows.append({"name": name, "type": type(module).__name__, "weights": weights, "reason": reason})
    return rows
