"""A numpy reference of the MADDness accelerator's datapath (no torch: hardware checks use it
without torch installed).

The accelerator (Stella Nera, github.com/joennlae/halutmatmul) runs one MADD layer as:

1. **encode**: for each row and codebook, walk a depth-4 tree in heap order (K = 16): at node
   ``i`` compare the FP16 input value of that level's split column with the FP16 threshold
   ``thresholds[c, i]``; strictly greater goes right (``i -> 2 i + 2``), otherwise left;
2. **decode**: read one LUT entry per codebook and output, addressed by ``codebook * K + code``,
   and add it into an integer accumulator of ``accumulator_bits`` bits (two's complement);
3. **de-quantise**: ``y = float32(acc) * float32(1 / scale) + init`` with
   ``init = bias + sum_c offsets[c]`` summed in float32 in codebook order.

maddnet's integer LUT (:class:`maddnet.amm.lut.QuantizedLut`) holds **unsigned** entries
``values`` (uint8, ``[0, 255]``) with ``lut ~= values / scale + offsets[:, None, :]``
(``offsets`` (C, M) float32, ``scale`` (M,) float32 powers of two). The accelerator adds them
as they are (zero-extended into the accumulator): ``acc[n, m] = sum_c values[c, code[n, c], m]``.
Unsigned entries only ever increase the accumulator, so ``0 <= acc <= 255 C``: an INT32
accumulator never overflows for ``C < 8,421,505`` (every practical layer), INT16 for C <= 128,
INT24 for C <= 32,896. A hardware with **signed** int8 entries stores ``values - 128`` (the top
bit flipped) and takes ``128 / scale`` into each codebook's offset
(:func:`signed_entries`); its accumulator is then ``acc - 128 C``.

Inputs and thresholds are FP16 (:func:`to_fp16`): a float32 value is rounded to nearest even;
values below the smallest FP16 subnormal (2**-25 and less) become ±0, values from 65520 up
become ±inf. inf compares greater than every finite threshold (goes right), nothing is greater
than a +inf threshold (a threshold of 65520 or more sends every row left, inf included), every
value but -inf is greater than a -inf threshold. NaN is not an input this model takes
(maddnet refuses it before encoding).

Overflow of the accumulator (only possible with ``accumulator_bits`` well below 32, or with
signed entries): ``overflow="refuse"`` raises :class:`AccumulatorOverflowError`;
``overflow="saturate"`` clamps after every add to ``[-2**(bits-1), 2**(bits-1) - 1]``, as a
saturating adder does (for unsigned entries the same as clamping the final sum).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OVERFLOW_POLICIES = ("refuse", "saturate")
# a finite float32 stand-in for FP16 +-inf: greater than FP16's largest finite value (65504), so
# every comparison between FP16 values (inf included) has the same result with it
FP16_INF_STANDIN = 65536.0


class AccumulatorOverflowError(OverflowError):
    """A LUT sum left the accumulator's range with ``overflow="refuse"``."""


def to_fp16(values: np.ndarray) -> np.ndarray:
    """``values`` rounded to float32, then to FP16 (round to nearest even; ±inf from 65520 on),
    as maddnet's layers round them."""
    with np.errstate(over="ignore"):  # past the range is inf, as intended
        return np.asarray(values, np.float32).astype(np.float16)


