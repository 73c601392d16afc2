"""Argument helpers shared by the ``maddnet`` sub-commands.

One ``KEY=VALUE`` parser, validating number types, the device/threads/progress flags, the
flags of every :class:`~maddnet.nn.spec.LayerSpec` field (generated from the dataclass, with
its help texts), run-config files (JSON or YAML), and the error handling of ``maddnet``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .amm.checks import check_nprototypes
from .amm.encoders import ENCODERS, HASH_OBJECTIVES
from .amm.lut import GRANULARITIES
from .nn.spec import SURROGATES, LayerSpec, parse_channel_budget
from .train.distributed import RankFailedError

# what bad input raises (wrong names, shapes, values, missing files); other exceptions are
# bugs and keep their traceback
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, NotADirectoryError, RankFailedError)

DEFAULT_DEVICE = "auto"
DEVICE_HELP = "torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:1, ..."


# ---------------------------------------------------------------------------- KEY=VALUE
def parse_key_values(
    pairs: Sequence[str] | None, option: str = "KEY=VALUE", form: str = "KEY=VALUE"
) -> dict[str, Any]:
    """``["width=16", "small_input=true", "name=x"]`` -> ``{"width": 16, "small_input": True,
    "name": "x"}``: values are read as JSON where possible, else kept as strings; a later key
    replaces an earlier one. A pair without ``=`` or with an empty key raises ``ValueError``
    naming ``option`` (the flag it came from)."""
    result: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{option} takes {form} pairs, got {pair!r}")
        try:
            result[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            result[key.strip()] = value
    return result


def parse_layer_codebooks(pairs: Sequence[str] | None, option: str = "--ncodebooks") -> dict[str, int]:
    """``["fc=32", "prep.0=9"]`` -> ``{"fc": 32, "prep.0": 9}``; C must be a positive int."""
    result = parse_key_values(pairs, option, form="LAYER=C")
    for name, value in result.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{option} takes LAYER=C with C a positive integer, got {name}={value!r}")
    return result


def add_budget_arguments(group: argparse._ArgumentGroup, *, suppress: bool = False) -> None:
    """``--ncodebooks-from ANALYSIS.json``, ``--budget UNIT[:VALUE|:width=W]``,
    ``--budget-metric``, ``--budget-octaves`` and ``--budget-method``: C per layer chosen
    under a network budget (:class:`maddnet.nn.budget.CodebookBudget`, docs/encoders.md).
    ``suppress=True``: flags not given leave no attribute (a config file supplies them)."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    group.add_argument(
        "--ncodebooks-from",
        metavar="ANALYSIS.json",
        default=default(None),
        help="choose C per layer from this maddnet analyze report (single_layer.json) under --budget",
    )
    group.add_argument(
        "--budget",
        metavar="UNIT[:VALUE|:width=W]",
        default=default(None),
        help="total cost for --ncodebooks-from: UNIT lut-bytes (LUT + threshold bytes), compares "
        "(encoder compares per inference) or energy (the MADD layers' µJ per inference, cost model of "
        "docs/hardware.md: `maddnet energy` prices with its --config/--set, retrain with the defaults); "
        "VALUE an absolute total, width=W the uniform rule's cost at codebook width W (default: "
        "lut-bytes, the uniform rule at --codebook-width)",
    )
    group.add_argument(
        "--budget-metric",
        choices=["drop", "nmse"],
        default=default(None),
        help="sensitivity minimised: top-1 drop or output NMSE of the analysis (default: drop)",
    )
    group.add_argument(
        "--budget-octaves",
        type=non_negative_int,
        default=default(None),
        help="factors of 2 beyond the measured C that C may take (extrapolated; default: 0)",
    )
    group.add_argument(
        "--budget-method",
        choices=["exact", "greedy"],
        default=default(None),
        help="exact (Pareto dynamic programming) or greedy marginal gain (default: exact)",
    )


# the CodebookBudget fields set by the --budget-<field> flags (dest "budget_<field>")
BUDGET_FIELDS = ("metric", "octaves", "method")


def budget_from_args(args: argparse.Namespace, previous: Mapping[str, Any] | None = None) -> Any:
    """The :class:`~maddnet.nn.budget.CodebookBudget` of the budget flags over ``previous``
    (a config file's), or None without ``--ncodebooks-from`` in either."""
    from .nn.budget import CodebookBudget, parse_budget

    values = dict(previous or {})
    flag_dests = ["budget_" + key for key in BUDGET_FIELDS]
    analysis = getattr(args, "ncodebooks_from", None) or values.get("analysis")
    if analysis is None:
        if any(getattr(args, name, None) is not None for name in ("budget", *flag_dests)):
            raise ValueError(
                "--budget and --budget-* need --ncodebooks-from ANALYSIS.json (the sensitivity per layer)"
            )
        return None
    given = {key: getattr(args, dest, None) for key, dest in zip(BUDGET_FIELDS, flag_dests, strict=True)}
    # a flag given (0 included) wins over the config file's value
    chosen = {key: values.get(key) if given[key] is None else given[key] for key in BUDGET_FIELDS}
    options = {key: value for key, value in chosen.items() if value is not None}
    text = getattr(args, "budget", None)
    if text is None and values:
        return CodebookBudget(**{**values, **options, "analysis": analysis})
    return parse_budget(analysis, text or "lut-bytes", **options)


