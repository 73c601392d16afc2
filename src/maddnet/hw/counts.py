"""Operation and memory-traffic counts of one inference, per layer, for a MADD layer and for
the dense layer it replaces.

The shapes come from one forward pass with forward hooks (:func:`record_shapes`); the MADD
side from the layer itself (:meth:`MaddParams.of`: C, K, LUT bits and the encoder's
:class:`~maddnet.amm.encoders.EncoderCost`). The counts are pure functions of both and the
accelerator (:func:`madd_counts`, :func:`dense_counts`); their definitions are in the
docstrings and in docs/hardware.md.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..nn.mapping import input_dim
from .costs import AcceleratorConfig


@dataclass(frozen=True)
class MaddParams:
    """What a MADD layer's counts depend on (read from the layer, no data needed).

    ``compares`` / ``encoder_adds`` / ``encoder_multiplies`` / ``reads`` are the
    encoder's :class:`~maddnet.amm.encoders.EncoderCost` per row (the tree with K = 16:
    4 C compares and 4 C input values read); ``encoder_values`` the number of encoder
    parameters hardware stores (the tree: C (K - 1) thresholds and C log2 K split indices).
    """

    ncodebooks: int
    nprototypes: int
    lut_bits: int | None
    encoder: str
    compares: int
    encoder_adds: int
    encoder_multiplies: int
    reads: int
    encoder_values: int

    @classmethod
    def of(cls, layer: nn.Module) -> MaddParams:
        """The parameters of a MADD layer (``maddnet.nn.MaddLinear`` / ``MaddConv2d``,
        also a zero-initialised skeleton, also on the meta device)."""
        cost = layer.encoder.cost()
        state = layer.encoder.state_dict()
        values = sum(t.numel() for name, t in state.items() if name.split(".")[-1] != "temperature")
        return cls(
            ncodebooks=int(layer.ncodebooks),
            nprototypes=int(layer.nprototypes),
            lut_bits=layer.lut_bits,
            encoder=str(layer.spec.encoder),
            compares=int(cost.compares),
            encoder_adds=int(cost.adds),
            encoder_multiplies=int(cost.multiplies),
            reads=int(cost.reads),
            encoder_values=int(values),
        )

    @property
    def depth(self) -> int:
        """Bits per code (log2 K)."""
        return int(math.log2(self.nprototypes))

    @property
    def entry_bits(self) -> int:
        """Bits per LUT entry: ``lut_bits``, or 16 for float LUTs (FP16 entries, FP32
        accumulation, as Stella Nera's floating-point decoder)."""
        return 16 if self.lut_bits is None else int(self.lut_bits)

    @property
    def accumulator_bits(self) -> int:
        """Integer accumulator width: entry bits + ceil(log2 C) (exact sum of C entries);
        32 (FP32) for float LUTs."""
        if self.lut_bits is None:
            return 32
        return (
            self.entry_bits + math.ceil(math.log2(self.ncodebooks))
            if self.ncodebooks > 1
            else self.entry_bits
        )


@dataclass(frozen=True)
class LayerShape:
    """One conv/linear layer as one inference (a batch of ``batch`` inputs) uses it.

    ``rows``: N, the rows of its matrix product per batch (a conv's output positions times
    the batch, a linear layer's tokens); ``in_dim``: D per group (Cin/groups kh kw or
    in_features); ``out_dim``: M; ``input_values`` / ``output_values``: elements of its
    input and output tensors per batch; ``madd``: the MADD layer's parameters, or None
    when the layer is dense in this network.
    """

    name: str
    kind: str
    rows: int
    in_dim: int
    out_dim: int
    groups: int = 1
    bias: bool = True
    input_values: int = 0
    output_values: int = 0
    kernel: tuple[int, int] | None = None
    madd: MaddParams | None = None

    def with_madd(self, madd: MaddParams | None) -> LayerShape:
        return LayerShape(**{**asdict(self), "kernel": self.kernel, "madd": madd})

    @property
    def macs(self) -> int:
        """Multiply-accumulates of the dense layer: N D M (D per group, M all outputs)."""
        return self.rows * self.in_dim * self.out_dim


def _conv_rows(output: torch.Tensor) -> int:
    if output.dim() == 3:  # unbatched (Cout, H, W)
        return output.shape[1] * output.shape[2]
    return output.shape[0] * output.shape[2] * output.shape[3]


def record_shapes(
    model: nn.Module, input_shape: tuple[int, ...], batch: int = 1, device: str | torch.device = "cpu"
) -> tuple[list[LayerShape], int]:
    """Run ``model`` (dense or converted) once on zeros of ``(batch, *input_shape)`` and
    return ``(shapes, other_macs)``: every ``nn.Linear`` / ``nn.Conv2d`` called (in call
    order; a module called several times has the rows of all its calls), and the
    multiply-accumulates of every other matrix product of the forward pass (e.g. the
    attention scores of a transformer: activation times activation, no weight), counted with
    ``torch.utils.flop_counter``. MADD layers in the model are not called: record the shapes
    on the dense model they came from.
    """
    from torch.utils.flop_counter import FlopCounterMode

    calls: dict[str, dict[str, Any]] = {}
    hooks = []

    def hook(name: str, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        x = args[0]
        entry = calls.setdefault(name, {"rows": 0, "input_values": 0, "output_values": 0})
        if isinstance(module, nn.Linear):
            entry["rows"] += x.numel() // module.in_features
        else:
            entry["rows"] += _conv_rows(output)
        entry["input_values"] += x.numel()
        entry["output_values"] += output.numel()

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            hooks.append(module.register_forward_hook(lambda m, a, o, name=name: hook(name, m, a, o)))
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros(batch, *input_shape, device=device)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for handle in hooks:
            handle.remove()
        model.train(was_training)
    shapes = []
    for name, entry in calls.items():
        module = model.get_submodule(name)
        if isinstance(module, nn.Linear):
            shape = LayerShape(
                name,
                "linear",
                entry["rows"],
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                input_values=entry["input_values"],
                output_values=entry["output_values"],
            )
        else:
            shape = LayerShape(
                name,
                "conv2d",
                entry["rows"],
                input_dim(module),
                module.out_channels,
                groups=module.groups,
                bias=module.bias is not None,
                input_values=entry["input_values"],
                output_values=entry["output_values"],
                kernel=tuple(module.kernel_size),
            )
        shapes.append(shape)
    other = counter.get_total_flops() // 2 - sum(s.macs for s in shapes)
    return shapes, max(0, int(other))


# ---------------------------------------------------------------------------- counts
def madd_counts(shape: LayerShape, accelerator: AcceleratorConfig) -> dict[str, int]:
    """Counts of one inference of a MADD layer (``shape.madd`` set). Per layer, with N rows,
    M outputs, C codebooks, K codes, U decoder units, entry bits b:

    * ``macs``: N D M, the dense multiply-accumulates the layer replaces (what a
      "MAC-equivalent" counts);
    * ``compares``: N x the encoder's compares per row (the tree: N C log2 K = 4 N C);
      ``encoder_adds`` / ``encoder_multiplies`` likewise (0 for the tree);
    * ``input_reads``: N x the encoder's input reads per row (4 N C values; only the split
      columns are read); ``threshold_reads``: one threshold per compare;
    * ``code_writes``: N C codes into the code buffer; ``code_reads``: N C ceil(M / U)
      (one broadcast per pass of the decoders over the outputs);
    * ``lut_reads`` = ``lut_adds`` = N C M: every output adds one LUT entry per codebook
      (the accumulator starts at bias + the sum of the codebooks' offsets);
    * ``dequant_multiplies``: N M (the scale of an integer LUT; 0 for float LUTs);
    * ``partial_sums``: values written and read back when an output column's LUT (C K b/8
      bytes) exceeds its decoder's bank (``lut_memory_bytes / U``): 2 N M (chunks - 1);
    * ``output_writes``: N M values;
    * ``lut_bytes`` = ceil(C K M b / 8), ``encoder_bytes`` = encoder values x threshold
      bytes, ``constant_bytes`` = M x (4 B accumulator init + 2 B scale for integer LUTs):
      the parameters loaded per batch.
    """
    p = shape.madd
    if p is None:
        raise ValueError(f"layer {shape.name!r} is not a MADD layer")
    n, m, c = shape.rows, shape.out_dim, p.ncodebooks
    passes = math.ceil(m / accelerator.decoder_units)
    column_bytes = math.ceil(c * p.nprototypes * p.entry_bits / 8)
    bank_bytes = max(1, accelerator.lut_memory_bytes // accelerator.decoder_units)
    chunks = math.ceil(column_bytes / bank_bytes)
    integer = p.lut_bits is not None
    return {
        "macs": shape.macs,
        "compares": n * p.compares,
        "encoder_adds": n * p.encoder_adds,
        "encoder_multiplies": n * p.encoder_multiplies,
        "input_reads": n * p.reads,
        "threshold_reads": n * p.compares,
        "code_writes": n * c,
        "code_reads": n * c * passes,
        "lut_reads": n * c * m,
        "lut_adds": n * c * m,
        "dequant_multiplies": n * m if integer else 0,
        "partial_sums": 2 * n * m * (chunks - 1),
        "output_writes": n * m,
        "lut_bytes": math.ceil(c * p.nprototypes * m * p.entry_bits / 8),
        "encoder_bytes": math.ceil(p.encoder_values * accelerator.threshold_bits / 8),
        "constant_bytes": m * (4 + (2 if integer else 0)),
        "lut_chunks": chunks,
    }


def dense_counts(shape: LayerShape, accelerator: AcceleratorConfig) -> dict[str, int]:
    """Counts of one inference of a dense conv/linear layer on the baseline's R x P
    output-stationary MAC array (R = ``dense_array_rows``, P = ``dense_array_cols``):

    * ``macs``: N D M (D per group);
    * ``input_reads``: N D G ceil((M / G) / P) values: each input of a row is broadcast to
      the P columns of the array, once per group of P outputs (G groups);
    * ``weight_reads``: D M ceil(N / R): each weight is read from its bank once per group of
      R rows and broadcast down the array;
    * ``output_writes``: N M values;
    * ``weight_bytes``: D M x bytes per weight, ``constant_bytes``: 4 M for a bias.
    """
    n, d, m, g = shape.rows, shape.in_dim, shape.out_dim, shape.groups
    per_group = math.ceil(m / g)
    return {
        "macs": shape.macs,
        "input_reads": n * d * g * math.ceil(per_group / accelerator.dense_array_cols),
        "weight_reads": d * m * math.ceil(n / accelerator.dense_array_rows),
        "output_writes": n * m,
        "weight_bytes": d * m * accelerator.dense_bytes,
        "constant_bytes": 4 * m if shape.bias else 0,
    }


def madd_cycles(shape: LayerShape, accelerator: AcceleratorConfig) -> int:
    """Cycles of a MADD layer: the encoders (one compare per unit and cycle) and the
    decoders (one LUT read per unit and cycle, ceil(M / U) passes) run pipelined, so the
    slower of the two."""
    p = shape.madd
    n = shape.rows
    encode = math.ceil(n * p.compares / accelerator.encoder_units)
    decode = n * p.ncodebooks * math.ceil(shape.out_dim / accelerator.decoder_units)
    return max(encode, decode)


def dense_cycles(shape: LayerShape, accelerator: AcceleratorConfig) -> int:
    """Cycles of a dense layer on the R x P array: D cycles per tile of R rows x P outputs
    (groups of fewer than P outputs, e.g. depthwise convs, share a tile)."""
    per_group = math.ceil(shape.out_dim / shape.groups)
    cols = accelerator.dense_array_cols
    # small groups (depthwise) are packed side by side on the columns
    col_tiles = (
        math.ceil(shape.out_dim / cols) if per_group <= cols else shape.groups * math.ceil(per_group / cols)
    )
    return shape.in_dim * math.ceil(shape.rows / accelerator.dense_array_rows) * col_tiles