def encode(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Codes of the FP16 tree encoder.

    Args:
        values: (N, C, L) the split values each row's codebook reads, level by level (any
            float dtype; rounded to FP16 first).
        thresholds: (C, 2**L - 1) heap order (rounded to FP16 first).

    Returns:
        (N, C) uint8 codes.
    """
    x = to_fp16(values)
    t = to_fp16(thresholds)
    nrows, ncodebooks, depth = x.shape
    if t.shape != (ncodebooks, 2**depth - 1):
        raise ValueError(f"thresholds {t.shape} do not match values {x.shape} (need (C, 2**L - 1))")
    node = np.zeros((nrows, ncodebooks), np.int64)
    codebook = np.arange(ncodebooks)
    for level in range(depth):
        right = x[:, :, level] > t[codebook, node]  # float16 compare
        node = 2 * node + 1 + right
    return (node - (2**depth - 1)).astype(np.uint8)


def gather_rows(rows: np.ndarray, split_dims: np.ndarray) -> np.ndarray:
    """(N, D) rows and (C, L) split columns -> (N, C, L) the values the encoder reads."""
    return np.asarray(rows)[:, np.asarray(split_dims)]


def accumulate(
    codes: np.ndarray, values: np.ndarray, accumulator_bits: int = 32, overflow: str = "refuse"
) -> np.ndarray:
    """Integer LUT sum: ``acc[n, m] = sum_c values[c, codes[n, c], m]`` in a two's complement
    accumulator of ``accumulator_bits`` bits, codebook by codebook (0 first).

    Args:
        codes: (N, C) codes in ``[0, K)``.
        values: (C, K, M) uint8 or int8 LUT entries (addressed as ``c * K + code``).
        accumulator_bits: accumulator width (2..63).
        overflow: "refuse" (raise :class:`AccumulatorOverflowError`) or "saturate".

    Returns:
        (N, M) int64 accumulators (each within the accumulator's range).
    """
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
    if not 2 <= accumulator_bits <= 63:
        raise ValueError(f"accumulator_bits must be in [2, 63], got {accumulator_bits}")
    values = np.asarray(values)
    if values.dtype not in (np.uint8, np.int8):
        raise ValueError(f"LUT entries must be uint8 or int8, got {values.dtype}")
    codes = np.asarray(codes)
    ncodebooks, nprototypes, nout = values.shape
    if codes.ndim != 2 or codes.shape[1] != ncodebooks:
        raise ValueError(f"codes {codes.shape} do not match the LUT's C = {ncodebooks}")
    low, high = -(2 ** (accumulator_bits - 1)), 2 ** (accumulator_bits - 1) - 1
    table = values.astype(np.int64).reshape(ncodebooks * nprototypes, nout)
    acc = np.zeros((codes.shape[0], nout), np.int64)
    for c in range(ncodebooks):
        acc += table[c * nprototypes + codes[:, c].astype(np.int64)]
        if overflow == "saturate":
            np.clip(acc, low, high, out=acc)
        elif acc.size and (acc.max() > high or acc.min() < low):
            raise AccumulatorOverflowError(
                f"the LUT sum leaves the {accumulator_bits}-bit accumulator's range [{low}, {high}] "
                f"after codebook {c}"
            )
    return acc


def accumulator_init(offsets: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """(M,) float32 ``bias + offsets[0] + offsets[1] + ...``, added in float32 in this order."""
    offsets = np.asarray(offsets, np.float32)
    init = np.zeros(offsets.shape[1], np.float32) if bias is None else np.asarray(bias, np.float32).copy()
    for row in offsets:
        init = (init + row).astype(np.float32)
    return init


def dequantize(acc: np.ndarray, scale: np.ndarray, init: np.ndarray) -> np.ndarray:
    """``float32(acc) * float32(1 / scale) + init``, float32 (one rounding: the scale is a
    power of two, so the product is exact for |acc| < 2**24)."""
    inv_scale = (np.float32(1.0) / np.asarray(scale, np.float32)).astype(np.float32)
    return (np.asarray(acc).astype(np.float32) * inv_scale + np.asarray(init, np.float32)).astype(np.float32)


def signed_entries(
    values: np.ndarray, offsets: np.ndarray, scale: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """maddnet's unsigned entries as a signed int8 LUT: ``(values - 128, offsets + 128 / scale)``
    (float32); the same table: ``(v - 128) / s + (o + 128 / s) == v / s + o`` up to rounding."""
    signed = (np.asarray(values, np.int16) - 128).astype(np.int8)
    shifted = (np.asarray(offsets, np.float32) + np.float32(128.0) / np.asarray(scale, np.float32)).astype(
        np.float32
    )
    return signed, shifted


@dataclass
class DatapathResult:
    """What :func:`run_layer` computes: (N, C) codes, (N, M) accumulators, (N, M) outputs."""

    codes: np.ndarray
    acc: np.ndarray
    out: np.ndarray


def run_layer(
    values: np.ndarray,
    thresholds: np.ndarray,
    lut_values: np.ndarray,
    offsets: np.ndarray,
    scale: np.ndarray,
    bias: np.ndarray | None = None,
    accumulator_bits: int = 32,
    overflow: str = "refuse",
) -> DatapathResult:
    """One MADD layer on the accelerator: values (N, C, L) the encoder reads (for a conv, its
    patch rows' split columns; :func:`gather_rows`), thresholds (C, K - 1), LUT entries
    (C, K, M) uint8/int8 with offsets (C, M) and scale (M,), bias (M,) or None."""
    codes = encode(values, thresholds)
    acc = accumulate(codes, lut_values, accumulator_bits, overflow)
    out = dequantize(acc, scale, accumulator_init(offsets, bias))
    return DatapathResult(codes, acc, out)