# ---------------------------------------------------------------------------- number types
def number_type(
    kind: type,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: bool = False,
    below: bool = False,
) -> Callable[[str], Any]:
    """An argparse ``type``: ``kind`` (int or float, finite) in ``[minimum, maximum]``
    (``above``/``below``: strictly above ``minimum`` / below ``maximum``). Bad text ends as
    the usual ``maddnet CMD: error: argument --flag: ...`` line."""
    bound = "" if minimum is None else f" {'>' if above else '>='} {minimum:g}"
    bound += "" if maximum is None else f"{' and' if bound else ''} {'<' if below else '<='} {maximum:g}"
    what = f"{'an integer' if kind is int else 'a number'}{bound}"

    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        bad_min = minimum is not None and (value <= minimum if above else value < minimum)
        bad_max = maximum is not None and (value >= maximum if below else value > maximum)
        if not math.isfinite(value) or bad_min or bad_max:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    convert.__name__ = what
    return convert


positive_int = number_type(int, minimum=1)
non_negative_int = number_type(int, minimum=0)
positive_float = number_type(float, minimum=0, above=True)
non_negative_float = number_type(float, minimum=0)
fraction = number_type(float, minimum=0, maximum=1)
fraction_below_one = number_type(float, minimum=0, maximum=1, below=True)


def nprototypes_type(text: str) -> int:
    """K: a power of two in 4..256 (as ``LayerSpec.nprototypes``)."""
    value = number_type(int, minimum=4, maximum=256)(text)
    try:
        check_nprototypes(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def lut_bits_type(text: str) -> int | None:
    """LUT bits 1..8; ``0`` or ``none``: float LUTs (None)."""
    if text.strip().lower() in ("0", "none"):
        return None
    return number_type(int, minimum=1, maximum=8)(text)


def ridge_type(text: str) -> float | None:
    """A positive ridge lambda, or ``none`` (None: keep the encoder's prototypes)."""
    if text.strip().lower() == "none":
        return None
    return positive_float(text)


# ---------------------------------------------------------------------------- execution
def device_type(text: str) -> str:
    """``auto`` or anything ``torch.device`` accepts (checked, not resolved)."""
    import torch

    if text == "auto":
        return text
    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use auto, cpu, cuda or cuda:N") from None
    return text


def resolve_device(name: str | None = None) -> str:
    """The device every sub-command uses: ``auto`` (the default) is ``cuda`` when torch sees
    a GPU, else ``cpu``; other names pass through (validated)."""
    import torch

    from .train.distributed import pick_device

    try:
        device = pick_device(name or DEFAULT_DEVICE)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} is not available: torch sees no GPU; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r} is not available: torch sees {torch.cuda.device_count()} GPU(s)"
            )
    return str(device)


