"""The parameters of the energy model: per-operation and per-byte constants, the technology
scaling rule, and the accelerator configuration.

Two dataclasses, both JSON-friendly and validated when built:

* :class:`EnergyConstants`: energy per operation and per byte at the reference technology
  (45 nm, 0.9 V: Horowitz, ISSCC 2014) and the rule that scales them to another
  technology. Every field carries its unit and its source in ``metadata`` (``"source"``
  says which figure is from which publication and which is an assumption); ``maddnet
  energy --list-constants`` prints them.

References: M. Horowitz, "Computing's energy problem (and what we can do about it)", IEEE
International Solid-State Circuits Conference (ISSCC) 2014 (energy per operation and per
64-bit memory access, 45 nm, 0.9 V); J. Schönleber, L. Cavigelli, R. Andri, M. Perotti, L. Benini, "Stella
Nera: Achieving 161 TOp/s/W with Multiplier-free DNN Acceleration based on Approximate Matrix
Multiplication", arXiv:2311.10207, 2023, and its RTL and scripts at
github.com/joennlae/halutmatmul.
* :class:`AcceleratorConfig`: what the accelerator has (encoder and decoder units, LUT
  memory, activation and parameter memories, clock, the dense baseline's MAC array) and
  the number formats it computes in.

:func:`load_cost_model` reads both from one flat JSON mapping (``--config FILE``) plus
``KEY=VALUE`` overrides (``--set``); unknown keys are an error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# full references: module docstring and docs/hardware.md
HOROWITZ = "Horowitz, ISSCC 2014 (45 nm, 0.9 V)"
STELLA_NERA = "Schönleber et al., Stella Nera, arXiv:2311.10207"
STELLA_NERA_RTL = "Stella Nera RTL (github.com/joennlae/halutmatmul, hardware/rtl/halut_encoder_4.sv)"
ASSUMPTION = "assumption"

KIB = 1024
MIB = 1024 * 1024


def _field(default: Any, unit: str, source: str, help: str) -> Any:  # noqa: A002 (the CLI's word)
    return field(default=default, metadata={"unit": unit, "source": source, "help": help})


@dataclass(frozen=True)
class EnergyConstants:
    """Energy per operation and per byte at ``reference_nm`` and the rule that scales it.

    Scaling rule (:meth:`scale`): logic and SRAM energies are multiplied by
    ``(technology_nm / reference_nm) ** scaling_exponent * voltage_scale ** 2``; DRAM energy
    is not scaled (it is set by the DRAM and its interface, not the accelerator's node).
    With the default exponent 1 energy per operation falls linearly with the feature size
    (switched capacitance ~ feature size, supply voltage roughly constant since the end of
    Dennard scaling: 0.9 V at 45 nm, 0.8 V at 22 nm): 45 nm -> 22 nm divides by 2.05. A
    cross-check, not a source: the Stella Nera authors' own analysis script scales their
    22 nm results to 7 nm by 1.17 (delay) x 2.286 (power), i.e. energy per operation
    / 2.67 for 22 -> 7 nm, an exponent of 0.86 in this rule.

    SRAM read energy per byte of a memory of S bytes: log-log interpolation between
    Horowitz's three cache sizes (8 KiB, 32 KiB, 1 MiB; per 64-bit read), extrapolated with
    ``sram_small_exponent`` below 8 KiB (the LUT and threshold banks are small) and with the
    32 KiB-1 MiB slope above 1 MiB. Writes cost ``write_factor`` times a read.

    The two MAC constants are sums of Horowitz's figures: FP16 MAC = FP16 multiply + FP16
    add (FP16 accumulation), INT8 MAC = INT8 multiply + 32-bit add (32-bit accumulation).
    """

    reference_nm: float = _field(45.0, "nm", HOROWITZ, "technology of the energy figures below")
    technology_nm: float = _field(
        45.0, "nm", "user's choice", "technology to estimate for (--technology-nm); energies are scaled to it"
    )
    scaling_exponent: float = _field(
        1.0,
        "",
        ASSUMPTION + " (linear in feature size; the Stella Nera script's 22->7 nm scaling implies 0.86)",
        "energy ~ (technology_nm / reference_nm) ** scaling_exponent",
    )
    voltage_scale: float = _field(
        1.0, "", ASSUMPTION, "supply voltage / the technology's nominal voltage; energy ~ voltage_scale**2"
    )
    int8_add_pj: float = _field(0.03, "pJ", HOROWITZ, "8-bit integer add")
    int16_add_pj: float = _field(
        0.05,
        "pJ",
        ASSUMPTION + " (linear between Horowitz's 8-bit and 32-bit adds)",
        "16-bit integer add (LUT accumulation up to 16 bits)",
    )
    int32_add_pj: float = _field(0.1, "pJ", HOROWITZ, "32-bit integer add (LUT accumulation above 16 bits)")
    fp16_add_pj: float = _field(0.4, "pJ", HOROWITZ, "FP16 add (encoder adds of non-tree encoders)")
    fp32_add_pj: float = _field(0.9, "pJ", HOROWITZ, "FP32 add (accumulation of float LUTs)")
    fp16_mult_pj: float = _field(1.1, "pJ", HOROWITZ, "FP16 multiply (de-quantisation, encoder multiplies)")
    fp16_compare_pj: float = _field(
        0.05,
        "pJ",
        ASSUMPTION + " (= a 16-bit integer add; Horowitz lists no compare)",
        "FP16 compare of an input against a threshold (the encoder's operation)",
    )
    fp16_mac_pj: float = _field(
        1.5,
        "pJ",
        HOROWITZ + ": FP16 multiply 1.1 + FP16 add 0.4",
        "FP16 multiply-accumulate (dense baseline)",
    )
    int8_mac_pj: float = _field(
        0.3,
        "pJ",
        HOROWITZ + ": INT8 multiply 0.2 + 32-bit add 0.1",
        "INT8 multiply-accumulate (dense baseline)",
    )
    sram_8kib_pj: float = _field(10.0, "pJ per 64-bit read", HOROWITZ, "read of an 8 KiB SRAM (cache)")
    sram_32kib_pj: float = _field(20.0, "pJ per 64-bit read", HOROWITZ, "read of a 32 KiB SRAM")
    sram_1mib_pj: float = _field(100.0, "pJ per 64-bit read", HOROWITZ, "read of a 1 MiB SRAM")
    sram_small_exponent: float = _field(
        0.5,
        "",
        ASSUMPTION + " (word and bit lines ~ sqrt(bits))",
        "read energy ~ size ** exponent below 8 KiB (LUT, threshold and weight banks)",
    )
    write_factor: float = _field(1.0, "", ASSUMPTION, "SRAM write energy / read energy")
    dram_pj_per_64bit: float = _field(
        1950.0,
        "pJ per 64-bit access",
        HOROWITZ + " lists 1.3-2.6 nJ; midpoint (" + ASSUMPTION + "); not scaled with technology",
        "off-chip DRAM access",
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value!r}")
            if value < 0 or (value == 0 and f.name in _POSITIVE_CONSTANTS):
                bound = "> 0" if f.name in _POSITIVE_CONSTANTS else ">= 0"
                raise ValueError(f"{f.name} must be {bound}, got {value!r}")
        if not self.sram_8kib_pj <= self.sram_32kib_pj <= self.sram_1mib_pj:
            raise ValueError(
                "SRAM energies must not fall with size (sram_8kib_pj <= sram_32kib_pj <= sram_1mib_pj)"
            )

    # ------------------------------------------------------------------ scaling
    def scale(self) -> float:
        """Factor from ``reference_nm`` to ``technology_nm`` (and ``voltage_scale``) for
        logic and SRAM energies."""
        return (self.technology_nm / self.reference_nm) ** self.scaling_exponent * self.voltage_scale**2

    def op_pj(self, name: str) -> float:
        """Scaled energy (pJ) of operation ``name``: a ``*_pj`` field without the suffix,
        e.g. ``op_pj("fp16_compare")``."""
        return getattr(self, f"{name}_pj") * self.scale()

    def add_pj(self, bits: int) -> float:
        """Scaled energy of an integer add of ``bits`` bits (8, 16 or 32-bit adder)."""
        if bits <= 8:
            return self.op_pj("int8_add")
        return self.op_pj("int16_add") if bits <= 16 else self.op_pj("int32_add")

    def sram_pj_per_byte(self, size_bytes: float) -> float:
        """Scaled read energy per byte of an SRAM (or latch bank) of ``size_bytes``."""
        points = [
            (8 * KIB, self.sram_8kib_pj / 8),
            (32 * KIB, self.sram_32kib_pj / 8),
            (MIB, self.sram_1mib_pj / 8),
        ]
        size = max(float(size_bytes), 1.0)
        if size <= points[0][0]:
            energy = points[0][1] * (size / points[0][0]) ** self.sram_small_exponent
        else:
            pairs = list(zip(points, points[1:], strict=False))
            (s0, e0), (s1, e1) = next(((a, b) for a, b in pairs if size <= b[0]), pairs[-1])
            slope = math.log(e1 / e0) / math.log(s1 / s0) if e0 > 0 else 0.0
            energy = e0 * (size / s0) ** slope
        return energy * self.scale()

    def dram_pj_per_byte(self) -> float:
        """DRAM energy per byte (not scaled with the technology)."""
        return self.dram_pj_per_64bit / 8


_POSITIVE_CONSTANTS = {"reference_nm", "technology_nm", "voltage_scale", "sram_8kib_pj", "write_factor"}

DENSE_PRECISIONS = ("fp16", "int8")


@dataclass(frozen=True)
class AcceleratorConfig:
    """The accelerator the counts run on, and the dense baseline it is compared with.

    MADD engine (modelled on Stella Nera, arXiv:2311.10207): ``encoder_units`` tree
    encoders, each evaluating one tree level (one compare) per cycle, so
    ``encoder_units / log2 K`` codes per cycle; the codes are buffered and broadcast to
    ``decoder_units`` decoders, each holding one output column's LUT (C K entries) in its
    own bank and doing one LUT read and one add per cycle. A layer with M outputs takes
    ceil(M / decoder_units) passes over the buffered codes. ``lut_memory_bytes`` is the
    LUT memory of all decoders together: a column whose LUT exceeds its bank is processed
    in chunks of codebooks, its partial sums written to and read back from the activation
    memory.

    Dense baseline: a ``dense_array_rows`` x ``dense_array_cols`` MAC array, weight
    stationary: inputs are broadcast along the columns (each input read once per group of
    ``dense_array_cols`` outputs), each weight is read from its PE's bank once per group of
    ``dense_array_rows`` rows and reused from a register (register energy is not counted,
    for either engine).

    Both: activations are read from / written to the activation memory when a layer's
    input and output fit in it together, else DRAM; parameters (LUTs, thresholds,
    weights) are loaded once per batch from the parameter memory when the network's
    parameters fit in it, else from DRAM, and written into the units' banks.
    """

    clock_hz: float = _field(500e6, "Hz", ASSUMPTION, "clock of both engines (latency, power)")
    encoder_units: int = _field(
        4, "", STELLA_NERA_RTL + ": 4 encoder units, one tree level per cycle", "tree encoder units"
    )
    decoder_units: int = _field(
        32,
        "",
        ASSUMPTION + " (Stella Nera's analysis uses 8 to 32)",
        "decoder units (LUT read + add per cycle)",
    )
    lut_memory_bytes: int = _field(
        32 * 512,
        "bytes",
        ASSUMPTION + " (32 banks of 512 B: C = 32, K = 16, INT8, as Stella Nera's C = 32 design)",
        "LUT memory of all decoder units together",
    )
    activation_memory_bytes: int = _field(256 * KIB, "bytes", ASSUMPTION, "on-chip activation memory")
    parameter_memory_bytes: int = _field(
        4 * MIB,
        "bytes",
        ASSUMPTION + " (holds the parameters of ResNet-9, DS-CNN-S and LeViT-tiny, at most 2.6 MB; "
        "not ResNet-50's)",
        "on-chip memory for parameters (LUTs, thresholds, weights)",
    )
    dense_array_rows: int = _field(
        32, "", ASSUMPTION, "rows of the dense baseline's MAC array (weight reuse)"
    )
    dense_array_cols: int = _field(
        32, "", ASSUMPTION, "columns of the dense baseline's MAC array (input reuse)"
    )
    dense_precision: str = _field(
        "fp16",
        "",
        ASSUMPTION,
        "number format of the dense baseline: fp16 or int8 (weights, activations, MACs)",
    )
    activation_bits: int = _field(
        16, "bits", STELLA_NERA_RTL + " (FP16 encoder inputs)", "activations of the MADD network (FP16)"
    )
    threshold_bits: int = _field(16, "bits", STELLA_NERA_RTL, "encoder thresholds and split indices")
    resident_parameters: bool = _field(
        False,
        "",
        ASSUMPTION,
        "parameters stay in the units' banks across inferences (storage for the whole network): "
        "no parameter loading is counted",
    )
    static_power_w: float = _field(
        0.0,
        "W",
        ASSUMPTION + " (operation-level model: no leakage)",
        "static power of the engine while it runs",
    )

    def __post_init__(self) -> None:
        for name in (
            "encoder_units",
            "decoder_units",
            "lut_memory_bytes",
            "activation_memory_bytes",
            "parameter_memory_bytes",
            "dense_array_rows",
            "dense_array_cols",
            "activation_bits",
            "threshold_bits",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if (
            isinstance(self.clock_hz, bool)
            or not isinstance(self.clock_hz, int | float)
            or not self.clock_hz > 0
        ):
            raise ValueError(f"clock_hz must be a number > 0, got {self.clock_hz!r}")
        if not isinstance(self.static_power_w, int | float) or not self.static_power_w >= 0:
            raise ValueError(f"static_power_w must be a number >= 0, got {self.static_power_w!r}")
        if not isinstance(self.resident_parameters, bool):
            raise ValueError(f"resident_parameters must be true or false, got {self.resident_parameters!r}")
        if self.dense_precision not in DENSE_PRECISIONS:
            raise ValueError(
                f"dense_precision must be one of {DENSE_PRECISIONS}, got {self.dense_precision!r}"
            )

    @property
    def dense_bytes(self) -> int:
        """Bytes per weight and per activation of the dense baseline."""
        return 2 if self.dense_precision == "fp16" else 1


@dataclass(frozen=True)
class CostModel:
    """The constants and the accelerator: everything an estimate depends on besides the network."""

    constants: EnergyConstants = field(default_factory=EnergyConstants)
    accelerator: AcceleratorConfig = field(default_factory=AcceleratorConfig)

    def to_dict(self) -> dict[str, Any]:
        """One flat mapping of every parameter (the form ``--config`` files take)."""
        return {**dataclasses.asdict(self.constants), **dataclasses.asdict(self.accelerator)}

    def replace(self, **changes: Any) -> CostModel:
        """A copy with flat ``changes`` (fields of either dataclass); unknown keys raise."""
        known_c = {f.name for f in dataclasses.fields(EnergyConstants)}
        known_a = {f.name for f in dataclasses.fields(AcceleratorConfig)}
        unknown = sorted(set(changes) - known_c - known_a)
        if unknown:
            raise ValueError(f"unknown cost-model keys {unknown}; known keys: {sorted(known_c | known_a)}")
        constants = {k: v for k, v in changes.items() if k in known_c}
        accelerator = {k: v for k, v in changes.items() if k in known_a}
        try:
            return CostModel(
                dataclasses.replace(self.constants, **constants),
                dataclasses.replace(self.accelerator, **accelerator),
            )
        except TypeError as error:  # pragma: no cover - dataclasses.replace with bad types
            raise ValueError(str(error)) from None


def parameter_table() -> list[dict[str, Any]]:
    """Rows ``{"name", "default", "unit", "source", "help"}`` of every model parameter."""
    rows = []
    for cls in (EnergyConstants, AcceleratorConfig):
        for f in dataclasses.fields(cls):
            rows.append(
                {
                    "name": f.name,
                    "default": f.default,
                    "unit": f.metadata.get("unit", ""),
                    "source": f.metadata.get("source", ""),
                    "help": f.metadata.get("help", ""),
                }
            )
    return rows


def load_cost_model(
    path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None
) -> CostModel:
    """The default :class:`CostModel` with the values of a JSON file (one flat mapping of
    parameter names, or ``{"constants": {...}, "accelerator": {...}}``) and then
    ``overrides``. Errors (missing file, bad JSON, unknown key, bad value) raise
    ``ValueError``/``FileNotFoundError`` naming the problem."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"cost-model config {str(path)!r} does not exist")
        try:
            loaded = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"cost-model config {str(path)!r} is not valid JSON: {error}") from None
        if not isinstance(loaded, dict):
            raise ValueError(
                f"cost-model config {str(path)!r} must hold a JSON object, got {type(loaded).__name__}"
            )
        for section in ("constants", "accelerator"):
            nested = loaded.pop(section, None)
            if nested is not None:
                if not isinstance(nested, dict):
                    raise ValueError(f"section {section!r} of {str(path)!r} must be an object")
                values.update(nested)
        values.update(loaded)
    values.update(overrides or {})
    return CostModel().replace(**values)
