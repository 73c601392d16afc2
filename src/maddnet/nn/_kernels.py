"""numba CPU kernels for MADD layers (training backward, conv encoding).

Each kernel has a tensor-op twin in :mod:`maddnet.nn.functional` that runs on any device;
tests check that both give the same numbers. Kernels parallelise over codebooks so the
per-codebook gradients accumulate without races.
"""

from __future__ import annotations

import numba
import numpy as np

# Rows per block of the surrogate kernel: inner loops run over a block, so they vectorise.
_BLOCK = 128
# fastmath without nnan / ninf: exp() may overflow to inf on purpose (see below).
_FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}


@numba.njit(parallel=True, cache=True, nogil=True, fastmath=_FAST)
def tree_backward(
    values, thresholds, inv_tau, table, grad_out_t, grad_values, grad_thresholds
):  # pragma: no cover
    """Soft-tree surrogate backward.

    values (n, C, L), thresholds (C, K-1) heap order, inv_tau (C, L), table (C, K, M) the
    LUT read forward, grad_out_t (M, n) the output gradient, transposed. Writes grad_values
    (n, C, L) (skipped when it is empty) and adds into grad_thresholds (C, K-1) float64.
    The leaf-score gradient ``grad_out[n] . table[c, k]`` is formed block by block here
    (no (n, C, K) tensor).

    Threads take blocks of rows (each block's values are contiguous), the inner loops run
    over the rows of a block so they vectorise. The right-probability
    ``p = (1 + tanh(m)) / 2`` is computed as ``1 / (1 + exp(-2 m))`` (the same function;
    exp is much cheaper than tanh here) and its slope ``(1 - tanh(m)^2) / 2`` as ``2 p (1 - p)``.
    """
    nrows, ncodebooks, depth = values.shape
    nleaves = 1 << depth
    nnodes = nleaves - 1
    nout = table.shape[2]
    want_values = grad_values.shape[0] > 0
    dtype = values.dtype
    zero = dtype.type(0.0)
    one = dtype.type(1.0)
    two = dtype.type(2.0)
    limit = dtype.type(80.0)  # exp(80) is finite in float32
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
        xs = np.empty(_BLOCK, dtype)
        for c in range(ncodebooks):
            # forward: probability of going right at every node, reach of every node
            for b in range(block):
                reach[0, b] = one
            for t in range(depth):
                scale = two * inv_tau[c, t]
                for b in range(block):
                    xs[b] = values[start + b, c, t]
                first = (1 << t) - 1
                for node in range(first, 2 * first + 1):
                    v = thresholds[c, node]
                    for b in range(block):
                        z = min(max((v - xs[b]) * scale, -limit), limit)
                        p = one / (one + np.exp(z))
                        right[node, b] = p
                        slope[node, b] = p * (one - p) * scale
                        reach[2 * node + 1, b] = reach[node, b] * (one - p)
                        reach[2 * node + 2, b] = reach[node, b] * p
            # backward from the leaves (heap indices nnodes .. nnodes + K - 1)
            for k in range(nleaves):
                scores = grad_reach[nnodes + k]
                for b in range(block):
                    scores[b] = zero
                for m in range(nout):
                    weight = table[c, k, m]
                    column = grad_out_t[m, start : start + block]
                    for b in range(block):
                        scores[b] += weight * column[b]
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


@numba.njit(parallel=True, cache=True, nogil=True, fastmath=True)
def lut_gradient(codes, grad_out, nprototypes):  # pragma: no cover
    """codes (N, C) uint8, grad_out (N, M) -> (C, K, M): sum of grad_out rows per code."""
    nrows, ncodebooks = codes.shape
    nout = grad_out.shape[1]
    grad = np.zeros((ncodebooks, nprototypes, nout), grad_out.dtype)
    for c in numba.prange(ncodebooks):
        table = grad[c]
        for r in range(nrows):
            entry = table[codes[r, c]]
            row = grad_out[r]
            for m in range(nout):
                entry[m] += row[m]
    return grad


@numba.njit(parallel=True, cache=True, nogil=True)
def conv_encode(padded, offsets, positions, thresholds):  # pragma: no cover
    """Codes of every conv patch read straight from the padded image.

    padded (B, Cin*Hp*Wp) float32, offsets (C, L) int64 flat offsets of the split columns,
    positions (P,) int64 flat offsets of the patch origins, thresholds (C, K-1) float32
    -> (B*P, C) uint8, rows ordered (batch, position).
    """
    batch = padded.shape[0]
    npos = positions.shape[0]
    ncodebooks, depth = offsets.shape
    codes = np.empty((batch * npos, ncodebooks), np.uint8)
    for row in numba.prange(batch * npos):
        b = row // npos
        base = positions[row - b * npos]
        image = padded[b]
        for c in range(ncodebooks):
            leaf = 0
            for t in range(depth):
                node = (1 << t) - 1 + leaf
                leaf = 2 * leaf + (image[base + offsets[c, t]] > thresholds[c, node])
            codes[row, c] = leaf
    return codes


@numba.njit(parallel=True, cache=True, nogil=True)
def conv_gather(padded, offsets, positions):  # pragma: no cover
    """values (B*P, C, L) = padded[b, positions[p] + offsets[c, t]]."""
    batch = padded.shape[0]
    npos = positions.shape[0]
    ncodebooks, depth = offsets.shape
    values = np.empty((batch * npos, ncodebooks, depth), padded.dtype)
    for row in numba.prange(batch * npos):
        b = row // npos
        base = positions[row - b * npos]
        image = padded[b]
        for c in range(ncodebooks):
            for t in range(depth):
                values[row, c, t] = image[base + offsets[c, t]]
    return values


@numba.njit(parallel=True, cache=True, nogil=True)
def conv_scatter(grad_values, offsets, positions, batch, size):  # pragma: no cover
    """Adjoint of :func:`conv_gather`: (B*P, C, L) -> (B, size) with sums at shared taps."""
    npos = positions.shape[0]
    ncodebooks, depth = offsets.shape
    grad = np.zeros((batch, size), grad_values.dtype)
    for b in numba.prange(batch):
        image = grad[b]
        for p in range(npos):
            row = b * npos + p
            base = positions[p]
            for c in range(ncodebooks):
                for t in range(depth):
                    image[base + offsets[c, t]] += grad_values[row, c, t]
    return grad
