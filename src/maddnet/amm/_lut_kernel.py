"""numba CPU kernels for inference: tree encoding and the 8-bit LUT sum.

Encoding has three kernels, chosen by :func:`maddnet.amm.hashing.encode` from the depth
and the memory layout of the rows (no copies):

- :func:`encode_rows4`: depth 4 (K = 16), rows contiguous (row-major ``A``): the heap
  walk unrolled to its four levels, one row at a time. It reads only the 4*C split
  values, but those lie on most cache lines of a row.
- :func:`encode_cols4`: depth 4, columns contiguous (column-major ``A``, e.g. ``A.T``
  contiguous, as the original MADDness assumes): for a block of rows, each codebook
  reads its 4 split columns as contiguous runs and picks every level's threshold with a
  chain of selects (1 + 3 + 7), which LLVM vectorises over the rows. Only the 4*C split
  columns are ever read from memory.
- :func:`encode_any`: any depth, any strides: the plain heap walk.

All of them flag a block of rows when a value they read is NaN or +-inf (``x - x`` is 0
exactly for finite ``x`` and NaN otherwise); the caller finds the row and raises.

:func:`lut_sum_u8` is the integer LUT sum: per row, the uint8 entries of the C selected
LUT rows are added in uint16 (exact while ``C * (2**bits - 1) < 2**16``), four codebooks
per pass over the accumulator, then de-quantised with the power-of-two scale (and, for a
MADD layer, its bias added in the same pass).
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from .._jit import cached_njit

_threads_launched = False


def launch_threads() -> None:
    """Start numba's thread pool (once) without changing torch's thread count.

    numba's OpenMP threading layer sets the OpenMP thread count to ``NUMBA_NUM_THREADS``
    (all cores) when it starts, which silently undoes an earlier
    ``torch.set_num_threads(n)``; this restores it. Call before the first parallel kernel.
    """
    global _threads_launched
    if not _threads_launched:
        threads = torch.get_num_threads()
        numba.get_num_threads()  # launches the pool
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        _threads_launched = True


@cached_njit(inline="always")
def _leaf4(a, b, c, d, t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14):  # pragma: no cover
    """Leaf of a depth-4 tree with heap-ordered thresholds ``t0..t14``: selects, no gathers."""
    b0 = a > t0
    v1 = t2 if b0 else t1
    b1 = b > v1
    lo = t4 if b1 else t3
    hi = t6 if b1 else t5
    v2 = hi if b0 else lo
    b2 = c > v2
    q0 = t8 if b2 else t7
    q1 = t10 if b2 else t9
    q2 = t12 if b2 else t11
    q3 = t14 if b2 else t13
    r0 = q1 if b1 else q0
    r1 = q3 if b1 else q2
    v3 = r1 if b0 else r0
    b3 = d > v3
    return (np.uint8(b0) << 3) | (np.uint8(b1) << 2) | (np.uint8(b2) << 1) | np.uint8(b3)


@cached_njit(parallel=True)
def encode_rows4(rows, split_dims, thresholds, block):  # pragma: no cover - jit
    """rows (N, D) float32 (rows contiguous), split_dims (C, 4) int64, thresholds (C, 15)
    float32 -> codes (N, C) uint8, bad (nblocks,) bool: a read value of block b is not finite."""
    nrows = rows.shape[0]
    ncodebooks = split_dims.shape[0]
    codes = np.empty((nrows, ncodebooks), np.uint8)
    nblocks = (nrows + block - 1) // block
    bad = np.zeros(nblocks, np.bool_)
    for bi in numba.prange(nblocks):
        start = bi * block
        stop = min(nrows, start + block)
        check = np.float32(0)
        for n in range(start, stop):
            row = rows[n]
            out = codes[n]
            for c in range(ncodebooks):
                dims = split_dims[c]
                th = thresholds[c]
                a = row[dims[0]]
                b = row[dims[1]]
                x = row[dims[2]]
                d = row[dims[3]]
                check += ((a - a) + (b - b)) + ((x - x) + (d - d))
                i = np.int64(a > th[0])
                i = 2 * i + np.int64(b > th[1 + i])
                i = 2 * i + np.int64(x > th[3 + i])
                i = 2 * i + np.int64(d > th[7 + i])
                out[c] = i
        bad[bi] = check != 0
    return codes, bad


@cached_njit(parallel=True)
def encode_cols4(cols, split_dims, thresholds, block):  # pragma: no cover - jit
    """cols (D, N) float32 (the transpose of column-major rows, so each column is contiguous),
    split_dims (C, 4), thresholds (C, 15) -> codes (N, C) uint8, bad (nblocks,) bool."""
    nrows = cols.shape[1]
    ncodebooks = split_dims.shape[0]
    codes = np.empty((nrows, ncodebooks), np.uint8)
    nblocks = (nrows + block - 1) // block
    bad = np.zeros(nblocks, np.bool_)
    for bi in numba.prange(nblocks):
        start = bi * block
        stop = min(nrows, start + block)
        width = stop - start
        block_codes = np.empty((ncodebooks, block), np.uint8)
        check = np.zeros(block, np.float32)
        for c in range(ncodebooks):
            x0 = cols[split_dims[c, 0], start:stop]
            x1 = cols[split_dims[c, 1], start:stop]
            x2 = cols[split_dims[c, 2], start:stop]
            x3 = cols[split_dims[c, 3], start:stop]
            th = thresholds[c]
            t0, t1, t2, t3, t4 = th[0], th[1], th[2], th[3], th[4]
            t5, t6, t7, t8, t9 = th[5], th[6], th[7], th[8], th[9]
            t10, t11, t12, t13, t14 = th[10], th[11], th[12], th[13], th[14]
            out = block_codes[c]
            for i in range(width):  # vectorised over rows
                a = x0[i]
                b = x1[i]
                x = x2[i]
                d = x3[i]
                out[i] = _leaf4(a, b, x, d, t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14)
                check[i] += ((a - a) + (b - b)) + ((x - x) + (d - d))
        nbad = 0
        for i in range(width):
            nbad += check[i] != 0
        bad[bi] = nbad > 0
        for i in range(width):
            for c in range(ncodebooks):
                codes[start + i, c] = block_codes[c, i]
    return codes, bad


@cached_njit(parallel=True)
def encode_any(rows, split_dims, thresholds, block):  # pragma: no cover - jit
    """Any depth L, any strides: rows (N, D), split_dims (C, L), thresholds (C, 2**L - 1)
    -> codes (N, C) uint8, bad (nblocks,) bool."""
    nrows = rows.shape[0]
    ncodebooks, depth = split_dims.shape
    nnodes = (1 << depth) - 1
    codes = np.empty((nrows, ncodebooks), np.uint8)
    nblocks = (nrows + block - 1) // block
    bad = np.zeros(nblocks, np.bool_)
    for bi in numba.prange(nblocks):
        start = bi * block
        stop = min(nrows, start + block)
        check = np.float32(0)
        for n in range(start, stop):
            for c in range(ncodebooks):
                # heap walk: the children of node i are 2i+1 and 2i+2; leaves follow the
                # 2**L - 1 inner nodes
                node = 0
                for t in range(depth):
                    value = rows[n, split_dims[c, t]]
                    check += value - value
                    node = 2 * node + 1 + (value > thresholds[c, node])
                codes[n, c] = node - nnodes
        bad[bi] = check != 0
    return codes, bad


@cached_njit(inline="always")
def _finish_row(acc, inv_scale, offset_sum, bias, row_out):  # pragma: no cover - jit
    """De-quantise one row's integer sums into ``row_out``; a non-empty ``bias`` is added
    after the offsets, in its own float32 rounding, as ``lut_sum(...) + bias`` would."""
    nout = row_out.shape[0]
    if bias.shape[0] == 0:
        for m in range(nout):
            row_out[m] = np.float32(acc[m]) * inv_scale[m] + offset_sum[m]
    else:
        for m in range(nout):
            row_out[m] = (np.float32(acc[m]) * inv_scale[m] + offset_sum[m]) + bias[m]


@cached_njit(inline="always")
def _store_row(acc, inv_scale, offset_sum, bias, out, sums, n):  # pragma: no cover - jit
    """Row n's uint16 sums into ``sums[n]`` when ``sums`` has rows (the integer output),
    else de-quantised into ``out[n]`` (:func:`_finish_row`)."""
    if sums.shape[0] > 0:
        row = sums[n]
        for m in range(row.shape[0]):
            row[m] = acc[m]
    else:
        _finish_row(acc, inv_scale, offset_sum, bias, out[n])


@cached_njit(parallel=True)
def lut_sum_u8(codes, values, inv_scale, offset_sum, bias, block, sums):  # pragma: no cover - jit
    """Integer LUT sum: codes (N, C) uint8, values (C, K, Mp) uint8 (Mp >= M, padded with
    zeros), inv_scale (M,), offset_sum (M,) and bias (M,) or (0,) float32 -> (N, M) float32
    ``(sum_c values[c, codes[n, c], m] * inv_scale[m] + offset_sum[m]) + bias[m]``
    (fusing a layer's bias saves a pass over the output).

    With ``sums`` an (N, M) uint16 array the integer sums ``sum_c values[c, codes[n, c], m]``
    are written there instead and the float output is (0, M); pass a (0, 0) uint16 array
    for the float output. The sum is accumulated in uint16: the caller guarantees
    ``C * max(values) < 2**16``.
    """
    nrows, ncodebooks = codes.shape
    nout = inv_scale.shape[0]
    padded = values.shape[2]
    out = np.empty((0 if sums.shape[0] > 0 else nrows, nout), np.float32)
    nblocks = (nrows + block - 1) // block
    for bi in numba.prange(nblocks):
        acc = np.empty(padded, np.uint16)
        for n in range(bi * block, min(nrows, (bi + 1) * block)):
            row_codes = codes[n]
            acc[:] = 0
            c = 0
            while c + 4 <= ncodebooks:  # four LUT rows per pass over the accumulator
                r0 = values[c, row_codes[c]]
                r1 = values[c + 1, row_codes[c + 1]]
                r2 = values[c + 2, row_codes[c + 2]]
                r3 = values[c + 3, row_codes[c + 3]]
                for m in range(padded):
                    acc[m] += (np.uint16(r0[m]) + np.uint16(r1[m])) + (np.uint16(r2[m]) + np.uint16(r3[m]))
                c += 4
            while c < ncodebooks:
                r0 = values[c, row_codes[c]]
                for m in range(padded):
                    acc[m] += r0[m]
                c += 1
            _store_row(acc, inv_scale, offset_sum, bias, out, sums, n)
    return out


@cached_njit(parallel=True)
def lut_sum_pairs(codes, pairs, nprototypes, inv_scale, offset_sum, bias, block, sums):  # pragma: no cover
    """:func:`lut_sum_u8` on a table of codebook pairs: pairs (ceil(C/2), K*K, Mp) uint16 with
    ``pairs[p, a*K + b] = values[2p, a] + values[2p+1, b]`` (a last unpaired codebook uses
    ``b = 0`` and adds nothing there): half the additions, from a K times larger table.
    ``sums`` as for :func:`lut_sum_u8`."""
    nrows, ncodebooks = codes.shape
    npairs = pairs.shape[0]
    nout = inv_scale.shape[0]
    padded = pairs.shape[2]
    out = np.empty((0 if sums.shape[0] > 0 else nrows, nout), np.float32)
    nblocks = (nrows + block - 1) // block
    for bi in numba.prange(nblocks):
        acc = np.empty(padded, np.uint16)
        rows = np.zeros(npairs, np.int64)
        for n in range(bi * block, min(nrows, (bi + 1) * block)):
            row_codes = codes[n]
            for p in range(ncodebooks // 2):
                rows[p] = np.int64(row_codes[2 * p]) * nprototypes + row_codes[2 * p + 1]
            if ncodebooks % 2:
                rows[npairs - 1] = np.int64(row_codes[ncodebooks - 1]) * nprototypes
            acc[:] = 0
            p = 0
            while p + 4 <= npairs:
                r0 = pairs[p, rows[p]]
                r1 = pairs[p + 1, rows[p + 1]]
                r2 = pairs[p + 2, rows[p + 2]]
                r3 = pairs[p + 3, rows[p + 3]]
                for m in range(padded):
                    acc[m] += (r0[m] + r1[m]) + (r2[m] + r3[m])
                p += 4
            while p < npairs:
                r0 = pairs[p, rows[p]]
                for m in range(padded):
                    acc[m] += r0[m]
                p += 1
            _store_row(acc, inv_scale, offset_sum, bias, out, sums, n)
    return out


@cached_njit()
def _same_words(a, b):  # pragma: no cover - jit
    bits = a.dtype.type(0)
    for i in range(a.shape[0]):
        bits |= a[i] ^ b[i]  # no early exit: the loop vectorises
    return bits == 0


def same_words(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two 1-D arrays of one length and item size hold the same bit patterns: one
    pass over both, no temporary (``np.array_equal`` first writes an (n,) bool array; this
    is about 1.5x faster on 600,000 words). Arrays that are not integers are viewed as the
    integers of their item size (a traced ``torch.compile`` call can hand floats here)."""
    if a.shape != b.shape or a.ndim != 1 or a.dtype.itemsize != b.dtype.itemsize:
        raise ValueError(
            f"same_words needs two 1-D arrays of one length and item size, got {a.shape}, {b.shape}"
        )
    word = np.dtype(f"i{a.dtype.itemsize}")
    return bool(_same_words(a.view(word), b.view(word)))
