"""numba CPU kernels for MADD layers: training backward on gathered values, conv tap gather/scatter.

Each kernel has a tensor-op twin in :mod:`maddnet.nn.functional` that runs on any device;
tests check that both give the same numbers. Kernels parallelise over codebooks so the
per-codebook gradients accumulate without races.
"""

from __future__ import annotations

import numba
import numpy as np

from .._jit import cached_njit

# Rows per block of the surrogate kernel: inner loops run over a block, so they vectorise.
_BLOCK = 128
# fastmath without nnan / ninf: exp() may overflow to inf on purpose (see below).
_FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}


@cached_njit()
def level_factors(thresholds, inv_tau):  # pragma: no cover
    """Per-level centres and per-node factors of the soft tree's right-probabilities.

    ``p = 1 / (1 + exp(s (v - x))) = 1 / (1 + E F)`` with ``s = 2 / tau``,
    ``E = exp(s (centre - x))`` once per row and level, ``F = exp(s (v - centre))`` once per
    node, centre = the mean threshold of the level. Nodes with ``|s (v - centre)| > 30`` are
    marked ``direct``: backward kernels take their exp directly. thresholds (C, K-1),
    inv_tau (C, L) -> centre (C, L), factor (C, K-1) (both of the thresholds' dtype),
    direct (C, K-1) bool.
    """
    ncodebooks, depth = inv_tau.shape
    nnodes = thresholds.shape[1]
    dtype = thresholds.dtype
    node_limit = 30.0
    centre = np.zeros((ncodebooks, depth), dtype)
    factor = np.empty((ncodebooks, nnodes), dtype)
    direct = np.zeros((ncodebooks, nnodes), np.bool_)
    for c in range(ncodebooks):
        for t in range(depth):
            first = (1 << t) - 1
            total = 0.0
            for node in range(first, 2 * first + 1):
                total += thresholds[c, node]
            centre[c, t] = total / (first + 1)
            scale = 2.0 * inv_tau[c, t]
            for node in range(first, 2 * first + 1):
                z = scale * (thresholds[c, node] - centre[c, t])
                direct[c, node] = abs(z) > node_limit
                factor[c, node] = np.exp(min(max(z, -node_limit), node_limit))
    return centre, factor, direct


@numba.njit(inline="always")
def leaves_from_bf16(
    diff_scores, row0, j, start, block, depth, bits, bits_as_float, leaves
):  # pragma: no cover
    """leaves[k, 0, :block]: the leaf scores of one codebook and block of rows (positions),
    up to a constant per row, from its K - 1 bfloat16 node differences
    (``surrogate="soft-bf16"``; used by :func:`tree_backward` and the fused conv backward).

    diff_scores[row0 + n, j, start + i] (uint16, the bfloat16 bits) is
    ``(T[c, lm(right(n))] - T[c, lm(n)]) . dL/dY`` for heap node n, lm the leftmost leaf
    below a node (:func:`maddnet.nn.functional.tree_difference_table`). Leaf 0 is set to 0
    and every other leaf is its node's leftmost leaf plus the node's difference, level by
    level. The soft tree's gradients read only differences of leaf scores, so the constant
    left out (the true leaf-0 score) changes nothing. bits (uint32) and bits_as_float (its
    float32 view) are scratch of at least ``block`` entries.
    """
    nleaves = 1 << depth
    for i in range(block):
        leaves[0, 0, i] = np.float32(0.0)
    node = 0
    for t in range(depth):
        span = nleaves >> t  # leaves below a node of level t
        half = span >> 1
        for k in range(1 << t):
            row = diff_scores[row0 + node, j, start:]
            for i in range(block):
                bits[i] = np.uint32(row[i]) << np.uint32(16)  # bfloat16 -> float32 is exact
            left = k * span
            for i in range(block):
                leaves[left + half, 0, i] = leaves[left, 0, i] + bits_as_float[i]
            node += 1


