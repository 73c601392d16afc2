"""Look-up tables: building, 8-bit quantisation and decoding (the LUT sum).

Decoding ``Y[n, m] = sum_c T[c, codes[n, c], m]`` is an embedding bag: with offsets
``c * K`` the codes index rows of the stacked (C*K, M) table, summed per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import _lut_kernel
from .prototypes import code_indices

GRANULARITIES = ("codebook", "column")


def build_lut(prototypes: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``T[c, k, m] = prototypes[c, k, :] . weight[:, m]``: (C, K, D) x (D, M) -> (C, K, M)."""
    ncodebooks, nprototypes, ndims = prototypes.shape
    flat = prototypes.reshape(-1, ndims).to(weight.dtype) @ weight
    return flat.reshape(ncodebooks, nprototypes, -1).float()


def lut_sum(codes: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Sum one LUT row per codebook: codes (N, C), lut (C, K, M) -> (N, M)."""
    ncodebooks, nprototypes, nout = lut.shape
    index = code_indices(codes, nprototypes)
    return F.embedding_bag(index, lut.reshape(ncodebooks * nprototypes, nout), mode="sum")


@dataclass
class QuantizedLut:
    """An integer LUT and what it takes to de-quantise sums of its entries.

    ``lut ~= values / scale + offsets[:, None, :]`` entry by entry, so a decoded output is
    ``sum_c values[c, code_c, m] / scale[m] + offsets[:, m].sum()``.

    Attributes:
        values: (C, K, M) uint8 integers in ``[0, 2**bits)``.
        offsets: (C, M) float32 per-codebook offsets (constant over m when the
            granularity is "codebook").
        scale: (M,) float32 powers of two (constant when the granularity is "codebook").
        bits: bits per entry.
    """

    values: torch.Tensor
    offsets: torch.Tensor
    scale: torch.Tensor
    bits: int

    def dequantize(self) -> torch.Tensor:
        """(C, K, M) float32 table that the integer table stands for."""
        return self.values.float() / self.scale + self.offsets[:, None, :]

    def sum_table(self) -> torch.Tensor:
        """(C, K, M) float32 ``values / scale``. Scales are powers of two, so every entry is
        exact and so is every sum of up to 65,793 entries (integer sums below 2**24)."""
        return self.values.float() / self.scale

    def max_abs_error(self) -> torch.Tensor:
        """(M,) bound on |quantised output - float output| for any codes: C / (2 scale)."""
        return self.values.shape[0] / (2 * self.scale)


def unchanged_since(tensor: torch.Tensor, snapshot: torch.Tensor | None) -> bool:
    """Whether ``tensor`` still holds exactly the values of ``snapshot`` (a copy taken when
    something was derived from it).

    Version counters miss in-place writes through ``.data``, so the values are compared, as
    bit patterns (a NaN equals itself; -0.0 differs from 0.0, which only costs a re-derive).
    On CPU that is one pass over both in a numba kernel (no temporary), faster than
    ``np.array_equal`` and about 5x faster than ``torch.equal``
    (which took a quarter of a converted LeViT-128S's eval time at 50 layers); on other
    devices the answer is False (re-derive), since reading the comparison's result would
    stall on a host synchronisation.
    """
    if snapshot is None or tensor.device.type != "cpu" or snapshot.device != tensor.device:
        return False
    if snapshot.shape != tensor.shape or snapshot.dtype != tensor.dtype:
        return False
    word = _BIT_PATTERN_DTYPES.get(tensor.element_size())
    if word is None or tensor.is_complex():
        return torch.equal(snapshot, tensor)
    current = tensor.detach().contiguous().view(word).reshape(-1).numpy()
    return _lut_kernel.same_words(current, snapshot.detach().contiguous().view(word).reshape(-1).numpy())


# integer dtypes of each element size: a tensor viewed as one of these compares bit patterns
_BIT_PATTERN_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def quantize_lut(lut: torch.Tensor, bits: int = 8, granularity: str = "codebook") -> QuantizedLut:
    """Quantise a float LUT to ``bits``-bit unsigned integers.

    Offsets are per codebook (the minimum over k, and over m too for "codebook"); the
    scale is one power of two shared by all codebooks ("codebook", as in MADDness) or one
    power of two per output column ("column", finer at the same inference cost). Rounding
    to nearest keeps each entry within ``0.5 / scale`` of the float LUT.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"lut_bits must be between 1 and 8, got {bits}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    lut = lut.float()
    ncodebooks, _, nout = lut.shape
    if granularity == "codebook":
        offsets = lut.amin(dim=(1, 2), keepdim=True).expand(ncodebooks, 1, nout)
        spread = (lut - offsets).amax().reshape(1).expand(nout)
    else:
        offsets = lut.amin(dim=1, keepdim=True)  # (C, 1, M)
        spread = (lut - offsets).amax(dim=(0, 1))  # (M,)
    levels = 2**bits - 1
    # Largest power of two that maps every codebook's spread into [0, levels].
    safe_spread = torch.where(spread > 0, spread, torch.ones_like(spread))
    scale = torch.exp2(torch.floor(torch.log2(levels / safe_spread)))
    values = torch.round((lut - offsets) * scale).clamp_(0, levels).to(torch.uint8)
    return QuantizedLut(values, offsets[:, 0, :].contiguous(), scale.contiguous(), bits)


def quantized_lut_sum(codes: torch.Tensor, qlut: QuantizedLut, table: torch.Tensor | None = None):
    """Integer LUT sum, de-quantised: codes (N, C) -> (N, M) float32.

    ``embedding_bag`` sums ``qlut.sum_table()`` (pass it as ``table`` to avoid re-making
    it): its entries are the integers times a power of two, so the float32 sums hold
    exactly what an integer adder followed by the de-quantising shift would; only the
    final ``+ offsets`` rounds. Runs on any device (the MADD layers use it); on CPU,
    ``MaddnessMatmul`` uses :func:`packed_lut_sum`, a uint16 numba kernel with the same
    result bit for bit that measured faster (docs/amm.md, "LUTs and 8-bit quantisation").
    """
    if table is None:
        table = qlut.sum_table()
    return lut_sum(codes, table).add_(qlut.offsets.sum(0))


# Rows per parallel task of the CPU LUT sum.
_SUM_BLOCK = 64
# Largest table of codebook pairs that pack_lut makes (half of a 2 MB L2 per core).
PAIR_TABLE_BYTES = 1 << 20


@dataclass
class PackedLut:
    """A :class:`QuantizedLut` laid out for the CPU integer LUT sum (:func:`packed_lut_sum`).

    Attributes:
        values: (C, K, Mp) uint8 numpy array, the LUT with its columns padded with zeros to
            a multiple of 64 (whole vector passes, no remainder loop).
        inv_scale: (M,) float32 ``1 / scale`` (exact: scales are powers of two).
        offset_sum: (M,) float32 ``offsets.sum(0)``, computed as :func:`quantized_lut_sum` does.
        pairs: ``None``, or (ceil(C/2), K*K, Mp) uint16 sums of the LUT rows of codebook pairs
            (``pairs[p, a*K + b] = values[2p, a] + values[2p+1, b]``), made when that table is
            small enough to stay in L2 (:data:`PAIR_TABLE_BYTES`): the sum then needs half the
            additions.
    """

    values: np.ndarray
    inv_scale: np.ndarray
    offset_sum: np.ndarray
    pairs: np.ndarray | None = None


def pack_lut(qlut: QuantizedLut) -> PackedLut | None:
    """The CPU form of ``qlut``, or ``None`` when the kernel could not reproduce
    :func:`quantized_lut_sum` exactly: a CPU table is needed, the integer sum must fit
    uint16 (``C * (2**bits - 1) < 2**16``, i.e. C <= 257 at 8 bits) and the scales must be
    powers of two whose reciprocals are exact normal floats (always so for tables from
    :func:`quantize_lut`, short of spreads below ~1e-30)."""
    values = qlut.values
    if values.device.type != "cpu" or values.dtype != torch.uint8:
        return None
    ncodebooks, nprototypes, nout = values.shape
    if ncodebooks * (2**qlut.bits - 1) >= 2**16 or int(values.max()) >= 2**qlut.bits:
        return None
    scale = qlut.scale.detach().float()
    mantissa, _ = torch.frexp(scale)
    if not (
        bool((mantissa == 0.5).all()) and bool((scale >= 2.0**-100).all()) and bool((scale <= 2.0**100).all())
    ):
        return None
    padded = -(-nout // 64) * 64
    table = np.zeros((ncodebooks, nprototypes, padded), np.uint8)
    table[:, :, :nout] = values.numpy()
    inv_scale = (1.0 / scale).numpy().astype(np.float32)
    offset_sum = qlut.offsets.detach().float().sum(0).numpy().astype(np.float32)
    npairs = -(-ncodebooks // 2)
    pairs = None
    if ncodebooks > 1 and npairs * nprototypes**2 * padded * 2 <= PAIR_TABLE_BYTES:
        wide = np.zeros((2 * npairs, nprototypes, padded), np.uint16)
        wide[:ncodebooks] = table  # an unpaired last codebook pairs with a row of zeros
        pairs = (wide[0::2, :, None, :] + wide[1::2, None, :, :]).reshape(npairs, nprototypes**2, padded)
    return PackedLut(table, np.ascontiguousarray(inv_scale), np.ascontiguousarray(offset_sum), pairs)


def packed_lut_sum(
    codes: torch.Tensor, packed: PackedLut, bias: torch.Tensor | None = None, check_codes: bool = True
) -> torch.Tensor:
    """:func:`quantized_lut_sum` on CPU through a numba kernel: codes (N, C) in
    ``[0, K)`` -> (N, M) float32, bit for bit the same result.

    The uint8 entries are summed in uint16 and scaled by ``1/scale`` (a power of two, so
    exact) before the one rounding ``+ offsets.sum(0)``, as the float32 embedding bag does.
    ``bias`` ((M,) float32, CPU), if given, is added in the same pass, after the offsets, so
    the result equals ``quantized_lut_sum(codes, qlut) + bias`` bit for bit without a second
    pass over the (N, M) output. ``check_codes=False`` skips the check of ``codes`` (a pass
    over them) for callers whose codes come from an encoder, which are in range by
    construction (``MaddnessMatmul``, the layers' eval path); the kernel indexes unchecked.

    Raises:
        ValueError: ``bias`` is not an (M,) float32 CPU tensor; with ``check_codes``,
            ``codes`` is not an (N, C) CPU integer tensor of codes in ``[0, K)``.
    """
    if check_codes:
        _check_packed_codes(codes, packed, "packed_lut_sum")
    _lut_kernel.launch_threads()
    nout = packed.inv_scale.shape[0]
    if bias is None:
        bias_np = np.empty(0, np.float32)
    else:
        if bias.shape != (nout,) or bias.dtype != torch.float32 or bias.device.type != "cpu":
            raise ValueError(
                f"packed_lut_sum: bias must be a ({nout},) float32 CPU tensor, got "
                f"{tuple(bias.shape)} {bias.dtype} on {bias.device}"
            )
        bias_np = bias.detach().contiguous().numpy()
    return torch.from_numpy(_packed_sum(codes, packed, bias_np, np.empty((0, 0), np.uint16)))


def packed_lut_integer_sum(codes: torch.Tensor, packed: PackedLut) -> torch.Tensor:
    """The integer sums of the packed LUT, before de-quantisation: codes (N, C) uint8 in
    ``[0, K)`` (CPU) -> (N, M) ``torch.uint16``, ``out[n, m] = sum_c values[c, codes[n, c], m]``.

    What the accelerator's adder tree produces from 8-bit LUT entries (an exact integer;
    :func:`pack_lut` only packs tables whose sums fit 16 bits); the original MADDness scan
    (Blalock & Guttag 2021) also outputs integer sums, not floats. The float result
    of :func:`packed_lut_sum` is ``out * packed.inv_scale + packed.offset_sum`` (float32,
    in that order), bit for bit. Half the bytes of the float output, written by the same
    kernel (docs/amm.md, "LUTs and 8-bit quantisation").

    Raises:
        ValueError: ``codes`` is not an (N, C) CPU integer tensor of codes in ``[0, K)``.
    """
    _check_packed_codes(codes, packed, "packed_lut_integer_sum")
    _lut_kernel.launch_threads()
    nout = packed.inv_scale.shape[0]
    sums = np.empty((codes.shape[0], nout), np.uint16)
    _packed_sum(codes, packed, np.empty(0, np.float32), sums)
    return torch.from_numpy(sums)


# code dtypes the packed sums take (copied to uint8 for the kernel)
_CODE_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _check_packed_codes(codes: torch.Tensor, packed: PackedLut, where: str) -> None:
    """The kernels read ``values[c, codes[n, c]]`` unchecked: refuse codes they would read
    out of bounds with (ValueError naming ``where``)."""
    ncodebooks, nprototypes = packed.values.shape[:2]
    if codes.device.type != "cpu" or codes.dim() != 2 or codes.shape[1] != ncodebooks:
        raise ValueError(
            f"{where}: codes must be an (N, {ncodebooks}) CPU tensor, "
            f"got {tuple(codes.shape)} on {codes.device}"
        )
    if codes.dtype not in _CODE_DTYPES:
        accepted = ", ".join(map(str, _CODE_DTYPES))
        raise ValueError(f"{where}: codes must have one of the dtypes {accepted}, got {codes.dtype}")
    if codes.numel():
        low, high = (int(v) for v in torch.aminmax(codes.to(torch.int64)))
        if low < 0 or high >= nprototypes:
            raise ValueError(f"{where}: codes must lie in [0, {nprototypes}), got [{low}, {high}]")


def _packed_sum(codes: torch.Tensor, packed: PackedLut, bias_np: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """The packed kernel (pair table where made): the float output, or (0, M) with ``sums``
    filled when it has rows."""
    codes_np = np.ascontiguousarray(codes.numpy(), dtype=np.uint8)
    scaling = (packed.inv_scale, packed.offset_sum, bias_np, _SUM_BLOCK, sums)
    if packed.pairs is not None:
        return _lut_kernel.lut_sum_pairs(codes_np, packed.pairs, packed.values.shape[1], *scaling)
    return _lut_kernel.lut_sum_u8(codes_np, packed.values, *scaling)
