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

import numpy as np
import torch
import torch.nn.functional as F

from . import _refine_kernel, _split_kernel, hashing


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


def column_orders(columns: torch.Tensor) -> torch.Tensor:
    """(m, N) int64: each column's stable argsort of (N, m) float32 ``columns`` (the
    radix-sort kernel on CPU, :func:`maddnet.amm._split_kernel.stable_argsort`)."""
    if columns.device.type == "cpu":
        transposed = np.ascontiguousarray(columns.float().numpy().T)
        return torch.from_numpy(_split_kernel.stable_argsort(transposed))
    return torch.argsort(columns, dim=0, stable=True).T.contiguous()


def level_cut_table(
    columns: torch.Tensor,
    orders: torch.Tensor,
    nodes: torch.Tensor,
    delta: torch.Tensor,
    nnodes: int,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every node's best interior cut on every column: (best, lower, upper, largest).

    A cut sends a node's rows with values >= v right and must leave rows on both sides.

    Args:
        columns: (N, m) float32 candidate columns; orders: (m, N) int64 each column's
            argsort; nodes: (N,) int64 in ``[0, nnodes)``; delta: (N,) float64 each row's
            loss right minus left.
        backend: "numba" (CPU kernel, :func:`maddnet.amm._refine_kernel.level_cuts`),
            "torch" (tensor ops on any device: per-node suffix sums as (N, nnodes)
            tensors), or "auto" (numba on CPU).

    Returns:
        (m, nnodes) tensors: the summed ``delta`` of the rows the best cut sends right
        (float64, +inf where a node has no interior cut), the node's values just below
        and at that cut, and the node's largest value (float32).
    """
    nrows, ncolumns = columns.shape
    if backend == "numba" or (backend == "auto" and columns.device.type == "cpu"):
        best = np.empty((ncolumns, nnodes), dtype=np.float64)
        lower, upper, largest = (np.zeros((ncolumns, nnodes), dtype=np.float32) for _ in range(3))
        _refine_kernel.level_cuts(
            np.ascontiguousarray(columns.float().numpy()),
            np.ascontiguousarray(orders.numpy()),
            np.ascontiguousarray(nodes.numpy()),
            np.ascontiguousarray(delta.double().numpy()),
            nnodes,
            best,
            lower,
            upper,
            largest,
        )
        return tuple(torch.from_numpy(a) for a in (best, lower, upper, largest))
    device = columns.device
    node_index = torch.arange(nnodes, device=device)
    positions = torch.arange(nrows, device=device)[:, None]
    results = []
    for j in range(ncolumns):
        order = orders[j]
        values, gains = columns[order, j], delta[order].double()
        member = torch.nn.functional.one_hot(nodes[order], nnodes)  # (N, nnodes)
        suffix = (member * gains[:, None]).flip(0).cumsum(0).flip(0)  # gain of sending p.. right
        last = torch.where(member.bool(), positions, -1).cummax(0).values  # node n's last row <= p
        previous = torch.cat([last.new_full((1, nnodes), -1), last[:-1]])  # ... < p
        # a cut at node n's first row of a value: a row of n below it with a smaller value
        valid = member.bool() & (previous >= 0) & (values[previous.clamp_min(0)] < values[:, None])
        best, cut = torch.where(valid, suffix, torch.inf).min(0)
        below = previous[cut, node_index].clamp_min(0)
        largest = torch.where(last[-1] >= 0, values[last[-1].clamp_min(0)], 0.0)
        results.append((best, values[below], values[cut], largest))
    return tuple(torch.stack(parts) for parts in zip(*results, strict=True))


def best_level_splits(
    columns: torch.Tensor,
    nodes: torch.Tensor,
    delta: torch.Tensor,
    nnodes: int,
    current: tuple[int, torch.Tensor] | None = None,
    orders: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each candidate column's best thresholds for one level's ``nnodes`` nodes.

    Args:
        columns: (N, m) float32 the candidate columns' values per row.
        nodes: (N,) int64 each row's node at this level, in ``[0, nnodes)``.
        delta: (N,) float64 each row's loss if it goes right minus its loss if it goes left.
        current: (index of the level's current split column in ``columns``, its (nnodes,)
            float32 thresholds): kept for a node where no cut on that column is strictly
            better. None: no column is current.
        orders: (m, N) int64 each column's argsort, if already known (it does not change
            with the level, so :func:`refine_trees` sorts each column once per codebook
            and sweep).
        backend: see :func:`level_cut_table`.

    Only cuts that leave rows on both sides are considered, so a step never empties a
    subtree of this node (a code with no training rows gets its LUT row from the prior alone,
    and its rows at inference time would be few and unlike the rest). The
    threshold lies between the node's two neighbouring values
    (:func:`maddnet.amm.hashing.split_thresholds`), as the greedy learner's does.

    Returns:
        (m,) float64 each column's summed loss relative to every row going left, and its
        (m, nnodes) float32 thresholds. A node whose rows all share one value (or that has
        none) sends them all left (threshold = its largest value).
    """
    if orders is None:
        orders = column_orders(columns)
    best, lower, upper, largest = level_cut_table(columns, orders, nodes, delta, nnodes, backend)
    has_cut = torch.isfinite(best)
    thresholds = torch.where(has_cut, hashing.split_thresholds(lower, upper), largest)
    costs = torch.where(has_cut, best, torch.zeros_like(best))
    if current is not None:
        index, current_thresholds = current
        goes_right = columns[:, index] > current_thresholds[nodes]
        current_cost = torch.zeros(nnodes, dtype=torch.float64, device=columns.device)
        current_cost.index_add_(0, nodes, torch.where(goes_right, delta.double(), 0.0))
        empty = torch.bincount(nodes, minlength=nnodes) == 0
        keep = (current_cost <= costs[index]) | empty
        thresholds[index] = torch.where(keep, current_thresholds.float(), thresholds[index])
        costs[index] = torch.where(keep, current_cost, costs[index])
    return costs.sum(1), thresholds


def refine_trees(
    rows: torch.Tensor,
    split_dims: torch.Tensor,
    thresholds: torch.Tensor,
    targets: torch.Tensor,
    solve_tables: Callable[[torch.Tensor], torch.Tensor],
    candidates: list[torch.Tensor],
    sweeps: int,
    backend: str = "auto",
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
        backend: the cut search's, see :func:`level_cut_table`.

    Memory: ``targets`` and the running error, two (N, R) float64 arrays, plus the error's
    projections on a chunk of codebooks' tables, (N, P) float64 with P = max(K, min(R, 256))
    (and their (P, P) Gram matrix), a few (N, K), and the (n, R) table rows of the n rows
    whose code a level moved; for the input objective R = D, so a wide layer refined on many
    rows needs about 16 N D bytes (1.8 GB per array at N = 50,000, D = 4,608). For the output
    objective the caller can pass R = min(D, M) columns (``encoders.tree.product_basis``).

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
    codes = hashing.encode(rows, split_dims, thresholds).long()
    index = torch.arange(nrows, device=rows.device)
    offsets = torch.arange(ncodebooks, device=rows.device) * (1 << depth)
    for _ in range(sweeps):
        # row-major: solvers may return a transposed view, and embedding_bag and the row
        # gathers below run 10-20x slower on one (17 s against 0.7 s at N = 16,384, C K = 1,536)
        tables = solve_tables(codes).contiguous()
        nprototypes = tables.shape[1]
        # error = targets - sum_c T[c, code_c], one gather-sum over all codebooks
        flat = tables.reshape(ncodebooks * nprototypes, -1)
        error = projections = None  # the last sweep's, freed before the new ones are made
        error = F.embedding_bag(codes + offsets, flat, mode="sum").neg_().add_(targets)
        # error . T_k for a chunk of codebooks at once: one wide product instead of one
        # (N, R) x (R, K) product per codebook, 3-5x faster on CPU; at most 256 columns
        # (or one codebook's K), so the projections stay within (N, max(K, min(R, 256)))
        chunk = max(1, min(flat.shape[1], 256) // nprototypes)
        for c in range(ncodebooks):
            if c % chunk == 0:
                rows_of_chunk = slice(c * nprototypes, min(c + chunk, ncodebooks) * nprototypes)
                projections = None
                projections = error @ flat[rows_of_chunk].T  # (N, chunk K)
                chunk_gram = flat[rows_of_chunk] @ flat[rows_of_chunk].T  # (chunk K, chunk K)
            table = tables[c]
            first = (c % chunk) * nprototypes  # this codebook's columns in the chunk
            gram = chunk_gram[first : first + nprototypes, first : first + nprototypes]
            # ||r - T_k||^2 - ||r||^2 with r = error + T[code] (what the other codebooks
            # leave): ||T_k||^2 - 2 error . T_k - 2 T[code] . T_k, the last from the K x K Gram
            # matrix, so r itself (N x R) is never formed
            error_dot = projections[:, first : first + nprototypes]
            loss = gram.diagonal()[None, :] - 2 * error_dot - 2 * gram[codes[:, c]]  # (N, K)
            values = rows[:, split_dims[c]]
            # the current splits are always candidates, so no step can raise the loss
            columns = torch.unique(torch.cat([candidates[c].to(rows.device), split_dims[c]]))
            candidate_rows = rows[:, columns]
            orders = column_orders(candidate_rows)
            for t in range(depth):
                nodes = descend(values[:, :t], thresholds[c], 0, root) if t else root
                left = descend(values, thresholds[c], t + 1, 2 * nodes)
                right = descend(values, thresholds[c], t + 1, 2 * nodes + 1)
                delta = loss[index, right] - loss[index, left]
                level = slice((1 << t) - 1, (1 << (t + 1)) - 1)
                current = int((columns == split_dims[c, t]).nonzero()[0, 0])
                totals, level_thresholds = best_level_splits(
                    candidate_rows, nodes, delta, 1 << t, (current, thresholds[c, level]), orders, backend
                )
                chosen = int(totals.argmin())
                if totals[current] <= totals[chosen]:  # ties keep the current split
                    chosen = current
                split_dims[c, t] = columns[chosen]
                thresholds[c, level] = level_thresholds[chosen]
                values[:, t] = rows[:, columns[chosen]]
            new_codes = descend(values, thresholds[c], 0, root)
            moved = (new_codes != codes[:, c]).nonzero()[:, 0]
            old_codes, moved_codes = codes[moved, c], new_codes[moved]
            error.index_add_(0, moved, table[old_codes] - table[moved_codes])
            # the same change of the error seen through the chunk's tables: Gram rows
            projections.index_add_(0, moved, chunk_gram[first + old_codes] - chunk_gram[first + moved_codes])
            codes[:, c] = new_codes
    return split_dims, thresholds, codes