@cached_njit(parallel=True, fastmath=_FAST)
def tree_backward(
    values, thresholds, inv_tau, grad_scores, diff_scores, grad_values, grad_thresholds
):  # pragma: no cover
    """Soft-tree surrogate backward for a chunk of n rows.

    values (n, C, L), thresholds (C, K-1) heap order, inv_tau (C, L), grad_scores (C*K, n)
    = dL/d(soft leaf score) = grad_out[n] . T[c, k]; or, with grad_scores empty
    (``surrogate="soft-bf16"``), diff_scores (C*(K-1), 1, n) uint16, the bfloat16 bits of
    the node differences ``(T[c, lm(right(n))] - T[c, lm(n)]) . grad_out`` (heap order; see
    :func:`maddnet.nn.functional.tree_difference_table`), from which :func:`leaves_from_bf16`
    rebuilds the leaf scores per block of rows up to a constant the gradients do not see
    (diff_scores empty otherwise). Writes grad_values (n, C, L) (skipped when it is empty) and adds into
    grad_thresholds (C, K-1) float64.

    Threads take blocks of rows; inner loops run over a block's rows so they vectorise.
    The right-probability ``p = (1 + tanh(m)) / 2 = 1 / (1 + exp(s (v - x)))`` with
    ``s = 2 / tau`` is computed as ``1 / (1 + E F)``, ``E = exp(s (c - x))`` once per row
    and level, ``F = exp(s (v - c))`` once per node, with ``c`` the mean threshold of the
    level: one exp per level instead of one per node. E is clamped to exp(+-50), so a
    clamped E only ever meets saturated probabilities (error < exp(-20)); nodes with
    |s (v - c)| > 30 take the direct one-exp-per-row formula. Its slope
    ``(1 - tanh^2) / 2`` is ``2 p (1 - p)`` (times 1 / tau). Centres and factors come from
    :func:`level_factors`.
    """
    nrows, ncodebooks, depth = values.shape
    nleaves = 1 << depth
    nnodes = nleaves - 1
    want_values = grad_values.shape[0] > 0
    from_bf16 = diff_scores.shape[0] > 0
    dtype = values.dtype
    one = dtype.type(1.0)
    row_limit = dtype.type(50.0)
    direct_limit = dtype.type(80.0)  # exp(80) is finite in float32
    centre, factor, direct = level_factors(thresholds, inv_tau)
    nblocks = (nrows + _BLOCK - 1) // _BLOCK
    partial = np.zeros((nblocks, ncodebooks, nnodes))
    for blk in numba.prange(nblocks):
        start = blk * _BLOCK
        block = min(_BLOCK, nrows - start)
        right = np.empty((nnodes, _BLOCK), dtype)
        slope = np.empty((nnodes, _BLOCK), dtype)
        reach = np.empty((nnodes + nleaves, _BLOCK), dtype)
        grad_reach = np.empty((nnodes + nleaves, _BLOCK), dtype)
        acc = np.empty(_BLOCK, dtype)
        expo = np.empty(_BLOCK, dtype)
        bits = np.empty(_BLOCK, np.uint32)
        bits_as_float = bits.view(np.float32)
        leaves = grad_reach[nnodes:].reshape((nleaves, 1, _BLOCK))  # the leaf rows, 3-D view
        for c in range(ncodebooks):
            # forward: probability of going right at every node, reach of every node
            for b in range(block):
                reach[0, b] = one
            for t in range(depth):
                scale = dtype.type(2.0) * inv_tau[c, t]
                mid = centre[c, t]
                for b in range(block):
                    z = scale * (mid - values[start + b, c, t])
                    expo[b] = np.exp(min(max(z, -row_limit), row_limit))
                first = (1 << t) - 1
                for node in range(first, 2 * first + 1):
                    if direct[c, node]:
                        v = thresholds[c, node]
                        for b in range(block):
                            z = scale * (v - values[start + b, c, t])
                            right[node, b] = one / (one + np.exp(min(max(z, -direct_limit), direct_limit)))
                    else:
                        f = factor[c, node]
                        for b in range(block):
                            right[node, b] = one / (one + expo[b] * f)
                    for b in range(block):
                        p = right[node, b]
                        slope[node, b] = p * (one - p) * scale
                        reach[2 * node + 1, b] = reach[node, b] * (one - p)
                        reach[2 * node + 2, b] = reach[node, b] * p
            # backward from the leaves (heap indices nnodes .. nnodes + K - 1)
            if from_bf16:
                leaves_from_bf16(diff_scores, c * nnodes, 0, start, block, depth, bits, bits_as_float, leaves)
            else:
                for k in range(nleaves):
                    for b in range(block):
                        grad_reach[nnodes + k, b] = grad_scores[c * nleaves + k, start + b]
            for t in range(depth - 1, -1, -1):
                first = (1 << t) - 1
                for b in range(block):
                    acc[b] = 0
                for node in range(first, 2 * first + 1):
                    total = 0.0
                    for b in range(block):
                        left_grad = grad_reach[2 * node + 1, b]
                        diff = grad_reach[2 * node + 2, b] - left_grad
                        grad_node = reach[node, b] * diff * slope[node, b]
                        grad_reach[node, b] = left_grad + right[node, b] * diff
                        acc[b] += grad_node
                        total += grad_node
                    partial[blk, c, node] = -total
                if want_values:
                    for b in range(block):
                        grad_values[start + b, c, t] = acc[b]
    grad_thresholds += partial.sum(axis=0)


