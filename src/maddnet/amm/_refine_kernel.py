"""numba kernel of tree refinement (:mod:`maddnet.amm.tree_refine`): every node's best cut
on every candidate column of one level, in one pass over each column's sorted rows.

Per column the rows are visited in ascending value order while each node keeps its running
sum of ``delta``, its row count and its last value; at the first row of a new value in a
node, sending that node's rows from there on right costs the node's total minus its running
sum. O(N) per column with O(nnodes) state, where the tensor form needs (N, nnodes)
temporaries; columns run in parallel (``prange``). It keeps the lowest of equal-cost cuts;
the tensor form reaches the same loss, but where two cuts tie (to rounding) it may keep
another of them.
"""

from __future__ import annotations

import numba
import numpy as np

from .._jit import cached_njit


@cached_njit(parallel=True)
def level_cuts(
    columns: np.ndarray,  # (N, m) float32
    orders: np.ndarray,  # (m, N) int64: argsort of each column
    nodes: np.ndarray,  # (N,) int64 in [0, nnodes)
    delta: np.ndarray,  # (N,) float64
    nnodes: int,
    best: np.ndarray,  # out (m, nnodes) float64: +inf where a node has no interior cut
    lower: np.ndarray,  # out (m, nnodes) float32: the node's value below the best cut
    upper: np.ndarray,  # out (m, nnodes) float32: its value at the best cut
    largest: np.ndarray,  # out (m, nnodes) float32: the node's largest value
) -> None:
    nrows, ncolumns = columns.shape
    totals = np.zeros(nnodes, dtype=np.float64)
    for i in range(nrows):
        totals[nodes[i]] += delta[i]
    for j in numba.prange(ncolumns):
        running = np.zeros(nnodes, dtype=np.float64)
        seen = np.zeros(nnodes, dtype=np.int64)
        last = np.zeros(nnodes, dtype=np.float32)
        for n in range(nnodes):
            best[j, n] = np.inf
        for p in range(nrows):
            i = orders[j, p]
            n = nodes[i]
            value = columns[i, j]
            if seen[n] > 0 and last[n] < value:
                cost = totals[n] - running[n]
                if cost < best[j, n]:
                    best[j, n] = cost
                    lower[j, n] = last[n]
                    upper[j, n] = value
            running[n] += delta[i]
            seen[n] += 1
            last[n] = value
        for n in range(nnodes):
            largest[j, n] = last[n]
