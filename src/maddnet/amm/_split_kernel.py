"""numba kernel for the per-bucket best split (the CPU hot loop of tree learning).

It computes exactly what ``hashing._best_splits_torch`` computes, with O(N*d) work and no
(N, d) temporaries: one pass per bucket with running sums instead of prefix sums of a
sorted copy of the block.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def best_splits(values, value_order, centred, buckets, nbuckets):  # pragma: no cover - jit
    """Best split of every bucket on one column.

    Args:
        values: (N,) float32 column the split is on.
        value_order: (N,) int64 stable argsort of ``values``.
        centred: (N, d) float64 block rows (centred columns: less cancellation).
        buckets: (N,) int64 bucket of each row, in [0, nbuckets).

    Returns:
        loss (B,) float64 summed child SSE over all block columns, lower (B,) and upper
        (B,) float32 values either side of the split (upper = +inf: all rows left).
    """
    nrows, width = centred.shape
    counts = np.zeros(nbuckets, np.int64)
    for i in range(nrows):
        counts[buckets[i]] += 1
    starts = np.zeros(nbuckets + 1, np.int64)
    for b in range(nbuckets):
        starts[b + 1] = starts[b] + counts[b]
    # Stable counting sort by bucket of the value order: rows grouped by bucket, each
    # group sorted by value.
    fill = starts[:-1].copy()
    grouped = np.empty(nrows, np.int64)
    for i in range(nrows):
        row = value_order[i]
        b = buckets[row]
        grouped[fill[b]] = row
        fill[b] += 1

    loss = np.zeros(nbuckets, np.float64)
    lower = np.zeros(nbuckets, np.float32)
    upper = np.full(nbuckets, np.inf, np.float32)
    total = np.empty(width, np.float64)
    left = np.empty(width, np.float64)
    for b in range(nbuckets):
        start, stop = starts[b], starts[b + 1]
        n = stop - start
        if n == 0:
            continue
        total[:] = 0.0
        total_sq = 0.0
        for p in range(start, stop):
            row = grouped[p]
            for j in range(width):
                x = centred[row, j]
                total[j] += x
                total_sq += x * x
        total_norm = 0.0
        for j in range(width):
            total_norm += total[j] * total[j]
        left[:] = 0.0
        left_norm = 0.0  # ||L||^2
        left_dot_total = 0.0  # L . S
        best_score = -np.inf
        best_p = stop - 1
        for p in range(start, stop):
            row = grouped[p]
            cross = 0.0
            sq = 0.0
            dot_total = 0.0
            for j in range(width):
                x = centred[row, j]
                cross += left[j] * x
                sq += x * x
                dot_total += total[j] * x
                left[j] += x
            left_norm += 2.0 * cross + sq
            left_dot_total += dot_total
            n_left = p - start + 1
            if p == stop - 1:
                score = total_norm / n
            elif values[grouped[p + 1]] > values[row]:
                n_right = n - n_left
                right_norm = total_norm - 2.0 * left_dot_total + left_norm
                score = left_norm / n_left + right_norm / n_right
            else:
                continue
            if score > best_score:
                best_score = score
                best_p = p
        loss[b] = total_sq - best_score
        lower[b] = values[grouped[best_p]]
        if best_p < stop - 1:
            upper[b] = values[grouped[best_p + 1]]
    return loss, lower, upper