@cached_njit(parallel=True, fastmath=_FAST)
def lut_gradient(codes, grad_out, nprototypes, nparts):  # pragma: no cover
    """codes (N, C) uint8, grad_out (N, M) -> (C, K, M): sum of grad_out rows per code.

    ``nparts`` threads each take a contiguous range of rows (every row is read once) and
    fill their own (C, K, M) partial sum; the partials are added at the end.
    """
    nrows, ncodebooks = codes.shape
    nout = grad_out.shape[1]
    partial = np.zeros((nparts, ncodebooks, nprototypes, nout), grad_out.dtype)
    per_part = (nrows + nparts - 1) // nparts
    for part in numba.prange(nparts):
        table = partial[part]
        for r in range(part * per_part, min(nrows, (part + 1) * per_part)):
            row = grad_out[r]
            for c in range(ncodebooks):
                entry = table[c, codes[r, c]]
                for m in range(nout):
                    entry[m] += row[m]
    grad = partial[0].copy()
    for part in range(1, nparts):
        grad += partial[part]
    return grad


@cached_njit(parallel=True)
def conv_gather(images, taps, out_h, out_w, stride_y, stride_x, pad_y, pad_x):  # pragma: no cover
    """values (B*Hout*Wout, C, L): the split taps of every patch (0 in the padding).

    images (B, Cin, H, W), taps (C, L, 3) int64 (channel, dy, dx). Threads take output
    rows; loads run along image rows.
    """
    batch, _, height, width = images.shape
    ncodebooks, depth = taps.shape[0], taps.shape[1]
    values = np.zeros((batch * out_h * out_w, ncodebooks, depth), images.dtype)
    for task in numba.prange(batch * out_h):
        b = task // out_h
        oy = task - b * out_h
        row0 = task * out_w
        for c in range(ncodebooks):
            for t in range(depth):
                iy = oy * stride_y + taps[c, t, 1] - pad_y
                if 0 <= iy < height:
                    line = images[b, taps[c, t, 0], iy]
                    x0 = taps[c, t, 2] - pad_x
                    for ox in range(out_w):
                        ix = ox * stride_x + x0
                        if 0 <= ix < width:
                            values[row0 + ox, c, t] = line[ix]
    return values


@cached_njit(parallel=True)
def conv_scatter(
    grad_values, taps, batch, channels, height, width, out_h, out_w, stride_y, stride_x, pad_y, pad_x
):  # pragma: no cover
    """Adjoint of :func:`conv_gather`: (B*Hout*Wout, C, L) -> (B, Cin, H, W), summing
    the gradients of taps shared by several patches (threads take images: no races)."""
    ncodebooks, depth = taps.shape[0], taps.shape[1]
    grad = np.zeros((batch, channels, height, width), grad_values.dtype)
    for b in numba.prange(batch):
        for oy in range(out_h):
            row0 = (b * out_h + oy) * out_w
            for c in range(ncodebooks):
                for t in range(depth):
                    iy = oy * stride_y + taps[c, t, 1] - pad_y
                    if 0 <= iy < height:
                        line = grad[b, taps[c, t, 0], iy]
                        x0 = taps[c, t, 2] - pad_x
                        for ox in range(out_w):
                            ix = ox * stride_x + x0
                            if 0 <= ix < width:
                                line[ix] += grad_values[row0 + ox, c, t]
    return grad


