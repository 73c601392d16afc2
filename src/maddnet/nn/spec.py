"""``LayerSpec``: every setting of one MADD layer, declared once and passed whole.

The spec goes unchanged from the CLI / config file / Python API through
:class:`~maddnet.nn.MaddConfig` (which adds layer selection, C per layer and recording
bounds) and :func:`~maddnet.nn.learn_layer` to the layer, which keeps it (``layer.spec``)
and saves it in its config. Field metadata ``help`` is the text the CLI shows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..amm.checks import check_nprototypes
from ..amm.encoders import HASH_OBJECTIVES, encoder_class
from ..amm.encoders.base import encoder_settings
from ..amm.encoders.tree import check_channel_budget
from ..amm.lut import GRANULARITIES

SURROGATES = ("soft", "soft-bf16", "path")
DEFAULT_TEMPERATURE = 0.5
# fields that configure the tree encoder (its learning and its training surrogate)
TREE_FIELDS = ("ncandidates", "hash_objective", "refine_sweeps", "surrogate", "channel_budget")
# the original MADDness trees (Blalock & Guttag 2021): LayerSpec(**MADDNESS_TREE). They were
# LayerSpec's defaults until 2026-12-01, when layers moved to output-aware, refined trees, so
# these are also the former defaults: a spec saved by an older maddnet either holds these
# fields with these values or lacks them, and meant these values (LayerSpec.from_saved)
MADDNESS_TREE: Mapping[str, Any] = MappingProxyType({"hash_objective": "input", "refine_sweeps": 0})
# encoders whose layer module is the tree's (maddnet.nn.encoders.TreeEncoderModule): they take
# the `surrogate` field too (their learning options go in encoder_options)
SURROGATE_ENCODERS = ("tree", "tree-global")


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass(frozen=True)
class LayerSpec:
    """How a MADD layer is built, learned and trained (C is chosen per layer, elsewhere).

    Raises ``ValueError`` on construction for any value out of range, naming the field.
    """

    nprototypes: int = _help("K, codes per codebook (leaves per tree): a power of two, 4..256", default=16)
    encoder: str = _help(
        "encoder registry name (maddnet.amm.encoders.ENCODERS); 'tree' is MADDness", default="tree"
    )
    encoder_options: Mapping[str, Any] = _help(
        "further constructor arguments of the encoder (those without a field here), e.g. the pq "
        "encoders' iterations or tree-global's ntargets and refine_sweeps; docs/encoders.md",
        default_factory=dict,
    )
    ridge: float | None = _help(
        "lambda of the joint prototype ridge regression; None keeps the encoder's prototypes (leaf means)",
        default=1.0,
    )
    ncandidates: int = _help("tree: columns tried per tree level when learning", default=4)
    hash_objective: str = _help(
        "tree: 'output' (thresholds fit the block's contribution to the product) or 'input' "
        "(they fit the rows: MADDness); docs/encoders.md",
        default="output",
    )
    refine_sweeps: int = _help(
        "tree: sweeps of coordinate descent on the split columns and thresholds after the "
        "greedy fit, against the error of the solved table (0: MADDness's greedy trees); same "
        "hardware cost; docs/encoders.md",
        default=1,
    )
    channel_budget: float | int | None = _help(
        "tree: input channels the trees may split on (steering, docs/passes.md): a fraction in "
        "(0, 1] or a count >= 1 (write 0.5 or 64; a conv's taps of a channel count as it; a "
        "count at or above a layer's input channels allows them all); None: all",
        default=None,
    )
    lut_bits: int | None = _help("bits per integer LUT entry (1..8); None: float LUTs", default=8)
    lut_granularity: str = _help(
        "LUT quantisation scale: 'codebook' (one for the LUT) or 'column' (per output column)",
        default="codebook",
    )
    qat: bool = _help("training forward passes read the integer LUT too (straight-through)", default=True)
    surrogate: str = _help(
        "tree: threshold/input gradient, 'soft' (soft decision tree), 'soft-bf16' (the same with "
        "its leaf-score product in bfloat16: faster where the CPU has bfloat16 instructions, "
        "e.g. AVX512-BF16) or 'path' (hard path only)",
        default="soft",
    )
    temperature: float = _help(
        "surrogate tau per tree level, in standard deviations of that level's split column",
        default=DEFAULT_TEMPERATURE,
    )

    def __post_init__(self) -> None:
        check_nprototypes(self.nprototypes)
        encoder_class(self.encoder)  # raises for an unknown name
        if not isinstance(self.encoder_options, Mapping):
            raise ValueError(f"LayerSpec.encoder_options must be a mapping, got {self.encoder_options!r}")
        object.__setattr__(self, "encoder_options", dict(self.encoder_options))
        if self.ridge is not None and not (float(self.ridge) > 0 and float(self.ridge) < float("inf")):
            raise ValueError(f"LayerSpec.ridge must be a positive number or None, got {self.ridge!r}")
        if (
            isinstance(self.ncandidates, bool)
            or not isinstance(self.ncandidates, int)
            or self.ncandidates < 1
        ):
            raise ValueError(f"LayerSpec.ncandidates must be a positive int, got {self.ncandidates!r}")
        if self.hash_objective not in HASH_OBJECTIVES:
            raise ValueError(
                f"LayerSpec.hash_objective must be one of {HASH_OBJECTIVES}, got {self.hash_objective!r}"
            )
        sweeps = self.refine_sweeps
        if isinstance(sweeps, bool) or not isinstance(sweeps, int) or sweeps < 0:
            raise ValueError(f"LayerSpec.refine_sweeps must be an int >= 0, got {sweeps!r}")
        if isinstance(self.channel_budget, str):  # the command line's text: "0.5", "64", "none"
            object.__setattr__(self, "channel_budget", parse_channel_budget(self.channel_budget))
        check_channel_budget(self.channel_budget, "LayerSpec.channel_budget")
        bits = self.lut_bits
        if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8):
            raise ValueError(f"LayerSpec.lut_bits must be None (float LUT) or an int in 1..8, got {bits!r}")
        if self.lut_granularity not in GRANULARITIES:
            raise ValueError(
                f"LayerSpec.lut_granularity must be one of {GRANULARITIES}, got {self.lut_granularity!r}"
            )
        if not isinstance(self.qat, bool):
            raise ValueError(f"LayerSpec.qat must be a bool, got {self.qat!r}")
        if self.surrogate not in SURROGATES:
            raise ValueError(f"LayerSpec.surrogate must be one of {SURROGATES}, got {self.surrogate!r}")
        if isinstance(self.temperature, bool) or not (
            isinstance(self.temperature, int | float) and 0 < self.temperature < float("inf")
        ):
            raise ValueError(f"LayerSpec.temperature must be a positive number, got {self.temperature!r}")
        taken = sorted(set(self.encoder_options) & set(self._field_arguments()))
        if taken:
            raise ValueError(
                f"LayerSpec.encoder_options: {', '.join(taken)} of encoder {self.encoder!r} "
                f"{'is' if len(taken) == 1 else 'are'} set by the LayerSpec field of that name "
                f"(--{taken[0].replace('_', '-')}), not as an encoder option"
            )
        self._check_encoder_options()
        if self.encoder != "tree":
            defaults = LayerSpec()
            changed = [
                name
                for name in TREE_FIELDS
                if getattr(self, name) != getattr(defaults, name)
                and not (name == "surrogate" and self.encoder in SURROGATE_ENCODERS)
            ]
            if changed:
                raise ValueError(
                    f"LayerSpec fields {changed} configure the tree encoder; encoder {self.encoder!r} "
                    "takes its options in encoder_options"
                )

    def _check_encoder_options(self) -> None:
        """Build the encoder class with this spec's arguments (C = 1), so an option it does
        not take, or a bad value, fails here, naming the option and the accepted ones."""
        cls = encoder_class(self.encoder)
        settings = encoder_settings(cls)
        accepted = [name for name in settings or [] if name != "ncodebooks"]
        unknown = [] if settings is None else sorted(set(self.encoder_options) - set(accepted))
        if unknown:
            raise ValueError(
                f"LayerSpec.encoder_options: encoder {self.encoder!r} takes no option "
                f"{', '.join(map(repr, unknown))}; its options: {', '.join(accepted)}"
            )
        if not self.encoder_options:
            return
        try:
            cls(**self.encoder_config(1))
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"LayerSpec.encoder_options {dict(self.encoder_options)} do not fit encoder "
                f"{self.encoder!r} (its options: {', '.join(accepted)}): {error}"
            ) from error

    # ------------------------------------------------------------------ helpers
    def replace(self, **changes: Any) -> LayerSpec:
        """A copy with ``changes`` (validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly fields."""
        return {
            f.name: (dict(v) if isinstance(v := getattr(self, f.name), Mapping) else v)
            for f in dataclasses.fields(self)
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LayerSpec:
        """Inverse of :meth:`to_dict` (a missing field takes today's default); unknown keys
        are an error that lists the known ones. For an encoder other than the tree that
        takes no option of that name (the pq encoders), a tree field at its former default
        (``MADDNESS_TREE``, which the files of older runs hold) is read as not given: it
        never applied; tree-global, whose own options share the names, is refused instead,
        so that its objective is never silently another than the file says. A tree's
        refine_sweeps among the encoder options (where those files hold it) is read as the
        field."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown LayerSpec keys {unknown}; known keys: {sorted(known)}")
        values = dict(values)
        options = dict(values.get("encoder_options") or {})
        encoder = values.get("encoder", "tree")
        if encoder != "tree":
            own = encoder_settings(encoder_class(encoder)) or []  # raises for an unknown name
            for name, former in MADDNESS_TREE.items():
                if name in values and values[name] == former and name not in own:
                    del values[name]
        elif "refine_sweeps" in options:
            if "refine_sweeps" in values:
                raise ValueError("LayerSpec: refine_sweeps is given both as a field and as an encoder option")
            values["refine_sweeps"] = options.pop("refine_sweeps")
            values["encoder_options"] = options
        return cls(**values)

    @classmethod
    def from_saved(cls, values: Mapping[str, Any]) -> LayerSpec:
        """A spec that a maddnet of any version saved with :meth:`to_dict` (a layer's
        config, a run's ``config.json``, an analysis' settings), read as it was meant.

        :meth:`from_dict` fills a missing field with today's default, right for a config
        file that names only what it changes. A saved spec names every field it had, so
        a missing field is one added later, and the spec meant the behaviour before it
        (``MADDNESS_TREE``: the tree's input objective, no refinement).

        Raises ``ValueError`` as :meth:`from_dict` does (unknown keys, bad values).
        """
        values = dict(values)
        options = values.get("encoder_options") or {}
        tree = values.get("encoder", "tree") == "tree"
        for name, former in MADDNESS_TREE.items():
            if not tree and values.get(name, former) == former:
                values.pop(name, None)  # the default of then, which never applied to this encoder
            elif name not in values and name not in options:  # a tree's refine_sweeps was an option
                values[name] = former
        return cls.from_dict(values)

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """``{field: help text}`` (what the CLI prints for each setting)."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}

    def _field_arguments(self) -> tuple[str, ...]:
        """The encoder's constructor arguments that this spec's fields (or the layer: C, the
        channel size) set, which ``encoder_options`` may not set again."""
        common = ("ncodebooks", "nprototypes", "ridge")
        if self.encoder != "tree":
            return common
        return (*common, "ncandidates", "hash_objective", "refine_sweeps", "channel_budget", "channel_size")

    def encoder_config(self, ncodebooks: int) -> dict[str, Any]:
        """Constructor arguments of this spec's :class:`~maddnet.amm.encoders.Encoder` for C codebooks."""
        config: dict[str, Any] = {
            "ncodebooks": ncodebooks,
            "nprototypes": self.nprototypes,
            "ridge": self.ridge,
        }
        if self.encoder == "tree":
            config.update(
                ncandidates=self.ncandidates,
                hash_objective=self.hash_objective,
                refine_sweeps=self.refine_sweeps,
            )
        return {**config, **self.encoder_options}

    def steering_options(self, channel_size: int) -> dict[str, Any]:
        """The tree encoder's ``channel_budget`` / ``channel_size`` arguments ({} without a
        budget, so the default learning is untouched); ``channel_size``: columns per input
        channel of the layer (a conv's kh kw)."""
        if self.channel_budget is None:
            return {}
        return {"channel_budget": self.channel_budget, "channel_size": channel_size}


def former_trees_hint(differences: Iterable[str]) -> str:
    """An addition to a "saved with other settings" error whose only ``differences`` (names
    ``spec.<field>`` or bare field names) are the fields of :data:`MADDNESS_TREE`: how to
    resume a run made before the layers' default changed. "" otherwise."""
    names = {str(key).removeprefix("spec.") for key in differences}
    if not names or not names <= set(MADDNESS_TREE):
        return ""
    return (
        " (it was made with MADDness's trees, the layers' default before 2026-12-01: "
        "--hash-objective input --refine-sweeps 0 resumes it)"
    )


def parse_channel_budget(text: str) -> float | int | None:
    """``LayerSpec.channel_budget`` from text: "none", a fraction with a point ("0.5",
    "1.0") or a channel count ("64"). Raises ``ValueError`` naming the setting."""
    text = text.strip().lower()
    if text in ("none", "null", ""):
        return None
    try:
        return float(text) if any(c in text for c in ".e") else int(text)
    except ValueError:
        raise ValueError(
            f"LayerSpec.channel_budget must be none, a fraction like 0.5 or a count like 64, got {text!r}"
        ) from None


def spec_with(spec: LayerSpec | None, **changes: Any) -> LayerSpec:
    """``spec`` (default: ``LayerSpec()``) with ``changes`` applied: the one place where
    keyword settings given to a layer constructor or ``from_dense`` become a spec."""
    spec = LayerSpec() if spec is None else spec
    if not isinstance(spec, LayerSpec):
        raise TypeError(f"spec must be a LayerSpec, got {type(spec).__name__}")
    return spec.replace(**changes) if changes else spec
