"""Switch a model's MADD layers into hardware-exact inference (docs/hardware.md,
"Hardware-exact inference"): FP16 encoder compares, integer LUT sums in the accelerator's
accumulator width, then de-quantisation, exactly as :mod:`maddnet.hw.datapath` computes."""

from __future__ import annotations

from torch import nn

from ..nn import madd_layers
from .datapath import OVERFLOW_POLICIES


def set_hw_exact(
    model: nn.Module, enabled: bool = True, accumulator_bits: int = 32, overflow: str = "refuse"
) -> int:
    """Turn hardware-exact mode on (or off) in every MADD layer of ``model``; returns how many.

    Checks every layer first (tree encoder, integer LUT; a ValueError names the first that
    cannot) and changes none when one fails. ``accumulator_bits`` and ``overflow`` ("refuse":
    :class:`~maddnet.hw.datapath.AccumulatorOverflowError`; "saturate") set the accumulator.
    The mode is not saved with the model; switching it off restores the float mode exactly.
    """
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
    if not 2 <= accumulator_bits <= 63:
        raise ValueError(f"accumulator_bits must be in [2, 63], got {accumulator_bits}")
    layers = list(madd_layers(model).values())
    if enabled:
        for layer in layers:
            layer.check_hw_exact()
    for layer in layers:
        layer.hw_exact = bool(enabled)
        layer.hw_accumulator_bits = int(accumulator_bits)
        layer.hw_overflow = overflow
    return len(layers)