@numba.njit(inline="always")
def path_score_differences(g, rows, leaf, values, thresholds, diffs, nodes):  # pragma: no cover
    """The hard-path surrogate's score differences of one row and codebook.

    For the path to ``leaf``: ``diffs[t] = g . (T[right leaf] - T[left leaf])`` at the
    path's node t, where one side is ``leaf`` and the other the leaf reached by going the
    other way at t and then descending hard; ``nodes[t]`` is that node's heap index.
    g (M,) dL/dY; rows (K, M) the codebook's table; values (L,) the row's split values;
    thresholds (K-1,) heap order; diffs, nodes (L,) outputs (views may be strided).
    """
    depth = values.shape[0]
    nout = g.shape[0]
    reached = rows[leaf]
    score = g.dtype.type(0.0)
    for m in range(nout):
        score += g[m] * reached[m]
    for t in range(depth):
        prefix = leaf >> (depth - t)
        bit = (leaf >> (depth - 1 - t)) & 1
        alt = 2 * prefix + 1 - bit
        for u in range(t + 1, depth):
            alt = 2 * alt + (values[u] > thresholds[(1 << u) - 1 + alt])
        other = rows[alt]
        other_score = g.dtype.type(0.0)
        for m in range(nout):
            other_score += g[m] * other[m]
        diffs[t] = score - other_score if bit == 1 else other_score - score
        nodes[t] = (1 << t) - 1 + prefix


@cached_njit(parallel=True, fastmath=_FAST)
def path_backward(
    values, thresholds, inv_tau, table, grad_out, codes, grad_values, grad_thresholds
):  # pragma: no cover
    """Hard-path surrogate backward (``surrogate="path"``).

    For each row and codebook only the L nodes on the row's hard path get a gradient:
    node t's soft decision ``p = (1 + tanh((x_t - v)/tau)) / 2`` switches between the leaf
    the row reached and the leaf it would reach by going the other way at that node (then
    descending hard), so ``dL/dx_t = p' * grad_out . (T[c, right leaf] - T[c, left leaf])``
    and ``dL/dv = -dL/dx_t``. values (n, C, L), thresholds (C, K-1), inv_tau (C, L), table
    (C, K, M), grad_out (n, M), codes (n, C) uint8; writes grad_values (n, C, L) (skipped
    when empty) and adds into grad_thresholds (C, K-1) float64.
    """
    nrows, ncodebooks, depth = values.shape
    nnodes = (1 << depth) - 1
    want_values = grad_values.shape[0] > 0
    dtype = values.dtype
    one = dtype.type(1.0)
    limit = dtype.type(80.0)
    nblocks = (nrows + _BLOCK - 1) // _BLOCK
    partial = np.zeros((nblocks, ncodebooks, nnodes))
    for blk in numba.prange(nblocks):
        diffs = np.empty(depth, dtype)
        nodes = np.empty(depth, np.int64)
        for r in range(blk * _BLOCK, min(nrows, (blk + 1) * _BLOCK)):
            g = grad_out[r]
            for c in range(ncodebooks):
                path_score_differences(
                    g, table[c], np.int64(codes[r, c]), values[r, c], thresholds[c], diffs, nodes
                )
                for t in range(depth):
                    node = nodes[t]
                    z = min(max((thresholds[c, node] - values[r, c, t]) * 2 * inv_tau[c, t], -limit), limit)
                    p = one / (one + np.exp(z))
                    grad_node = 2 * p * (one - p) * inv_tau[c, t] * diffs[t]
                    if want_values:
                        grad_values[r, c, t] = grad_node
                    partial[blk, c, node] -= grad_node
    grad_thresholds += partial.sum(axis=0)
