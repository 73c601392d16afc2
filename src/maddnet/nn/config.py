"""What to convert and how: :class:`MaddConfig`, layer selection and the codebook rule."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from .functional import SURROGATES
from .layers import DEFAULT_TEMPERATURE

LayerFilter = Callable[[str, nn.Module], bool]
CodebookRule = Callable[[str, nn.Module], int]
SUPPORTED_TYPES = (nn.Linear, nn.Conv2d)


@dataclass
class MaddConfig:
    """Conversion settings (the per-model counterpart of a torch.ao ``QConfig``).

    Attributes:
        layers: which layers to convert: a filter ``f(name, module) -> bool``, a sequence
            of ``fnmatch`` name patterns (e.g. ``["layer*.conv2", "fc"]``), or ``None``
            for every ``nn.Linear`` and every ``nn.Conv2d`` with ``groups == 1``.
        exclude: name patterns never converted (applied after ``layers``).
        ncodebooks: C: one int for all layers, a ``{name: C}`` mapping (names missing
            from it use the rule), a function ``f(name, module) -> C``, or ``None`` for the
            rule: kh x kw convs with kh kw > 1 get one codebook per input channel, and more
            when the kernel has over 9 taps, ``C = max(Cin, ceil(D / 9))`` (D/C = 9 for 3x3;
            a 10x4 stem on one channel gets C = 5, not 1); linear and 1x1 convs get
            ``C = D // codebook_width``
            (at least 1, so D/C lies in [codebook_width, 2 codebook_width)).
        codebook_width: target D/C for linear and 1x1 layers.
        nprototypes: K, leaves per tree (16 in MADDness).
        lut_bits: integer LUT bits (8), or ``None`` for float LUTs.
        lut_granularity: "codebook" or "column" (see ``maddnet.amm.lut.quantize_lut``).
        ridge: prototype ridge lambda, ``None`` keeps leaf means.
        ncandidates: columns tried per tree level.
        qat: read the integer LUT in training forward passes too (straight-through).
        temperature: surrogate tau per tree level, as a multiple of the standard
            deviation of that level's split column on the calibration rows.
        surrogate: threshold / input gradient: "soft" (soft decision tree over all
            nodes) or "path" (only the nodes on each row's hard path; cheaper).
        max_rows: rows kept per layer while recording (uniform reservoir sample).
        max_bytes_per_layer: CPU memory bound of one layer's recorded rows; a layer keeps
            ``min(max_rows, max_bytes_per_layer // (4 D))`` rows of D float32 values, so a
            prepared model holds at most ``nlayers * max_bytes_per_layer`` bytes of rows.
        min_rows: converting a layer with fewer recorded rows is an error.
        seed: seed of the reservoir sampling.
    """

    layers: LayerFilter | Sequence[str] | None = None
    exclude: Sequence[str] = ()
    ncodebooks: int | Mapping[str, int] | CodebookRule | None = None
    codebook_width: int = 8
    nprototypes: int = 16
    lut_bits: int | None = 8
    lut_granularity: str = "codebook"
    ridge: float | None = 1.0
    ncandidates: int = 4
    qat: bool = True
    temperature: float = DEFAULT_TEMPERATURE
    surrogate: str = "soft"
    max_rows: int = 16384
    max_bytes_per_layer: int = 64 << 20
    min_rows: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.layers, str):
            self.layers = [self.layers]
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]
        for name in ("codebook_width", "max_rows", "max_bytes_per_layer", "min_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MaddConfig.{name} must be a positive int, got {value!r}")
        if self.surrogate not in SURROGATES:
            raise ValueError(f"MaddConfig.surrogate must be one of {SURROGATES}, got {self.surrogate!r}")
        if not self.temperature > 0:
            raise ValueError(f"MaddConfig.temperature must be > 0, got {self.temperature!r}")

    # ------------------------------------------------------------------ selection
    def selects(self, name: str, module: nn.Module) -> bool:
        """Whether ``module`` (called ``name`` in the model) is to be converted."""
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.exclude):
            return False
        if self.layers is None:
            # Exact types: subclasses such as MultiheadAttention's out_proj are used by
            # their owner through .weight, not called, so swapping them would break it.
            return type(module) is nn.Linear or (type(module) is nn.Conv2d and module.groups == 1)
        if callable(self.layers):
            return bool(self.layers(name, module))
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.layers)

    def select(self, model: nn.Module) -> dict[str, nn.Module]:
        """``{name: module}`` of the layers to convert; raises on unsupported selections."""
        chosen = {}
        for name, module in named_leaf_layers(model):
            if not self.selects(name, module):
                continue
            if type(module) not in SUPPORTED_TYPES:
                raise TypeError(
                    f"layer {name!r} is a {type(module).__name__}; only nn.Linear and nn.Conv2d "
                    "can be converted to MADD layers (adjust MaddConfig.layers / exclude)"
                )
            chosen[name] = module
        if not chosen:
            raise ValueError(f"MaddConfig selects no layer of the model (layers={self.layers!r})")
        if self.layers is not None and not callable(self.layers):
            for pattern in self.layers:
                if not any(fnmatch.fnmatchcase(name, pattern) for name in chosen):
                    raise ValueError(f"layer pattern {pattern!r} matches no convertible layer")
        return chosen

    # ------------------------------------------------------------------ codebooks
    def codebooks_for(self, name: str, module: nn.Module) -> int:
        """C for one layer (see the ``ncodebooks`` attribute)."""
        ndims = input_dim(module)
        if isinstance(self.ncodebooks, int):
            ncodebooks = self.ncodebooks
        elif isinstance(self.ncodebooks, Mapping) and name in self.ncodebooks:
            ncodebooks = self.ncodebooks[name]
        elif callable(self.ncodebooks) and not isinstance(self.ncodebooks, Mapping):
            ncodebooks = self.ncodebooks(name, module)
        else:
            ncodebooks = default_codebooks(module, self.codebook_width)
        if not isinstance(ncodebooks, int) or not 1 <= ncodebooks <= ndims:
            raise ValueError(f"layer {name!r}: ncodebooks must be an int in 1..D={ndims}, got {ncodebooks!r}")
        return ncodebooks


def named_leaf_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules without children (the layers a conversion could replace)."""
    for name, module in model.named_modules():
        if name and not any(True for _ in module.children()):
            yield name, module


def input_dim(module: nn.Module) -> int:
    """D of a Linear (in_features) or Conv2d (Cin kh kw / groups)."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return module.in_channels // module.groups * kh * kw
    raise TypeError(f"only nn.Linear and nn.Conv2d have a MADD input dimension, got {type(module).__name__}")


def default_codebooks(module: nn.Module, codebook_width: int = 8) -> int:
    """The default C: ``max(Cin, ceil(D / 9))`` for kh x kw > 1 convs (at most 9 inputs per
    codebook: one codebook per channel for 3x3 kernels, more for larger kernels such as a
    7x7 or 10x4 stem), ``max(1, D // codebook_width)`` otherwise."""
    if isinstance(module, nn.Conv2d) and module.kernel_size[0] * module.kernel_size[1] > 1:
        return max(module.in_channels // module.groups, -(-input_dim(module) // 9))
    return max(1, input_dim(module) // codebook_width)
