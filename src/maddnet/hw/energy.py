"""Energy per inference: counts (:mod:`maddnet.hw.counts`) times constants
(:mod:`maddnet.hw.costs`), per layer and for the whole network, for the MADD network and
for the dense network it came from, side by side.

Every energy is a sum of ``count x energy per operation`` or ``bytes x energy per byte``
terms (:func:`madd_layer_energy`, :func:`dense_layer_energy`); nothing else is added
except the optional static power times the run time. "MAC/s/W" is multiply-accumulates
per joule: the dense network's MACs (N D M per conv/linear layer, plus its other matrix
products) divided by the energy of one inference of the network in question, so the MADD
network's figure is throughput-equivalent (MACs it replaces, not operations it performs).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .costs import CostModel
from .counts import LayerShape, dense_counts, dense_cycles, madd_counts, madd_cycles
from .network import Network

# energy components, grouped for tables and plots
GROUPS = {
    "compute": ("compares", "encoder_arith", "accumulate", "dequantize", "mac"),
    "local memory": ("threshold_reads", "lut_reads", "weight_reads"),
    "activations": ("input_reads", "output_writes", "codes", "partial_sums"),
    "activations in DRAM": ("dram_activations",),
    "parameters": ("parameter_load",),
    "static": ("static",),
}


@dataclass
class LayerEstimate:
    """One layer in one network variant: its counts, energy per component (pJ), cycles."""

    name: str
    engine: str  # "madd" or "dense"
    counts: dict[str, int]
    energy_pj: dict[str, float]
    cycles: int
    bytes_moved: dict[str, int] = field(default_factory=dict)

    @property
    def total_pj(self) -> float:
        return sum(self.energy_pj.values())


def _activation_pj(shape: LayerShape, value_bytes: float, model: CostModel) -> tuple[float, float]:
    """(pJ per byte of activation-memory traffic, pJ of DRAM spill traffic of the layer).

    Every counted read and write of activations, codes and partial sums goes to the on-chip
    activation memory. When the layer's input and output do not fit in it together, the
    input is also read once from DRAM into it and the output written once to DRAM (the
    layer is then processed in tiles of rows from the on-chip copy)."""
    acc, c = model.accelerator, model.constants
    per_byte = c.sram_pj_per_byte(acc.activation_memory_bytes)
    tensor_bytes = (shape.input_values + shape.output_values) * value_bytes
    if tensor_bytes <= acc.activation_memory_bytes:
        return per_byte, 0.0
    return per_byte, tensor_bytes * (c.dram_pj_per_byte() + per_byte * c.write_factor)


def _parameter_source_pj_per_byte(total_bytes: int, model: CostModel) -> float:
    acc, c = model.accelerator, model.constants
    if total_bytes <= acc.parameter_memory_bytes:
        return c.sram_pj_per_byte(acc.parameter_memory_bytes)
    return c.dram_pj_per_byte()


def madd_parameter_bytes(shape: LayerShape, model: CostModel) -> int:
    counts = madd_counts(shape, model.accelerator)
    return counts["lut_bytes"] + counts["encoder_bytes"] + counts["constant_bytes"]


def dense_parameter_bytes(shape: LayerShape, model: CostModel) -> int:
    counts = dense_counts(shape, model.accelerator)
    return counts["weight_bytes"] + counts["constant_bytes"]


def madd_layer_energy(shape: LayerShape, model: CostModel, parameter_pj_per_byte: float) -> LayerEstimate:
    """Energy of one inference of a MADD layer (``shape.madd`` set), by component (pJ):

    compares x FP16 compare; encoder adds/multiplies x FP16 add/multiply; threshold reads x
    threshold bytes x SRAM(threshold bank = encoder bytes / encoder units); LUT reads x
    entry bytes x SRAM(LUT bank = one column's LUT, at most ``lut_memory_bytes / U``); LUT
    adds x integer add of the accumulator width (FP32 add for float LUTs); de-quantisation
    multiplies x FP16 multiply; input reads and output writes x activation bytes x
    activation memory; DRAM spill (see :func:`_activation_pj`); code writes and reads x
    log2 K / 8 bytes x activation memory; partial sums x 4 bytes x activation memory;
    parameter bytes x (parameter memory or DRAM + bank write); static power x cycles / clock.
    """
    c, acc = model.constants, model.accelerator
    p = shape.madd
    counts = madd_counts(shape, acc)
    act_bytes = acc.activation_bits / 8
    act, spill = _activation_pj(shape, act_bytes, model)
    entry_bytes = p.entry_bits / 8
    column_bytes = math.ceil(p.ncodebooks * p.nprototypes * entry_bytes)
    lut_bank = min(column_bytes, max(1, acc.lut_memory_bytes // acc.decoder_units))
    threshold_bank = max(1, counts["encoder_bytes"] / acc.encoder_units)
    accumulate = c.op_pj("fp32_add") if p.lut_bits is None else c.add_pj(p.accumulator_bits)
    parameter_bytes = counts["lut_bytes"] + counts["encoder_bytes"] + counts["constant_bytes"]
    bank_write = c.write_factor * (
        counts["lut_bytes"] * c.sram_pj_per_byte(lut_bank)
        + counts["encoder_bytes"] * c.sram_pj_per_byte(threshold_bank)
        + counts["constant_bytes"] * c.sram_pj_per_byte(lut_bank)
    )
    cycles = madd_cycles(shape, acc)
    code_bytes = p.depth / 8
    energy = {
        "compares": counts["compares"] * c.op_pj("fp16_compare"),
        "encoder_arith": counts["encoder_adds"] * c.op_pj("fp16_add")
        + counts["encoder_multiplies"] * c.op_pj("fp16_mult"),
        "threshold_reads": counts["threshold_reads"]
        * (acc.threshold_bits / 8)
        * c.sram_pj_per_byte(threshold_bank),
        "lut_reads": counts["lut_reads"] * entry_bytes * c.sram_pj_per_byte(lut_bank),
        "accumulate": counts["lut_adds"] * accumulate,
        "dequantize": counts["dequant_multiplies"] * c.op_pj("fp16_mult"),
        "input_reads": counts["input_reads"] * act_bytes * act,
        "output_writes": counts["output_writes"] * act_bytes * act * c.write_factor,
        "codes": (counts["code_writes"] * c.write_factor + counts["code_reads"]) * code_bytes * act,
        "partial_sums": counts["partial_sums"] * 4 * act * (1 + c.write_factor) / 2,
        "dram_activations": spill,
        "parameter_load": 0.0
        if acc.resident_parameters
        else parameter_bytes * parameter_pj_per_byte + bank_write,
        "static": acc.static_power_w * cycles / acc.clock_hz * 1e12,
    }
    moved = {
        "input_bytes": round(counts["input_reads"] * act_bytes),
        "parameter_bytes": parameter_bytes,
        "lut_bytes": counts["lut_bytes"],
        "threshold_bytes": counts["encoder_bytes"],
        "output_bytes": round(counts["output_writes"] * act_bytes),
        "code_bytes": round((counts["code_writes"] + counts["code_reads"]) * code_bytes),
    }
    return LayerEstimate(shape.name, "madd", counts, energy, cycles, moved)


def dense_layer_energy(shape: LayerShape, model: CostModel, parameter_pj_per_byte: float) -> LayerEstimate:
    """Energy of one inference of a dense conv/linear layer on the baseline array, by
    component (pJ): MACs x FP16 (or INT8) MAC; weight reads x weight bytes x SRAM(weight
    bank = one output column's D weights); input reads and output writes x activation
    bytes x activation memory; DRAM spill (see :func:`_activation_pj`); parameter bytes x
    (parameter memory or DRAM + bank write); static power x cycles / clock."""
    c, acc = model.constants, model.accelerator
    counts = dense_counts(shape, acc)
    value_bytes = acc.dense_bytes
    act, spill = _activation_pj(shape, value_bytes, model)
    bank = shape.in_dim * value_bytes
    mac = c.op_pj("fp16_mac" if acc.dense_precision == "fp16" else "int8_mac")
    parameter_bytes = counts["weight_bytes"] + counts["constant_bytes"]
    cycles = dense_cycles(shape, acc)
    energy = {
        "mac": counts["macs"] * mac,
        "weight_reads": counts["weight_reads"] * value_bytes * c.sram_pj_per_byte(bank),
        "input_reads": counts["input_reads"] * value_bytes * act,
        "output_writes": counts["output_writes"] * value_bytes * act * c.write_factor,
        "dram_activations": spill,
        "parameter_load": 0.0
        if acc.resident_parameters
        else parameter_bytes * (parameter_pj_per_byte + c.write_factor * c.sram_pj_per_byte(bank)),
        "static": acc.static_power_w * cycles / acc.clock_hz * 1e12,
    }
    moved = {
        "input_bytes": counts["input_reads"] * value_bytes,
        "parameter_bytes": parameter_bytes,
        "weight_bytes": counts["weight_bytes"],
        "output_bytes": counts["output_writes"] * value_bytes,
    }
    return LayerEstimate(shape.name, "dense", counts, energy, cycles, moved)


@dataclass
class VariantEstimate:
    """One network variant (the MADD network or the dense one): its layers and totals."""

    variant: str
    layers: list[LayerEstimate]
    other_macs: int
    other_pj: float
    macs: int
    parameter_bytes: int
    parameters_on_chip: bool
    clock_hz: float

    @property
    def energy_pj(self) -> float:
        return sum(layer.total_pj for layer in self.layers) + self.other_pj

    @property
    def cycles(self) -> int:
        return sum(layer.cycles for layer in self.layers)

    def by_component(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for layer in self.layers:
            for key, value in layer.energy_pj.items():
                totals[key] = totals.get(key, 0.0) + value
        totals["mac"] = totals.get("mac", 0.0) + self.other_pj
        return totals

    def by_group(self) -> dict[str, float]:
        components = self.by_component()
        return {group: sum(components.get(k, 0.0) for k in keys) for group, keys in GROUPS.items()}

    def summary(self, batch: int) -> dict[str, Any]:
        seconds = self.cycles / self.clock_hz
        joules = self.energy_pj * 1e-12
        return {
            "variant": self.variant,
            "energy_uj_per_inference": joules / batch * 1e6,
            "macs_per_inference": self.macs / batch,
            "tmacs_per_w": self.macs / joules / 1e12 if joules > 0 else math.inf,
            "latency_ms_per_batch": seconds * 1e3,
            "gmacs_per_s": self.macs / seconds / 1e9 if seconds > 0 else math.inf,
            "power_mw": joules / seconds * 1e3 if seconds > 0 else 0.0,
            "parameter_bytes": self.parameter_bytes,
            "parameters_on_chip": self.parameters_on_chip,
            "energy_uj_by_group": {k: v * 1e-6 / batch for k, v in self.by_group().items()},
        }


def _variant(network: Network, model: CostModel, madd: bool) -> VariantEstimate:
    acc, c = model.accelerator, model.constants
    uses_madd = [bool(madd and shape.madd is not None) for shape in network.layers]
    parameter_bytes = sum(
        madd_parameter_bytes(shape, model) if is_madd else dense_parameter_bytes(shape, model)
        for shape, is_madd in zip(network.layers, uses_madd, strict=True)
    )
    source = _parameter_source_pj_per_byte(parameter_bytes, model)
    layers = [
        madd_layer_energy(shape, model, source) if is_madd else dense_layer_energy(shape, model, source)
        for shape, is_madd in zip(network.layers, uses_madd, strict=True)
    ]
    mac = c.op_pj("fp16_mac" if acc.dense_precision == "fp16" else "int8_mac")
    return VariantEstimate(
        variant="madd" if madd else "dense",
        layers=layers,
        other_macs=network.other_macs,
        other_pj=network.other_macs * mac,
        macs=sum(shape.macs for shape in network.layers) + network.other_macs,
        parameter_bytes=parameter_bytes,
        parameters_on_chip=parameter_bytes <= acc.parameter_memory_bytes,
        clock_hz=acc.clock_hz,
    )


@dataclass
class NetworkEstimate:
    """The MADD network and the dense network under one cost model."""

    network: Network
    model: CostModel
    madd: VariantEstimate
    dense: VariantEstimate

    def layer_rows(self) -> list[dict[str, Any]]:
        """One row per conv/linear layer: shape, MADD counts and bytes, energies of both."""
        rows = []
        for shape, m, d in zip(self.network.layers, self.madd.layers, self.dense.layers, strict=True):
            p = shape.madd
            row: dict[str, Any] = {
                "layer": shape.name,
                "kind": shape.kind + ("" if shape.groups == 1 else f" (groups={shape.groups})"),
                "engine": m.engine,
                "rows": shape.rows,
                "D": shape.in_dim,
                "M": shape.out_dim,
                "C": p.ncodebooks if p else None,
                "D_per_C": round(shape.in_dim / p.ncodebooks, 2) if p else None,
                "K": p.nprototypes if p else None,
                "lut_bits": (p.lut_bits if p.lut_bits is not None else "float") if p else None,
                "encoder": p.encoder if p else None,
                "macs": shape.macs,
                "compares": m.counts.get("compares", 0),
                "encoder_adds": m.counts.get("encoder_adds", 0),
                "encoder_multiplies": m.counts.get("encoder_multiplies", 0),
                "lut_reads": m.counts.get("lut_reads", 0),
                "lut_adds": m.counts.get("lut_adds", 0),
                "input_bytes": m.bytes_moved["input_bytes"],
                "lut_threshold_bytes": m.bytes_moved.get("lut_bytes", 0)
                + m.bytes_moved.get("threshold_bytes", 0),
                "output_bytes": m.bytes_moved["output_bytes"],
                "dense_input_bytes": d.bytes_moved["input_bytes"],
                "dense_weight_bytes": d.bytes_moved["weight_bytes"],
                "madd_energy_nj": m.total_pj / 1e3,
                "dense_energy_nj": d.total_pj / 1e3,
                "madd_tmacs_per_w": shape.macs / m.total_pj if m.total_pj else None,
                "dense_tmacs_per_w": shape.macs / d.total_pj if d.total_pj else None,
                "lut_chunks": m.counts.get("lut_chunks"),
            }
            rows.append(row)
        return rows

    def to_dict(self) -> dict[str, Any]:
        net = self.network
        batch = net.batch
        return {
            "network": net.name,
            "label": net.label,
            "source": net.source,
            "input_shape": list(net.input_shape),
            "num_classes": net.num_classes,
            "batch": batch,
            "madd_layers": net.madd_count,
            "conv_linear_layers": len(net.layers),
            "other_macs": net.other_macs,
            "notes": net.notes,
            "cost_model": self.model.to_dict(),
            "technology_scale": self.model.constants.scale(),
            "summary": {"madd": self.madd.summary(batch), "dense": self.dense.summary(batch)},
            "layers": self.layer_rows(),
            "layer_energy_pj": {
                "madd": {layer.name: layer.energy_pj for layer in self.madd.layers},
                "dense": {layer.name: layer.energy_pj for layer in self.dense.layers},
            },
            "layer_counts": {
                "madd": {layer.name: layer.counts for layer in self.madd.layers},
                "dense": {layer.name: layer.counts for layer in self.dense.layers},
            },
        }


def estimate(network: Network, model: CostModel | None = None) -> NetworkEstimate:
    """Energy of one inference of ``network``'s MADD version and of its dense version."""
    model = model or CostModel()
    return NetworkEstimate(
        network, model, _variant(network, model, madd=True), _variant(network, model, madd=False)
    )


# ---------------------------------------------------------------------------- headline
A100 = {
    "source": "NVIDIA A100 Tensor Core GPU datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf)",
    "fp16_tensor_tflops_dense": 312.0,
    "fp16_tensor_tflops_sparse": 624.0,
    "board_power_w": {"SXM4 (40/80 GB)": 400.0, "PCIe 80 GB": 300.0, "PCIe 40 GB": 250.0},
    "technology": "TSMC 7 nm",
}
# the Stella Nera authors' GF22FDX power figures as listed in their public analysis script
# (github.com/joennlae/halutmatmul, hardware/analysis/plotting.py, commit 69013c1, 2022-10-01):
# (decoder units, clock period in ns, total power in W), 0.65 V, 25 C, C = 32
STELLA_NERA_GF22 = ((8, 2.5, 3.449e-3), (32, 1.842, 0.017))


def _single_layer(rows: int, d: int, m: int, c: int, k: int = 16, lut_bits: int | None = 8) -> Network:
    from .counts import MaddParams

    depth = int(math.log2(k))
    params = MaddParams(c, k, lut_bits, "tree", c * depth, 0, 0, c * depth, c * (k - 1) + c * depth)
    # input_values = output_values = 0: the basis keeps the activations on chip (no DRAM spill)
    shape = LayerShape("matmul", "linear", rows, d, m, bias=True)
    return Network(
        f"one {rows}x{d} @ {d}x{m} product", (1, 1, d), m, [shape.with_madd(params)], 0, "synthetic"
    )


def headline(model: CostModel | None = None, technology_nm: float = 22.0) -> dict[str, Any]:
    """The motivation's comparison (~32 TMAC/s/W for a MADDness accelerator in 22 nm, ~0.7
    TMAC/s/W for an A100 in FP16) from this model, with its basis.

    Basis of the MADD figures: one matrix product of 4,096 rows, C = 32 codebooks, K = 16,
    INT8 LUTs, M = 32 outputs (one pass of the 32 decoder units), ``technology_nm``, D/C
    from 8 to 32 (D = 32 D/C); a "MAC" is one multiply-accumulate of the dense product the
    layer replaces (N D M in all, so one LUT read-and-add counts D/C MACs). Two energy
    scopes: "datapath" (encoder compares and threshold reads, LUT reads, accumulation,
    de-quantisation: what a synthesised MatMul unit with operands on its ports spends) and
    "all counted" (plus input, code and output traffic through the activation memory and
    loading the LUTs). Beside them: the authors' GF22FDX power figures at the same C and
    D/C (see ``STELLA_NERA_GF22``), the dense FP16 and INT8 baselines of this model at the
    same node, and the A100's datasheet peak per board power under each reading of "MAC".
    """
    base = model or CostModel()
    scaled = dataclasses.replace(base.constants, technology_nm=technology_nm)
    model = CostModel(scaled, base.accelerator)
    datapath_keys = ("compares", "encoder_arith", "threshold_reads", "lut_reads", "accumulate", "dequantize")
    rows = []
    for d_per_c in (8, 9, 16, 32):
        network = _single_layer(4096, 32 * d_per_c, 32, 32)
        result = estimate(network, model)
        layer = result.madd.layers[0]
        datapath = sum(layer.energy_pj[k] for k in datapath_keys)
        macs = network.layers[0].macs
        lut_ops = layer.counts["lut_reads"]
        authors = {
            f"authors_gf22_{units}_decoders": units * d_per_c * (1e9 / period) / power / 1e12
            for units, period, power in STELLA_NERA_GF22
        }
        rows.append(
            {
                "D_per_C": d_per_c,
                "D": 32 * d_per_c,
                "datapath_tmacs_per_w": macs / datapath,
                "all_counted_tmacs_per_w": macs / layer.total_pj,
                "datapath_pj_per_lut_op": datapath / lut_ops,
                "all_counted_pj_per_lut_op": layer.total_pj / lut_ops,
                **authors,
                "dense_fp16_tmacs_per_w": macs / result.dense.layers[0].total_pj,
            }
        )
    int8 = CostModel(scaled, dataclasses.replace(base.accelerator, dense_precision="int8"))
    network = _single_layer(4096, 32 * 9, 32, 32)
    dense_int8 = estimate(network, int8).dense.layers[0]
    authors_pj = {
        f"{units} decoders": power / (1e9 / period) / units * 1e12
        for units, period, power in STELLA_NERA_GF22
    }
    flops = A100["fp16_tensor_tflops_dense"] * 1e12
    a100 = []
    for board, watts in A100["board_power_w"].items():
        a100.append(
            {
                "board": board,
                "power_w": watts,
                "dense_fp16_tmacs_per_w": flops / 2 / watts / 1e12,
                "flop_as_mac_tmacs_per_w": flops / watts / 1e12,
                "sparse_fp16_tmacs_per_w": A100["fp16_tensor_tflops_sparse"] * 1e12 / 2 / watts / 1e12,
            }
        )
    return {
        "technology_nm": technology_nm,
        "technology_scale": scaled.scale(),
        "basis": "4,096 rows, C = 32, K = 16, INT8 LUTs, M = 32, MAC = one multiply-accumulate of the "
        "replaced dense product (D/C per LUT read-and-add)",
        "madd": rows,
        "authors_gf22_pj_per_decoder_cycle": authors_pj,
        "dense_int8_tmacs_per_w_at_d_per_c_9": network.layers[0].macs / dense_int8.total_pj,
        "a100": a100,
        "a100_source": A100["source"],
    }