def add_execution_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    *,
    device: bool = True,
    suppress: bool = False,
) -> None:
    """``--device`` (default auto), ``--threads N`` and ``--no-progress`` (dest ``progress``).
    ``suppress=True``: flags not given leave no attribute (a config file supplies them)."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    if device:
        parser.add_argument(
            "--device",
            type=device_type,
            default=default(DEFAULT_DEVICE),
            help=f"{DEVICE_HELP} (default: auto)",
        )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=default(None),
        help="torch and numba CPU threads (default: torch's default, all cores)",
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", default=default(True), help="no progress bars"
    )


def set_threads_from(threads: int | None) -> None:
    """``--threads``: set torch's and numba's thread counts (nothing when None)."""
    if threads:
        from .threads import set_threads

        set_threads(threads)


# ---------------------------------------------------------------------------- LayerSpec flags
def channel_budget_type(text: str) -> float | int | None:
    """``--channel-budget``: :func:`maddnet.nn.spec.parse_channel_budget`, its message as
    argparse's error (not "invalid parse_channel_budget value")."""
    try:
        return parse_channel_budget(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _spec_flag_options() -> dict[str, dict[str, Any]]:
    """How each LayerSpec field reads from the command line where its default's type does
    not say it all (fields not listed here get ``--name`` and a type from their default)."""
    return {
        "nprototypes": {"flags": ("--nprototypes", "-K"), "type": nprototypes_type, "metavar": "K"},
        "encoder": {"choices": sorted(ENCODERS)},
        "encoder_options": {"flags": ("--encoder-option",)},
        "ridge": {"type": ridge_type, "metavar": "LAMBDA|none", "note": "write None as none"},
        "hash_objective": {"choices": list(HASH_OBJECTIVES)},
        "refine_sweeps": {"type": non_negative_int, "metavar": "SWEEPS"},
        "lut_bits": {"type": lut_bits_type, "metavar": "BITS", "note": "write None as 0 or none"},
        "lut_granularity": {"choices": list(GRANULARITIES)},
        "surrogate": {"choices": list(SURROGATES)},
        "channel_budget": {"type": channel_budget_type, "metavar": "FRACTION|COUNT|none"},
    }


def _field_default(spec_field: dataclasses.Field) -> Any:
    if spec_field.default is not dataclasses.MISSING:
        return spec_field.default
    return spec_field.default_factory()  # type: ignore[misc]


def _show(value: Any) -> str:
    if value is None:
        return "none"
    return json.dumps(value) if isinstance(value, Mapping) else str(value)


def spec_dest(name: str) -> str:
    """Namespace attribute of LayerSpec field ``name``."""
    return f"spec_{name}"


def add_spec_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """One flag per :class:`LayerSpec` field, with the field's help text and default.

    Flags not given leave no attribute, so :func:`spec_from_args` changes only what the user
    set (the defaults are LayerSpec's, or a config file's spec)."""
    group = parser.add_argument_group("MADD layer settings (maddnet.nn.LayerSpec)")
    options = _spec_flag_options()
    for spec_field in dataclasses.fields(LayerSpec):
        name, default = spec_field.name, _field_default(spec_field)
        extra = dict(options.get(name, {}))
        flags = extra.pop("flags", ("--" + name.replace("_", "-"),))
        note = extra.pop("note", None)
        text = spec_field.metadata.get("help", "") + (f"; {note}" if note else "")
        kwargs: dict[str, Any] = {"dest": spec_dest(name), "default": argparse.SUPPRESS}
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, Mapping):
            kwargs.update(nargs="+", action="extend", metavar="KEY=VALUE")
            text += " (repeatable; values are JSON or strings)"
        elif isinstance(default, int):
            kwargs.update(type=positive_int, metavar=name.upper())
        elif isinstance(default, float):
            kwargs.update(type=positive_float, metavar=name.upper())
        kwargs.update(extra)
        help_text = f"{text} (default: {_show(default)})"
        group.add_argument(*flags, help=help_text.replace("%", "%%"), **kwargs)
    return group


def spec_changes_from_args(args: argparse.Namespace, base: LayerSpec | None = None) -> dict[str, Any]:
    """The LayerSpec fields given on the command line, as ``{field: value}``;
    ``--encoder-option`` pairs are merged over ``base.encoder_options``."""
    changes: dict[str, Any] = {}
    for spec_field in dataclasses.fields(LayerSpec):
        dest = spec_dest(spec_field.name)
        if not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if spec_field.name == "encoder_options":
            previous = dict(base.encoder_options) if base is not None else {}
            value = {**previous, **parse_key_values(value, "--encoder-option")}
        changes[spec_field.name] = value
    return changes


def spec_from_args(args: argparse.Namespace, base: LayerSpec | None = None) -> LayerSpec:
    """``base`` (default ``LayerSpec()``) with the spec flags that were given; invalid
    combinations raise ``ValueError`` (LayerSpec's checks)."""
    base = LayerSpec() if base is None else base
    changes = spec_changes_from_args(args, base)
    return base.replace(**changes) if changes else base


# ---------------------------------------------------------------------------- config files
def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A mapping from a JSON or YAML file (``.yaml``/``.yml`` are YAML; anything else is
    read as JSON, then as YAML). Errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        values = _load_yaml(text, path)
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            if path.suffix.lower() == ".json":
                raise ValueError(f"config file {str(path)!r} is not valid JSON: {error}") from None
            values = _load_yaml(text, path)
    if not isinstance(values, dict):
        kind = type(values).__name__
        raise ValueError(f"config file {str(path)!r} must hold a mapping of settings, got {kind}")
    return values


def _load_yaml(text: str, path: Path) -> Any:
    try:
        import yaml
    except ImportError:  # pragma: no cover - pyyaml is a dependency
        raise ValueError(f"reading {str(path)!r} needs PyYAML: pip install pyyaml") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"config file {str(path)!r} is not valid YAML: {error}") from None


# ---------------------------------------------------------------------------- running
def run_parsed(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen sub-command (``args.func``). Bad input ends with one
    ``<prog> <command>: error: ...`` line and exit code 2 (argparse's own errors too); set
    ``MADDNET_TRACEBACK=1`` to see the traceback instead."""
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as error:
        if os.environ.get("MADDNET_TRACEBACK"):
            raise
        # KeyError's str() is the repr of its argument: show the message without quotes
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"{parser.prog} {args.command}: error: {message}", file=sys.stderr)
        return 2
