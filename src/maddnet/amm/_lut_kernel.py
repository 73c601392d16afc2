"""numba CPU kernels for inference: tree encoding and the LUT sum.

One row at a time keeps the row's 4*C input values, its codes and its accumulator in
cache; rows are spread over threads with ``prange``. The int8 path accumulates in
uint16 (exact while C * 255 < 65536, i.e. C <= 257) or int32, then de-quantises.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(parallel=True, cache=True, nogil=True)
def encode(rows, split_dims, thresholds, bad_row):  # pragma: no cover - jit
    """rows (N, D) float32, split_dims (C, L) int64, thresholds (C, 2**L-1) float32 -> (N, C) uint8.

    Only the values the trees read are looked at, and only those are checked: a NaN or
    inf among them sets ``bad_row[0]`` to its row (the codes are then meaningless).
    """
    nrows = rows.shape[0]
    ncodebooks, depth = split_dims.shape
    codes = np.empty((nrows, ncodebooks), np.uint8)
    for n in numba.prange(nrows):
        for c in range(ncodebooks):
            leaf = 0
            for t in range(depth):
                value = rows[n, split_dims[c, t]]
                if not np.isfinite(value):
                    bad_row[0] = n
                node = (1 << t) - 1 + leaf
                leaf = 2 * leaf + (value > thresholds[c, node])
            codes[n, c] = leaf
    return codes


@numba.njit(parallel=True, cache=True, nogil=True, fastmath=True)
def lut_sum_float(codes, lut):  # pragma: no cover - jit
    """codes (N, C) uint8, lut (C, K, M) float32 -> (N, M) float32 sum of the selected rows."""
    nrows, ncodebooks = codes.shape
    nout = lut.shape[2]
    out = np.zeros((nrows, nout), np.float32)
    for n in numba.prange(nrows):
        acc = out[n]
        for c in range(ncodebooks):
            entry = lut[c, codes[n, c]]
            for m in range(nout):
                acc[m] += entry[m]
    return out


@numba.njit(parallel=True, cache=True, nogil=True, fastmath=True)
def lut_sum_int(codes, values, inv_scale, offset_sum, acc):  # pragma: no cover - jit
    """Integer LUT sum, de-quantised.

    codes (N, C) uint8, values (C, K, M) uint8, inv_scale (M,) and offset_sum (M,) float32;
    ``acc`` (P, M) scratch accumulators, one per parallel chunk, whose integer dtype
    (uint16 or int32) is the adder width. Returns (N, M) float32 ``acc * inv_scale + offset_sum``.
    """
    nrows, ncodebooks = codes.shape
    nout = values.shape[2]
    out = np.empty((nrows, nout), np.float32)
    nchunks = acc.shape[0]
    for chunk in numba.prange(nchunks):
        row_acc = acc[chunk]
        for n in range(chunk * nrows // nchunks, (chunk + 1) * nrows // nchunks):
            row_acc[:] = 0
            for c in range(ncodebooks):
                entry = values[c, codes[n, c]]
                for m in range(nout):
                    row_acc[m] += entry[m]
            for m in range(nout):
                out[n, m] = np.float32(row_acc[m]) * inv_scale[m] + offset_sum[m]
    return out


def accumulator(ncodebooks: int, nrows: int, nout: int, levels: int = 255) -> np.ndarray:
    """Scratch accumulators for :func:`lut_sum_int`: the narrowest integer type that cannot overflow."""
    dtype = np.uint16 if ncodebooks * levels < 2**16 else np.int32
    nchunks = max(1, min(nrows, numba.get_num_threads() * 8))
    return np.empty((nchunks, nout), dtype)
