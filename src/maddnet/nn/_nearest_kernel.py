"""numba CPU kernel: the soft-argmin surrogate backward of the nearest-prototype encoders.

The surrogate's code scores are ``s = softmax_k(-d(v_c, centroid_ck) / tau_c)`` with d the
L1 or squared-L2 distance over the codebook's block (``NearestPrototypeModule.soft_scores``).
Autograd through that formula forms several (N, C, K, W) tensors (1.8 GB each for a
ResNet-9 layer at batch 128); this kernel walks one row and codebook at a time instead and
gives the same gradients (to float32 rounding; tests compare it with autograd).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .._jit import cached_njit

# rows per block: each block writes its own centroid-gradient slice (summed afterwards, in
# block order), so the result does not depend on the thread count
BLOCK = 1024
METRIC_CODES = {"l1": 0, "l2": 1}


@cached_njit(parallel=True)
def soft_argmin_backward(
    values, centroids, mask, inv_tau, grad_scores, metric, need_values, need_centroids, block
):  # pragma: no cover - jit
    """values (N, C, W), centroids (C, K, W), mask (C, W) float32 (1 = a real column),
    inv_tau (C,), grad_scores (N, C, K) = dL/ds (all float32); metric 0 = L1, 1 = squared L2
    -> grad_values (N, C, W) (or (0, 0, 0) when not ``need_values``) and per-block centroid
    gradients (blocks, C, K, W) (or (0, 0, 0, 0)), to be summed over the blocks.

    With ``e_k = -d_k / tau`` and ``s = softmax(e)``: ``dL/dd_k = -s_k (g_k - sum_j s_j g_j)
    / tau``, then ``dd_k/dv_w = mask_w * sign(v_w - c_kw)`` (L1; 0 at a tie, as torch's abs)
    or ``2 mask_w (v_w - c_kw)`` (L2), and ``dd_k/dc_kw = -dd_k/dv_w``.
    """
    nrows, ncodebooks, width = values.shape
    nprototypes = centroids.shape[1]
    nblocks = (nrows + block - 1) // block
    if need_values:
        grad_values = np.zeros((nrows, ncodebooks, width), np.float32)
    else:
        grad_values = np.zeros((0, 0, 0), np.float32)
    if need_centroids:
        grad_parts = np.zeros((nblocks, ncodebooks, nprototypes, width), np.float32)
    else:
        grad_parts = np.zeros((0, 0, 0, 0), np.float32)
    for bi in numba.prange(nblocks):
        dist = np.empty(nprototypes, np.float32)
        score = np.empty(nprototypes, np.float32)
        slope = np.empty(nprototypes, np.float32)
        for n in range(bi * block, min(nrows, (bi + 1) * block)):
            for c in range(ncodebooks):
                for k in range(nprototypes):
                    total = np.float32(0)
                    for w in range(width):
                        diff = (values[n, c, w] - centroids[c, k, w]) * mask[c, w]
                        total += abs(diff) if metric == 0 else diff * diff
                    dist[k] = total
                # softmax of -d / tau, shifted by the smallest distance (the largest logit)
                smallest = dist[0]
                for k in range(1, nprototypes):
                    smallest = min(smallest, dist[k])
                norm = np.float32(0)
                for k in range(nprototypes):
                    score[k] = math.exp(-(dist[k] - smallest) * inv_tau[c])
                    norm += score[k]
                mean_grad = np.float32(0)
                for k in range(nprototypes):
                    score[k] /= norm
                    mean_grad += score[k] * grad_scores[n, c, k]
                for k in range(nprototypes):
                    slope[k] = -score[k] * (grad_scores[n, c, k] - mean_grad) * inv_tau[c]
                for k in range(nprototypes):
                    for w in range(width):
                        diff = (values[n, c, w] - centroids[c, k, w]) * mask[c, w]
                        if metric == 0:
                            step = np.float32(0)
                            if diff > 0:
                                step = mask[c, w]
                            elif diff < 0:
                                step = -mask[c, w]
                        else:
                            step = 2 * diff * mask[c, w]
                        term = slope[k] * step
                        if need_values:
                            grad_values[n, c, w] += term
                        if need_centroids:
                            grad_parts[bi, c, k, w] -= term
    return grad_values, grad_parts
