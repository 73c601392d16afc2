"""numba kernels of learning: the per-bucket best split (the CPU hot loop of tree learning)
and the code co-occurrence counts of the ridge step.

:func:`best_splits_level` computes, for every candidate column of one tree level at once,
what ``hashing._best_splits_torch`` computes, with O(N*d) work per candidate and no
(N, d) temporaries beyond one bucket's rows. Why it is fast (issue 16: the former
one-column kernel read the block's rows one by one in sorted order, a cache miss per row,
in two passes, with one serial dependency chain per row):

- each bucket's rows are gathered once, in sort order, into a contiguous buffer (one
  random pass instead of two; the scoring pass then streams);
- four rows are scored per sweep of the columns: their running sums ``left`` are the same
  additions in the same order as one row at a time, but eight independent dependency
  chains keep the floating-point units busy;
- candidates run in parallel (``prange``, numba's thread count);
- ``||x||^2`` of each row and the bucket's summed ``||x||^2`` are computed once per tree
  and per level instead of once per candidate.

Every score is the same float64 arithmetic, in the same order, as the one-row kernel
(kept as the reference in ``tests/test_fit_speed.py``), so thresholds are bit-identical.
Only the constant ``sum ||x||^2`` term of the returned loss is now summed in row order
once per bucket instead of in each candidate's sort order: it is the same for every
candidate, so candidate choices can differ only where two candidates' losses tie to
rounding (none do in the Fashion-MNIST and test trees, see the tests).

Compiled code is cached on disk (numba ``cache=True``) next to this file (``__pycache__``),
or where that is not writable in numba's user cache folder (``NUMBA_CACHE_DIR`` sets
another), and reused by later processes. Where no folder is writable (a read-only install
without a writable home), :func:`maddnet._jit.cached_njit` compiles in memory once per process instead of
failing at import.
"""

from __future__ import annotations

import numba
import numpy as np

from .._jit import cached_njit


@cached_njit()
def row_sqnorms(centred):  # pragma: no cover - jit
    """(N,) float64 ``sum_j x[i, j]**2`` of (N, d) float64 rows, summed in column order
    (the order the split scores use)."""
    nrows, width = centred.shape
    out = np.zeros(nrows, np.float64)
    for i in range(nrows):
        acc = 0.0
        for j in range(width):
            acc += centred[i, j] * centred[i, j]
        out[i] = acc
    return out


@cached_njit(parallel=True)
def best_splits_level(
    values, value_orders, source, offset, row_sq, bucket_sq, buckets, nbuckets
):  # pragma: no cover
    """Best split of every bucket on each candidate column of one tree level.

    Args:
        values: (k, N) float32 candidate columns the splits are on.
        value_orders: (k, N) int64 stable argsort of each row of ``values``.
        source, offset: (N, d) float rows (float32: half the bytes to gather) and (d,)
            float64 column means; the split minimises the summed within-bucket SSE of the
            centred rows ``float64(source) - offset`` (less cancellation), formed here
            exactly as ``source.double() - offset`` would.
        row_sq: (N,) float64 :func:`row_sqnorms` of the centred rows.
        bucket_sq: (B,) float64 summed ``row_sq`` of each bucket.
        buckets: (N,) int64 bucket of each row, in [0, nbuckets).

    Returns:
        loss (k, B) float64 summed child SSE over all columns of ``centred``, lower (k, B)
        and upper (k, B) float32 values either side of the split (upper = +inf: all rows
        left, no split between different values exists).
    """
    ncand, nrows = values.shape
    width = source.shape[1]
    counts = np.zeros(nbuckets, np.int64)
    for i in range(nrows):
        counts[buckets[i]] += 1
    starts = np.zeros(nbuckets + 1, np.int64)
    for b in range(nbuckets):
        starts[b + 1] = starts[b] + counts[b]
    biggest = 0
    for b in range(nbuckets):
        biggest = max(biggest, counts[b])
    loss = np.zeros((ncand, nbuckets), np.float64)
    lower = np.zeros((ncand, nbuckets), np.float32)
    upper = np.full((ncand, nbuckets), np.inf, np.float32)
    for k in numba.prange(ncand):
        fill = starts[:-1].copy()
        grouped = np.empty(nrows, np.int64)
        order = value_orders[k]
        for i in range(nrows):
            row = order[i]
            b = buckets[row]
            grouped[fill[b]] = row
            fill[b] += 1
        rows = np.empty((biggest, width), np.float64)
        vals = np.empty(biggest, np.float32)
        sqs = np.empty(biggest, np.float64)
        total = np.empty(width, np.float64)
        left = np.empty(width, np.float64)
        for b in range(nbuckets):
            start = starts[b]
            n = starts[b + 1] - start
            if n == 0:
                continue
            total[:] = 0.0
            for p in range(n):
                row = grouped[start + p]
                vals[p] = values[k, row]
                sqs[p] = row_sq[row]
                for j in range(width):
                    x = np.float64(source[row, j]) - offset[j]
                    rows[p, j] = x
                    total[j] += x
            total_norm = 0.0
            for j in range(width):
                total_norm += total[j] * total[j]
            left[:] = 0.0
            left_norm = 0.0
            left_dot_total = 0.0
            best_score = -np.inf
            best_p = n - 1
            p = 0
            while p < n:
                nsteps = 4 if p + 4 <= n else 1
                c0 = c1 = c2 = c3 = 0.0
                d0 = d1 = d2 = d3 = 0.0
                if nsteps == 4:
                    for j in range(width):
                        t = total[j]
                        x0 = rows[p, j]
                        x1 = rows[p + 1, j]
                        x2 = rows[p + 2, j]
                        x3 = rows[p + 3, j]
                        l0 = left[j]
                        c0 += l0 * x0
                        d0 += t * x0
                        l1 = l0 + x0
                        c1 += l1 * x1
                        d1 += t * x1
                        l2 = l1 + x1
                        c2 += l2 * x2
                        d2 += t * x2
                        l3 = l2 + x2
                        c3 += l3 * x3
                        d3 += t * x3
                        left[j] = l3 + x3
                else:
                    for j in range(width):
                        x0 = rows[p, j]
                        c0 += left[j] * x0
                        d0 += total[j] * x0
                        left[j] += x0
                for s in range(nsteps):
                    q = p + s
                    if s == 0:
                        cross, dot = c0, d0
                    elif s == 1:
                        cross, dot = c1, d1
                    elif s == 2:
                        cross, dot = c2, d2
                    else:
                        cross, dot = c3, d3
                    left_norm += 2.0 * cross + sqs[q]
                    left_dot_total += dot
                    n_left = q + 1
                    if q == n - 1:
                        score = total_norm / n
                    elif vals[q + 1] > vals[q]:
                        right_norm = total_norm - 2.0 * left_dot_total + left_norm
                        score = left_norm / n_left + right_norm / (n - n_left)
                    else:
                        continue
                    if score > best_score:
                        best_score = score
                        best_p = q
                p += nsteps
            loss[k, b] = bucket_sq[b] - best_score
            lower[k, b] = vals[best_p]
            if best_p < n - 1:
                upper[k, b] = vals[best_p + 1]
    return loss, lower, upper


