"""numba CPU kernel for inference: tree encoding.

One row at a time keeps the row's 4*C input values in cache; rows are spread over
threads with ``prange``. (The LUT sum is ``embedding_bag``: it measured faster than the
uint16 numba kernel this module held before.)
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
