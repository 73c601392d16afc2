"""What to convert and how: :class:`MaddConfig`, layer selection and the codebook rule."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from .mapping import input_dim, madd_type_for, unsupported_reason
from .spec import LayerSpec

LayerFilter = Callable[[str, nn.Module], bool]
CodebookRule = Callable[[str, nn.Module], int]


@dataclass
class MaddConfig:
    """Conversion settings (the per-model counterpart of a torch.ao ``QConfig``).

    Which layers, how many codebooks each, how rows are recorded; how each layer is
    built, learned and trained is ``spec`` (a :class:`~maddnet.nn.LayerSpec`, passed whole
    to every layer).

    Attributes:
        layers: which layers to convert: a filter ``f(name, module) -> bool``, a sequence
            of ``fnmatch`` name patterns (e.g. ``["layer*.conv2", "fc"]``), or ``None``
            for every layer that :mod:`maddnet.nn.mapping` can convert (``nn.Linear``,
            ``nn.Conv2d`` with ``groups == 1`` and zero padding; see :meth:`skipped`).
        exclude: name patterns never converted (applied after ``layers``).
        ncodebooks: C: one int for all layers, a ``{name: C}`` mapping (names missing
            from it use the rule), a function ``f(name, module) -> C``, or ``None`` for the
            rule: kh x kw convs with kh kw > 1 get one codebook per input channel, and more
            when the kernel has over 9 taps, ``C = max(Cin, ceil(D / 9))`` (D/C = 9 for 3x3;
            a 10x4 stem on one channel gets C = 5, not 1); linear and 1x1 convs get
            ``C = D // codebook_width``
            (at least 1, so D/C lies in [codebook_width, 2 codebook_width)).
        codebook_width: target D/C for linear and 1x1 layers.
        spec: the per-layer settings (K, encoder, LUT bits, QAT, surrogate, ...).
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
    spec: LayerSpec = field(default_factory=LayerSpec)
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
        if not isinstance(self.spec, LayerSpec):
            raise TypeError(f"MaddConfig.spec must be a LayerSpec, got {type(self.spec).__name__}")
        self._check_ncodebooks()

    def _check_ncodebooks(self) -> None:
        """``ncodebooks``: None, an int >= 1, a ``{layer name: int >= 1}`` mapping or a callable."""
        value = self.ncodebooks

        def positive_int(count: object) -> bool:
            return isinstance(count, int) and not isinstance(count, bool) and count >= 1

        if isinstance(value, Mapping):
            bad = {
                name: count
                for name, count in value.items()
                if not isinstance(name, str) or not positive_int(count)
            }
            if bad:
                raise ValueError(f"MaddConfig.ncodebooks maps layer names to ints >= 1; bad entries: {bad}")
        elif not (value is None or positive_int(value) or callable(value)):
            raise ValueError(
                "MaddConfig.ncodebooks must be None, an int >= 1, a {layer name: int >= 1} mapping "
                f"or a function (name, module) -> C, got {value!r}"
            )

    # ------------------------------------------------------------------ selection
    def selects(self, name: str, module: nn.Module) -> bool:
        """Whether ``module`` (called ``name`` in the model) is to be converted."""
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.exclude):
            return False
        if self.layers is None:
            return unsupported_reason(module) is None
        if callable(self.layers):
            return bool(self.layers(name, module))
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.layers)

    def select(self, model: nn.Module) -> dict[str, nn.Module]:
        """``{name: module}`` of the layers to convert; raises on unsupported selections.

        Selection works on module objects: a module registered under several names (a
        shared module) is selected once, under its first name, when ``layers`` selects any
        of its names and ``exclude`` none of them (its conversion replaces it everywhere).
        """
        chosen = {}
        matched_names, second_names = [], {}
        for module, names in leaf_layers_with_names(model):
            if any(fnmatch.fnmatchcase(n, pattern) for n in names for pattern in self.exclude):
                continue
            if not any(self.selects(n, module) for n in names):
                continue
            name = names[0]
            matched_names.extend(names)
            second_names.update({alias: name for alias in names[1:]})
            reason = unsupported_reason(module)
            if reason is not None:
                # a wrong type is a TypeError; a convertible type in an unsupported setting a ValueError
                error = ValueError if madd_type_for(module) is not None else TypeError
                raise error(
                    f"layer {name!r} cannot be converted to a MADD layer: {reason} "
                    "(adjust MaddConfig.layers / exclude)"
                )
            chosen[name] = module
        if not chosen:
            raise ValueError(f"MaddConfig selects no layer of the model (layers={self.layers!r})")
        if self.layers is not None and not callable(self.layers):
            for pattern in self.layers:
                if not any(fnmatch.fnmatchcase(name, pattern) for name in matched_names):
                    raise ValueError(f"layer pattern {pattern!r} matches no convertible layer")
        if isinstance(self.ncodebooks, Mapping):
            unused = sorted(set(self.ncodebooks) - set(matched_names))
            if unused:
                raise ValueError(
                    f"ncodebooks names {unused}, which are not layers selected for conversion; "
                    f"selected: {sorted(chosen)}"
                )
            # a shared layer is learned under its first name: C given under another name
            # would be ignored, so it is refused
            aliases = {key: second_names[key] for key in self.ncodebooks if key in second_names}
            if aliases:
                raise ValueError(
                    "ncodebooks names a shared layer by a second name; give its C under its first name: "
                    + ", ".join(f"{key!r} -> {first!r}" for key, first in sorted(aliases.items()))
                )
        return chosen

    def skipped(self, model: nn.Module) -> dict[str, str]:
        """``{name: reason}`` of the dense conv/linear layers the default selection
        (``layers=None``) leaves out because they cannot be converted (the same reasons as
        :func:`maddnet.nn.mapping.kept_dense` and ``summary`` give)."""
        attention = [name for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
        skipped = {}
        for name, module in named_leaf_layers(model):
            if not isinstance(module, nn.Linear | nn.Conv2d):
                continue
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.exclude):
                continue
            owner = next((a for a in attention if name.startswith(a + ".")), None)
            if owner is not None:
                skipped[name] = f"part of nn.MultiheadAttention {owner!r}, which uses its weights directly"
            elif (reason := unsupported_reason(module)) is not None:
                skipped[name] = reason
        return skipped

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
    """Named modules without children (the layers a conversion could replace), each once:
    a shared module under its first name (see :func:`leaf_layers_with_names`)."""
    for name, module in model.named_modules():
        if name and not any(True for _ in module.children()):
            yield name, module


def leaf_layers_with_names(model: nn.Module) -> list[tuple[nn.Module, list[str]]]:
    """Every module without children once, with every name it is registered under (first
    the one ``named_modules()`` gives it), in ``named_modules()`` order. A shared module
    (``self.b = self.a``, a block used twice) has several names."""
    found: dict[int, tuple[nn.Module, list[str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name and not any(True for _ in module.children()):
            found.setdefault(id(module), (module, []))[1].append(name)
    return list(found.values())


def default_codebooks(module: nn.Module, codebook_width: int = 8) -> int:
    """The default C: ``max(Cin, ceil(D / 9))`` for kh x kw > 1 convs (at most 9 inputs per
    codebook: one codebook per channel for 3x3 kernels, more for larger kernels such as a
    7x7 or 10x4 stem), ``max(1, D // codebook_width)`` otherwise."""
    if isinstance(module, nn.Conv2d) and module.kernel_size[0] * module.kernel_size[1] > 1:
        return max(module.in_channels // module.groups, -(-input_dim(module) // 9))
    return max(1, input_dim(module) // codebook_width)
