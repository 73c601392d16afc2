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
