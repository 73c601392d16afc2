"""Refining learned hash trees: coordinate descent on split columns and thresholds.

MADDness learns each tree greedily, level by level, on the block's own SSE (or, with
``hash_objective="output"``, on the block's contribution to the product), before the
prototypes are solved jointly over all codebooks. Nothing revisits a split once the table
is known. This module does: with the table ``T`` (C, K, R) held fixed, the loss of giving
row i code k in codebook c is ``||r_i - T[c, k]||^2``, where ``r_i = y_i - sum_{c' != c}
T[c', code_ic']`` is what the other codebooks leave of the row's target. Changing the
threshold of one node moves only the rows of that node between its two subtrees, so for one
split column the best threshold of every node of a level is an exact scan over the node's
rows sorted by that column (each row's loss if it went left or right, the deeper levels
unchanged). Every column a codebook may split on is scanned, and the column with the lowest
total wins; the current split is always a candidate, so a step never increases the training
loss. Levels are visited top down, codebooks one after the other, then the table is solved
again (ridge, with the new codes) and the next sweep begins.

This is block coordinate descent on the tree parameters (Tseng 2001, "Convergence of a block
coordinate descent method for nondifferentiable minimization"), the threshold refinement
after the greedy pass that issue 11 asks for. The trees keep their shape: L compares and L
input reads per codebook and row, so the accelerator is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import hashing


def descend(values: torch.Tensor, thresholds: torch.Tensor, level: int, nodes: torch.Tensor) -> torch.Tensor:
    """Route rows from ``nodes`` (N,) int64 at ``level`` to their leaves (N,) int64.

    ``values`` (N, L) float32 holds each row's value of the split column of every level,
    ``thresholds`` (K-1,) float32 one tree's thresholds in heap order; the comparison is
    :func:`maddnet.amm.hashing.encode`'s (``x > threshold`` goes right, in float32).
    """
    depth = values.shape[1]
    for t in range(level, depth):
        nodes = 2 * nodes + (values[:, t] > thresholds[(1 << t) - 1 + nodes]).long()
    return nodes


def best_level_thresholds(
    column: torch.Tensor,
    nodes: torch.Tensor,
    delta: torch.Tensor,
    nnodes: int,
    current: torch.Tensor | None = None,
) -> tuple[float, torch.Tensor]:
    """The thresholds of one level's ``nnodes`` nodes on one column that minimise the loss.

    Args:
        column: (N,) float32 the column's value per row.
        nodes: (N,) int64 each row's node at this level, in ``[0, nnodes)``.
        delta: (N,) float64 each row's loss if it goes right minus its loss if it goes left.
        current: (nnodes,) float32 the level's current thresholds when ``column`` is its
            current split column (kept where no cut is strictly better), else None.

    Only cuts that leave rows on both sides are considered: emptying a subtree would retire
    its leaves for good (no later step could route rows back to a code without rows).

    Returns:
        The summed loss relative to every row going left (a float), and the (nnodes,)
        float32 thresholds. A node whose rows all share one value (or that has none) sends
        them all left (threshold = that value), unless ``current`` is given.
    """
    device = column.device
    nrows = column.shape[0]
    by_value = torch.argsort(column, stable=True)
    order = by_value[torch.argsort(nodes[by_value], stable=True)]
    values, gains, segment = column[order], delta[order], nodes[order]
    counts = torch.bincount(nodes, minlength=nnodes)
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    # suffix[p] = sum of gains[p:]; a cut at p sends rows p .. end-1 of its node right
    suffix = torch.cat([gains.flip(0).cumsum(0).flip(0), gains.new_zeros(1)])
    positions = torch.arange(nrows, device=device)
    cost = suffix[:nrows] - suffix[ends[segment]]
    valid = positions > starts[segment]
    valid[1:] &= values[1:] > values[:-1]
    valid[0] = False
    cost = torch.where(valid, cost, torch.inf)
    best_cost = torch.full((nnodes,), torch.inf, dtype=cost.dtype, device=device)
    best_cost.scatter_reduce_(0, segment, cost, reduce="amin")
    at_best = valid & (cost == best_cost[segment])
    first = torch.full((nnodes,), nrows, dtype=torch.int64, device=device)
    first.scatter_reduce_(0, segment, torch.where(at_best, positions, nrows), reduce="amin")
    has_cut = first < nrows
    cut = first.clamp(1, max(nrows - 1, 1))
    thresholds = hashing.split_thresholds(values[cut - 1], values[cut]) if nrows > 1 else None
    # no interior cut: all left (threshold = the node's largest value), cost 0
    largest = torch.zeros(nnodes, dtype=torch.float32, device=device)
    if nrows:
        largest[counts > 0] = values[ends[counts > 0] - 1].float()
    chosen_cost = torch.where(has_cut, best_cost, torch.zeros_like(best_cost))
    chosen = largest if thresholds is None else torch.where(has_cut, thresholds, largest)
    if current is not None:
        goes_right = column > current[nodes]
        current_cost = torch.zeros(nnodes, dtype=delta.dtype, device=device)
        current_cost.index_add_(0, nodes, torch.where(goes_right, delta, torch.zeros_like(delta)))
        keep = (current_cost <= chosen_cost) | (counts == 0)
        chosen = torch.where(keep, current.float(), chosen)
        chosen_cost = torch.where(keep, current_cost, chosen_cost)
    return float(chosen_cost.sum()), chosen


def refine_trees(
    rows: torch.Tensor,
    split_dims: torch.Tensor,
    thresholds: torch.Tensor,
    targets: torch.Tensor,
    solve_tables: Callable[[torch.Tensor], torch.Tensor],
    candidates: list[torch.Tensor],
    sweeps: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coordinate descent on every tree's split columns and thresholds (module docstring).

    Args:
        rows: (N, D) float32 training rows.
        split_dims: (C, L) int64 global split columns; thresholds: (C, K-1) float32, heap
            order (a fitted :class:`~maddnet.amm.encoders.TreeEncoder`'s state).
        targets: (N, R) float64 what the codes' table rows must sum to (``A @ B`` for the
            output objective, ``A`` for the input one).
        solve_tables: codes (N, C) int64 -> (C, K, R) float64 tables for those codes (e.g.
            the ridge LUT); called once per sweep.
        candidates: per codebook, the (d_c,) int64 global columns its tree may split on.
        sweeps: passes over all codebooks (>= 1).

    Returns:
        New (split_dims, thresholds) and the training rows' codes (N, C) int64. The loss
        ``||targets - sum_c T[c, code_c]||^2`` of each sweep's table never increases
        within the sweep.
    """
    split_dims, thresholds = split_dims.clone(), thresholds.clone().float()
    ncodebooks, depth = split_dims.shape
    nrows = rows.shape[0]
    rows = rows.float()
    root = torch.zeros(nrows, dtype=torch.int64, device=rows.device)
    codes = torch.stack(
        [descend(rows[:, split_dims[c]], thresholds[c], 0, root) for c in range(ncodebooks)], dim=1
    )
    index = torch.arange(nrows, device=rows.device)
    for _ in range(sweeps):
        tables = solve_tables(codes)
        prediction = sum(tables[c][codes[:, c]] for c in range(ncodebooks))
        for c in range(ncodebooks):
            table = tables[c]
            previous = table[codes[:, c]]
            residual = targets - prediction + previous
            loss = (table * table).sum(1)[None, :] - 2 * residual @ table.T  # (N, K)
            values = rows[:, split_dims[c]]
            for t in range(depth):
                nodes = descend(values[:, :t], thresholds[c], 0, root) if t else root
                left = descend(values, thresholds[c], t + 1, 2 * nodes)
                right = descend(values, thresholds[c], t + 1, 2 * nodes + 1)
                delta = loss[index, right] - loss[index, left]
                level = slice((1 << t) - 1, (1 << (t + 1)) - 1)
                best = None
                for column in candidates[c].tolist():
                    is_current = column == int(split_dims[c, t])
                    total, level_thresholds = best_level_thresholds(
                        rows[:, column], nodes, delta, 1 << t, thresholds[c, level] if is_current else None
                    )
                    # ties keep the current split (it is scanned like any other column)
                    if best is None or total < best[0] or (total == best[0] and is_current):
                        best = (total, column, level_thresholds)
                _, column, level_thresholds = best
                split_dims[c, t] = column
                thresholds[c, level] = level_thresholds
                values[:, t] = rows[:, column]
            codes[:, c] = descend(values, thresholds[c], 0, root)
            prediction += table[codes[:, c]] - previous
    return split_dims, thresholds, codes
