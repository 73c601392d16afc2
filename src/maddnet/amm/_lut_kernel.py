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
    nrows, ndims = rows.shape
    ncodebooks, depth = split_dims.shape
    nnodes = (1 << depth) - 1
    flat_rows = rows.reshape(-1)
    flat_dims = split_dims.reshape(-1)
    flat_thresholds = thresholds.reshape(-1)
    codes = np.empty((nrows, ncodebooks), np.uint8)
    for n in numba.prange(nrows):
        row_base = n * ndims
        finite = True
        for c in range(ncodebooks):
            # heap walk: the children of node i are 2i+1 and 2i+2; leaves follow the
            # 2**L - 1 inner nodes
            node = 0
            for t in range(depth):
                value = flat_rows[row_base + flat_dims[c * depth + t]]
                finite &= np.isfinite(value)
                node = 2 * node + 1 + (value > flat_thresholds[c * nnodes + node])
            codes[n, c] = node - nnodes
        if not finite:
            bad_row[0] = n
    return codes


@numba.njit(parallel=True, cache=True, nogil=True)
def lut_sum_float(codes, lut):  # pragma: no cover - jit
    """codes (N, C) uint8, lut (C, K, M) float32 -> (N, M) float32 sum of the selected rows.

    Codebooks are added in order (no fastmath reassociation), so the sums equal
    ``embedding_bag``'s up to its own order of additions.
    """
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
    Four codebooks are added per pass over the accumulator (a third of the time of one).
    """
    nrows, ncodebooks = codes.shape
    nout = values.shape[2]
    out = np.empty((nrows, nout), np.float32)
    nchunks = acc.shape[0]
    grouped = ncodebooks - ncodebooks % 4
    for chunk in numba.prange(nchunks):
        row_acc = acc[chunk]
        zero = row_acc.dtype.type(0)
        for n in range(chunk * nrows // nchunks, (chunk + 1) * nrows // nchunks):
            row_acc[:] = 0
            for c in range(0, grouped, 4):
                e0 = values[c, codes[n, c]]
                e1 = values[c + 1, codes[n, c + 1]]
                e2 = values[c + 2, codes[n, c + 2]]
                e3 = values[c + 3, codes[n, c + 3]]
                for m in range(nout):
                    row_acc[m] += (zero + e0[m] + e1[m]) + (zero + e2[m] + e3[m])
            for c in range(grouped, ncodebooks):
                e0 = values[c, codes[n, c]]
                for m in range(nout):
                    row_acc[m] += e0[m]
            for m in range(nout):
                out[n, m] = np.float32(row_acc[m]) * inv_scale[m] + offset_sum[m]
    return out


def accumulator(ncodebooks: int, nrows: int, nout: int, levels: int = 255) -> np.ndarray:
    """Scratch accumulators for :func:`lut_sum_int`: the narrowest integer type that cannot overflow."""
    dtype = np.uint16 if ncodebooks * levels < 2**16 else np.int32
    nchunks = max(1, min(nrows, numba.get_num_threads() * 8))
    return np.empty((nchunks, nout), dtype)
