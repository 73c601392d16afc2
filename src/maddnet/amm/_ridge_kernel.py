"""numba kernels of the ridge step (:mod:`maddnet.amm.prototypes`): products with the
one-hot code matrix G (N, C*K) without forming it.

- :func:`scatter_rows` is ``G^T X``: every row of X added to the C table rows its codes
  select, N*C*D additions (the former per-codebook (K, N) one-hot matmuls did 2*K*N*C*D
  flops, 32x more at K = 16);
- :func:`gather_rows` is ``G T``: the C selected table rows summed per row, over each
  codebook's nonzero columns only;
- :func:`code_agreement` is ``G G^T``: for every pair of rows, in how many codebooks their
  codes agree (the dual form's N x N system), N^2*C/2 byte compares.

All accumulate in float64 and run in parallel over disjoint parts of the result, each
sum in a fixed order (no atomics): results do not depend on the thread count.
"""

from __future__ import annotations

import numba
import numpy as np

from .._jit import cached_njit

# Rows per block of scatter_rows: a block of X (512 rows) is read from memory once and
# added into every codebook's (K, D) result block of a thread's group while it is in cache.
# Streaming all of X once per codebook instead was 2-5x slower (memory bound; measured on
# 65,536 x 576 rows with C = 64, 4,352 x 3,072 with C = 384, 16,384 x 1,152 with C = 128;
# 128 rows per block was 1.1-1.3x slower than 512).
ROW_BLOCK = 512


@cached_njit(parallel=True)
def scatter_rows(codes_t, rows, nprototypes, ngroups):  # pragma: no cover - jit
    """``G^T X``: (C*K, D) float64; row ``c*K + k`` sums the rows of X whose code of
    codebook c is k, in row order.

    Args:
        codes_t: (C, N) integer codes in ``[0, K)``, one codebook per row (contiguous).
        rows: (N, D) float32 or float64 X, C-contiguous.
        nprototypes: K.
        ngroups: codebook groups run in parallel (the thread count); each owns its
            codebooks' result rows, so there are no write conflicts and every sum runs in
            row order whatever the grouping.
    """
    ncodebooks, nrows = codes_t.shape
    ndims = rows.shape[1]
    out = np.zeros((ncodebooks * nprototypes, ndims), np.float64)
    for group in numba.prange(ngroups):
        first = np.int64(group) * ncodebooks // ngroups
        last = (np.int64(group) + 1) * ncodebooks // ngroups
        for block in range(0, nrows, ROW_BLOCK):
            stop = min(nrows, block + ROW_BLOCK)
            for c in range(first, last):
                base = c * nprototypes
                for i in range(block, stop):
                    target = base + codes_t[c, i]
                    for j in range(ndims):
                        out[target, j] += rows[i, j]
    return out


@cached_njit(parallel=True)
def gather_rows(codes, table, nprototypes, run_ptr, run_start, run_stop):  # pragma: no cover - jit
    """``G T``: (N, D) float64, row i the sum over codebooks c (in order) of
    ``table[c*K + codes[i, c]]``, reading only each codebook's nonzero columns.

    Args:
        codes: (N, C) integer codes in ``[0, K)``, C-contiguous.
        table: (C*K, D) float32 or float64 T, C-contiguous.
        nprototypes: K.
        run_ptr: (C+1,) int64; codebook c's column runs are ``run_ptr[c]:run_ptr[c+1]``.
        run_start, run_stop: (R,) int64 half-open column ranges outside which codebook
            c's K table rows are zero (one run ``[0, D)`` for a dense table).

    Leaf-mean prototypes are zero outside their codebook's block, so G T then costs N*D
    additions instead of N*C*D.
    """
    nrows, ncodebooks = codes.shape
    ndims = table.shape[1]
    out = np.zeros((nrows, ndims), np.float64)
    for i in numba.prange(nrows):
        for c in range(ncodebooks):
            source = c * nprototypes + codes[i, c]
            for run in range(run_ptr[c], run_ptr[c + 1]):
                for j in range(run_start[run], run_stop[run]):
                    out[i, j] += table[source, j]
    return out


@cached_njit(parallel=True)
def code_agreement(codes):  # pragma: no cover - jit
    """``G G^T``: (N, N) float64, entry (i, m) the number of codebooks in which rows i and
    m have the same code (C on the diagonal).

    Args:
        codes: (N, C) integer codes, C-contiguous.

    Row i compares itself with rows m <= i and fills both triangles; tasks pair row t with
    row N-1-t so every task compares about N+1 pairs (balanced static schedule).
    """
    nrows, ncodebooks = codes.shape
    out = np.zeros((nrows, nrows), np.float64)
    for task in numba.prange((nrows + 1) // 2):
        first = np.int64(task)  # prange indices may be unsigned: keep the sums integer
        for half in range(2):
            i = first if half == 0 else nrows - 1 - first
            if half == 1 and i == first:  # the middle row of an odd N
                continue
            row = codes[i]
            for m in range(i + 1):
                other = codes[m]
                agree = 0
                for c in range(ncodebooks):
                    agree += row[c] == other[c]
                out[i, m] = agree
                out[m, i] = agree
    return out