@cached_njit(parallel=True)
def stable_argsort(values):  # pragma: no cover - jit
    """(k, N) int64: ``np.argsort(values[i], kind="stable")`` for each row of (k, N) float32
    finite ``values``, by a two-pass LSD radix sort on order-preserving 32-bit keys.

    A stable sort's permutation is unique, so this equals numpy's (-0.0 and 0.0 compare
    equal there; they get the same key here). O(N + 2^16) per row instead of O(N log N).
    """
    nrows, n = values.shape
    out = np.empty((nrows, n), np.int64)
    for r in numba.prange(nrows):
        keys = np.empty(n, np.uint32)
        bits = (values[r] + np.float32(0.0)).view(np.uint32)  # -0.0 + 0.0 = +0.0
        for i in range(n):
            b = bits[i]
            keys[i] = ~b if b >> np.uint32(31) else b | np.uint32(0x80000000)
        first = np.empty(n, np.int64)
        order = out[r]
        counts = np.zeros(65537, np.int64)
        for i in range(n):
            counts[(keys[i] & np.uint32(0xFFFF)) + 1] += 1
        for v in range(65536):
            counts[v + 1] += counts[v]
        for i in range(n):
            digit = keys[i] & np.uint32(0xFFFF)
            first[counts[digit]] = i
            counts[digit] += 1
        counts[:] = 0
        for i in range(n):
            counts[(keys[i] >> np.uint32(16)) + 1] += 1
        for v in range(65536):
            counts[v + 1] += counts[v]
        for i in range(n):
            row = first[i]
            digit = keys[row] >> np.uint32(16)
            order[counts[digit]] = row
            counts[digit] += 1
    return out


@cached_njit(parallel=True)
def cooccurrence(codes_t, nprototypes):  # pragma: no cover - jit
    """(C*K, C*K) float64 counts ``G^T G`` of the one-hot code matrix G.

    Args:
        codes_t: (C, N) uint8 codes, one codebook per row (contiguous rows).
        nprototypes: K.

    Block (c, c') holds how often code a of codebook c and code b of codebook c' occur in
    the same row; each block is counted in a (K, K) table that fits in L1, rows of the
    gram in parallel (O(N C^2) increments, no (N, C*K) one-hot).
    """
    ncodebooks, nrows = codes_t.shape
    size = ncodebooks * nprototypes
    gram = np.zeros((size, size), np.float64)
    # Codebook c counts its blocks with c' >= c; task t takes c = t and c = C-1-t so every
    # task counts C+1 blocks (balanced static schedule).
    for task in numba.prange((ncodebooks + 1) // 2):
        counts = np.zeros((nprototypes, nprototypes), np.int64)
        first_c = np.int64(task)  # prange indices may be unsigned: keep the sums integer
        for half in range(2):
            c = first_c if half == 0 else ncodebooks - 1 - first_c
            if half == 1 and c == first_c:  # the middle codebook of an odd C
                continue
            first = codes_t[c]
            for other in range(c, ncodebooks):
                counts[:] = 0
                second = codes_t[other]
                for i in range(nrows):
                    counts[first[i], second[i]] += 1
                for a in range(nprototypes):
                    for b in range(nprototypes):
                        gram[c * nprototypes + a, other * nprototypes + b] = counts[a, b]
                        gram[other * nprototypes + b, c * nprototypes + a] = counts[a, b]
    return gram
