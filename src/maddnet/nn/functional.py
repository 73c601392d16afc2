"""The MADD product on gathered values, with a training-friendly backward pass.

A MADD layer reads only the input columns its encoder reads (for the tree, the
``L = log2 K`` split columns of each codebook), so the layers gather those values first
(``values`` (N, C, R): ``values[n, c, r]`` is ``x_n[read_columns[c, r]]``) and hand them
here. The forward pass is the exact hard encoding followed by the LUT sum
(``maddnet.amm.lut.lut_sum``), so training sees what inference does. :class:`MaddLutFunction`
is the one autograd function for every encoder (:class:`maddnet.nn.encoders.EncoderModule`);
this module also holds the tree encoder's surrogate maths.

Backward (docs/design.md, "Training through the hard encoding"):

* the LUT gets its exact gradient, ``dL/dT[c, k] = sum of dL/dY[n] over rows n with
  code k in codebook c``;
* thresholds and the gathered input values get a straight-through surrogate: each tree
  node decides "right" with soft probability ``p = (1 + tanh((x[j] - v) / tau)) / 2``,
  a leaf's soft score is the product of the decisions on its path (a soft decision tree;
  the scores of a codebook sum to one), and the gradient is that of
  ``sum_c sum_k score[c, k] T[c, k]`` — the hard forward's smooth stand-in.

The surrogate is evaluated in row chunks (at most ``_SURROGATE_CHUNK_ELEMENTS`` rows x C x K
values at a time), so no (N, C, K) tensor of a whole conv batch is held, and never any
(N, C, K, M) tensor. On CPU numba kernels (:mod:`maddnet.nn._kernels`) do the tree
recursion and the LUT gradient; elsewhere the same maths runs in tensor ops.
"""

from __future__ import annotations

import contextlib

import numba
import numpy as np
import torch

from ..amm import hashing
from ..amm.lut import QuantizedLut, lut_sum, quantized_lut_sum
from . import _kernels
from .spec import SURROGATES

# Elements of one (rows, C, K) temporary in the surrogate backward; bounds its memory.
_SURROGATE_CHUNK_ELEMENTS = 1 << 25

# how tree_surrogate_grads computes its leaf scores
SURROGATE_PRECISIONS = ("float32", "bfloat16")

# dtypes MADD computes in float32 (the numba kernels take float32 / float64 only)
REDUCED_DTYPES = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype MADD arithmetic runs in for tensors of ``dtype``: float32 for float16 and
    bfloat16 (compares, LUT sums, de-quantisation and the surrogate backward in float32),
    otherwise ``dtype`` itself."""
    return torch.float32 if dtype in REDUCED_DTYPES else dtype


def widen(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """``tensor`` in float32 if it is float16 / bfloat16 (a differentiable cast: gradients
    flow back in the original dtype), else unchanged."""
    return tensor.float() if tensor is not None and tensor.dtype in REDUCED_DTYPES else tensor


def widen_quantized(quantized: QuantizedLut | None) -> QuantizedLut | None:
    """``quantized`` with float16 / bfloat16 offsets and scale in float32 (a model cast to
    bfloat16 casts those buffers too; the C offsets and the integer sums are then added in
    float32, not rounded to bfloat16 at every step)."""
    if quantized is None or (
        quantized.offsets.dtype not in REDUCED_DTYPES and quantized.scale.dtype not in REDUCED_DTYPES
    ):
        return quantized
    return QuantizedLut(quantized.values, widen(quantized.offsets), widen(quantized.scale), quantized.bits)


def no_autocast(device_type: str):
    """A context that turns autocast off on ``device_type`` where it is on (MADD maths runs
    in float32: autocast would round the surrogate's products to bfloat16 / float16, and
    the numba kernels take no reduced-precision arrays), else a no-op."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def compact_split_dims(ncodebooks: int, depth: int, device: torch.device) -> torch.Tensor:
    """Split dims of the gathered (N, C*L) value matrix: (C, L) ``c*L + t``."""
    return torch.arange(ncodebooks * depth, device=device).reshape(ncodebooks, depth)


def encode_values(values: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Codes of gathered split values: values (N, C, L), thresholds (C, K-1) -> (N, C) uint8."""
    nrows, ncodebooks, depth = values.shape
    dims = compact_split_dims(ncodebooks, depth, values.device)
    return hashing.encode(values.reshape(nrows, ncodebooks * depth), dims, thresholds.detach())


def lut_gradient(codes: torch.Tensor, grad_out: torch.Tensor, nprototypes: int) -> torch.Tensor:
    """Exact LUT gradient: codes (N, C), grad_out (N, M) -> (C, K, M).

    A numba kernel on CPU; elsewhere one ``index_add_`` per codebook. No (N, C, M)
    temporary is formed. A float16 / bfloat16 ``grad_out`` is summed in float32 (so is
    the result).
    """
    grad_out = widen(grad_out)
    if codes.device.type == "cpu":
        nparts = max(1, min(numba.get_num_threads(), codes.shape[0] // 1024))
        grad = _kernels.lut_gradient(
            np.ascontiguousarray(codes.numpy()),
            grad_out.detach().contiguous().numpy(),
            nprototypes,
            nparts,
        )
        return torch.from_numpy(grad)
    return _lut_gradient_torch(codes, grad_out, nprototypes)


def _lut_gradient_torch(codes: torch.Tensor, grad_out: torch.Tensor, nprototypes: int) -> torch.Tensor:
    ncodebooks = codes.shape[1]
    grad = grad_out.new_zeros(ncodebooks, nprototypes, grad_out.shape[1])
    for c in range(ncodebooks):
        grad[c].index_add_(0, codes[:, c].long(), grad_out)
    return grad


def tree_surrogate_grads(
    values: torch.Tensor,
    thresholds: torch.Tensor,
    table: torch.Tensor,
    temperature: torch.Tensor,
    grad_out: torch.Tensor,
    need_values: bool = True,
    need_thresholds: bool = True,
    precision: str = "float32",
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Surrogate gradients of the soft decision tree (see module docstring).

    Args:
        values: (N, C, L) gathered split values.
        thresholds: (C, K-1) heap-ordered thresholds.
        table: (C, K, M) the LUT the forward pass read.
        temperature: (C, L) tau per tree level (in the units of that split column).
        grad_out: (N, M) gradient of the loss w.r.t. the layer output (bias excluded).
        precision: "float32", or "bfloat16" (``surrogate="soft-bf16"``): the leaf scores
            ``grad_out . T[c, k]`` come from one bfloat16 product (float32 accumulation) of
            ``grad_out`` with the node differences :func:`tree_difference_table`, rounded
            to bfloat16, then summed back into leaf scores up to a per-row constant, which
            the soft tree's gradients do not see (they read only score differences).
            Faster where the CPU has bfloat16 instructions (AVX512-BF16, AMX; docs/nn.md,
            "bfloat16 leaf scores"); each difference then carries a relative error of about
            2^-8, whatever the dtype of ``values``.

    Returns:
        (grad_values (N, C, L) or None, grad_thresholds (C, K-1) or None), in the dtype of
        ``values`` (computed in float32 for float16 / bfloat16 values).
    """
    if precision not in SURROGATE_PRECISIONS:
        raise ValueError(f"precision must be one of {SURROGATE_PRECISIONS}, got {precision!r}")
    if values.dtype in REDUCED_DTYPES:
        grads = tree_surrogate_grads(
            values.float(), thresholds, table, temperature, grad_out, need_values, need_thresholds, precision
        )
        return tuple(None if g is None else g.to(values.dtype) for g in grads)
    ncodebooks, nprototypes = table.shape[:2]
    flat_table = table.reshape(ncodebooks * nprototypes, -1).to(values.dtype)
    thresholds = thresholds.detach().to(values.dtype)
    inv_tau = 1.0 / temperature.to(values.dtype)
    grad_out = grad_out.to(values.dtype)
    chunk = max(1, _SURROGATE_CHUNK_ELEMENTS // (ncodebooks * nprototypes))
    if precision == "bfloat16":
        scores = _Bf16LeafScores(table, values.dtype)
    else:
        scores = _LeafScores(flat_table)
    surrogate = _surrogate_cpu if values.device.type == "cpu" else _surrogate_torch
    return surrogate(
        values.detach(), thresholds, scores, inv_tau, grad_out, chunk, need_values, need_thresholds
    )


def tree_difference_table(table: torch.Tensor) -> torch.Tensor:
    """Node differences of each codebook's LUT rows: (C, K, M) -> (C, K-1, M), heap order.

    Row n of codebook c is ``T[c, lm(right(n))] - T[c, lm(n)]``, with lm the leftmost leaf
    below a node: node n at level t, index i within the level, spans leaves
    ``[i S, (i + 1) S)``, S = K / 2^t, so ``lm(n) = i S`` and ``lm(right(n)) = i S + S / 2``.
    Leaf k's row is then ``T[c, 0]`` plus the rows of the nodes whose right subtree holds k
    (:func:`right_subtree_matrix`). Computed in the dtype of ``table``.
    """
    nprototypes = table.shape[1]
    depth = nprototypes.bit_length() - 1
    levels = []
    for level in range(depth):
        span = nprototypes >> level
        left = torch.arange(1 << level, device=table.device) * span
        levels.append(table[:, left + span // 2] - table[:, left])
    return torch.cat(levels, dim=1)


def right_subtree_matrix(nprototypes: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(K-1, K) 0/1: entry [n, k] is 1 where leaf k is in the right subtree of heap node n,
    so that ``leaf scores - score of leaf 0 = node differences @ this`` (see
    :func:`tree_difference_table`)."""
    depth = nprototypes.bit_length() - 1
    matrix = torch.zeros(nprototypes - 1, nprototypes, device=device, dtype=dtype)
    node = 0
    for level in range(depth):
        span = nprototypes >> level
        for i in range(1 << level):
            matrix[node, i * span + span // 2 : (i + 1) * span] = 1
            node += 1
    return matrix


def bf16_node_table(table: torch.Tensor) -> torch.Tensor:
    """(C*(K-1), M) bfloat16: :func:`tree_difference_table` of (C, K, M) ``table``, computed
    in the table's dtype and then rounded (``surrogate="soft-bf16"``)."""
    return tree_difference_table(table).reshape(-1, table.shape[2]).bfloat16()


class _LeafScores:
    """``grad_out . T[c, k]`` for a chunk of rows, exactly (float32 product)."""

    def __init__(self, flat_table: torch.Tensor) -> None:
        self.flat_table = flat_table  # (C*K, M)
        self.no_diffs = np.empty((0, 0, 0), np.uint16)

    def rows_first(self, grad_out: torch.Tensor) -> torch.Tensor:
        """(n, C*K) for (n, M) ``grad_out``."""
        return grad_out @ self.flat_table.T

    def kernel_arrays(self, grad_out: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """:func:`maddnet.nn._kernels.tree_backward`'s (grad_scores, diff_scores) for (n, M)
        CPU ``grad_out``: the (C*K, n) leaf scores, no differences."""
        return (self.flat_table @ grad_out.T).contiguous().numpy(), self.no_diffs


class _Bf16LeafScores:
    """The same leaf scores up to a constant per row and codebook, from one bfloat16 product
    with the node differences (``precision="bfloat16"`` of :func:`tree_surrogate_grads`)."""

    def __init__(self, table: torch.Tensor, dtype: torch.dtype) -> None:
        ncodebooks, nprototypes, _ = table.shape
        self.shape = (ncodebooks, nprototypes)
        self.node_table = bf16_node_table(table.to(dtype))
        self.dtype = dtype
        self.no_scores = np.empty((0, 0), torch.empty(0, dtype=dtype).numpy().dtype)

    def rows_first(self, grad_out: torch.Tensor) -> torch.Tensor:
        ncodebooks, nprototypes = self.shape
        nodes = grad_out.bfloat16() @ self.node_table.T
        leaves = _leaves_from_nodes(nodes.view(-1, ncodebooks, nprototypes - 1), 2, self.dtype)
        return leaves.reshape(-1, ncodebooks * nprototypes)

    def kernel_arrays(self, grad_out: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """:func:`maddnet.nn._kernels.tree_backward`'s (grad_scores, diff_scores) for (n, M)
        CPU ``grad_out``: no leaf scores, the (C*(K-1), 1, n) uint16 bfloat16 bits of the node
        differences (the kernel rebuilds leaf scores from them per block of rows)."""
        nodes = self.node_table @ grad_out.bfloat16().T
        return self.no_scores, nodes.view(torch.int16).numpy().view(np.uint16).reshape(len(nodes), 1, -1)


def _leaves_from_nodes(nodes: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Leaf scores (K along ``dim``) up to the score of leaf 0, from the K-1 node differences
    (heap order along ``dim``) of :func:`tree_difference_table`: ``nodes @ right_subtree_matrix``
    done level by level, one strided addition per level (K - 1 additions per codebook and row
    instead of a (K-1) x K product), in ``dtype``."""
    nprototypes = nodes.shape[dim] + 1
    shape = list(nodes.shape)
    shape[dim] = nprototypes
    leaves = nodes.new_empty(shape, dtype=dtype)
    index = [slice(None)] * nodes.dim()

    def along(part: slice) -> tuple:
        index[dim] = part
        return tuple(index)

    leaves[along(slice(0, 1))] = 0
    first = 0
    for level in range(nprototypes.bit_length() - 1):
        span = nprototypes >> level
        count = 1 << level
        # every node of this level: its right subtree's leftmost leaf = its leftmost leaf + difference
        leaves[along(slice(span // 2, None, span))] = leaves[along(slice(0, None, span))] + nodes[
            along(slice(first, first + count))
        ].to(dtype)
        first += count
    return leaves


def _surrogate_torch(values, thresholds, scores, inv_tau, grad_out, chunk, need_values, need_thresholds):
    """:func:`tree_surrogate_grads` with tensor ops (any device), row chunk by row chunk."""
    nrows, ncodebooks, depth = values.shape
    nprototypes = thresholds.shape[1] + 1
    grad_values = torch.empty_like(values) if need_values else None
    grad_thresholds = torch.zeros_like(thresholds) if need_thresholds else None
    for start in range(0, nrows, chunk):
        stop = min(nrows, start + chunk)
        x = values[start:stop]
        # dL/dscore[n, c, k] = grad_out[n] . T[c, k]
        grad_scores = scores.rows_first(grad_out[start:stop]).reshape(-1, ncodebooks, nprototypes)
        # Forward through the soft tree, keeping each level's reach probabilities.
        reach = [x.new_ones(x.shape[0], ncodebooks, 1)]
        right_probs, slopes = [], []
        for level in range(depth):
            nodes = slice(2**level - 1, 2 ** (level + 1) - 1)
            margin = (x[:, :, level, None] - thresholds[None, :, nodes]) * inv_tau[None, :, level, None]
            tanh = torch.tanh(margin)
            right = 0.5 + 0.5 * tanh
            right_probs.append(right)
            # d right / d x = (1 - tanh^2) / (2 tau)
            slopes.append((1 - tanh * tanh) * (0.5 * inv_tau[None, :, level, None]))
            prev = reach[-1]
            reach.append(torch.stack((prev * (1 - right), prev * right), dim=-1).flatten(2))
        # Backward through the tree, level by level from the leaves.
        grad_reach = grad_scores
        for level in reversed(range(depth)):
            pair = grad_reach.unflatten(2, (2**level, 2))
            left_grad, right_grad = pair[..., 0], pair[..., 1]
            diff = right_grad - left_grad
            grad_node = reach[level] * diff * slopes[level]  # dL/dx through each node
            right = right_probs[level]
            grad_reach = left_grad + right * diff
            if grad_values is not None:
                grad_values[start:stop, :, level] = grad_node.sum(-1)
            if grad_thresholds is not None:
                nodes = slice(2**level - 1, 2 ** (level + 1) - 1)
                grad_thresholds[:, nodes] -= grad_node.sum(0)
    return grad_values, grad_thresholds


def _surrogate_cpu(values, thresholds, scores, inv_tau, grad_out, chunk, need_values, need_thresholds):
    """:func:`tree_surrogate_grads` through the numba kernel, chunk by chunk of rows."""
    nrows, ncodebooks, depth = values.shape
    grad_values = torch.empty_like(values) if need_values else None
    grad_thresholds = np.zeros(tuple(thresholds.shape), np.float64)
    no_values = values.new_empty(0, ncodebooks, depth).numpy()
    thresholds_np = thresholds.contiguous().numpy()
    inv_tau_np = inv_tau.contiguous().numpy()
    for start in range(0, nrows, chunk):
        stop = min(nrows, start + chunk)
        leaf_scores, diffs = scores.kernel_arrays(grad_out[start:stop])
        _kernels.tree_backward(
            values[start:stop].contiguous().numpy(),
            thresholds_np,
            inv_tau_np,
            leaf_scores,
            diffs,
            grad_values[start:stop].numpy() if grad_values is not None else no_values,
            grad_thresholds,
        )
    grad_thr = torch.from_numpy(grad_thresholds).to(values.dtype) if need_thresholds else None
    return grad_values, grad_thr


def path_surrogate_grads(
    values: torch.Tensor,
    thresholds: torch.Tensor,
    table: torch.Tensor,
    temperature: torch.Tensor,
    grad_out: torch.Tensor,
    codes: torch.Tensor,
    need_values: bool = True,
    need_thresholds: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Hard-path surrogate: only the L nodes on each row's path get gradients.

    Node t's soft decision switches between the reached leaf and the leaf reached by going
    the other way at that node (then descending hard); its gradient is
    ``p'(x_t) * grad_out . (T[right leaf] - T[left leaf])``, ``p = (1 + tanh((x_t - v)/tau))/2``.
    This is the soft tree's gradient with every other node taken as hard, at L instead of
    K - 1 nodes and L instead of K leaf products per row and codebook. Shapes (and dtypes)
    as in :func:`tree_surrogate_grads`, plus codes (N, C).
    """
    if values.dtype in REDUCED_DTYPES:
        grads = path_surrogate_grads(
            values.float(), thresholds, table, temperature, grad_out, codes, need_values, need_thresholds
        )
        return tuple(None if g is None else g.to(values.dtype) for g in grads)
    values = values.detach()
    thresholds = thresholds.detach().to(values.dtype)
    inv_tau = 1.0 / temperature.to(values.dtype)
    table = table.to(values.dtype)
    grad_out = grad_out.to(values.dtype).contiguous()
    if values.device.type == "cpu":
        grad_values = torch.empty_like(values) if need_values else values.new_empty(0, *values.shape[1:])
        grad_thresholds = np.zeros(tuple(thresholds.shape), np.float64)
        _kernels.path_backward(
            values.contiguous().numpy(),
            thresholds.contiguous().numpy(),
            inv_tau.contiguous().numpy(),
            table.contiguous().numpy(),
            grad_out.numpy(),
            codes.contiguous().numpy(),
            grad_values.numpy(),
            grad_thresholds,
        )
        grad_thr = torch.from_numpy(grad_thresholds).to(values.dtype) if need_thresholds else None
        return (grad_values if need_values else None), grad_thr
    return _path_torch(values, thresholds, inv_tau, table, grad_out, codes, need_values, need_thresholds)


def _path_torch(values, thresholds, inv_tau, table, grad_out, codes, need_values, need_thresholds):
    """:func:`path_surrogate_grads` with tensor ops (any device), row chunk by row chunk."""
    nrows, ncodebooks, depth = values.shape
    nout = table.shape[2]
    flat_table = table.reshape(-1, nout)
    flat_thresholds = thresholds.reshape(-1)
    nnodes = thresholds.shape[1]
    base = torch.arange(ncodebooks, device=values.device)
    grad_values = torch.empty_like(values)
    grad_thresholds = torch.zeros_like(thresholds)
    chunk = max(1, _SURROGATE_CHUNK_ELEMENTS // (ncodebooks * nout))
    for start in range(0, nrows, chunk):
        x, leaf = values[start : start + chunk], codes[start : start + chunk].long()
        g = grad_out[start : start + chunk]
        for t in range(depth):
            prefix = leaf >> (depth - t)
            node = (2**t - 1) + prefix  # (n, C)
            bit = (leaf >> (depth - 1 - t)) & 1
            alt = 2 * prefix + 1 - bit
            for u in range(t + 1, depth):
                v = flat_thresholds[base * nnodes + (2**u - 1) + alt]
                alt = 2 * alt + (x[:, :, u] > v).long()
            right = torch.where(bit == 1, leaf, alt)
            left = torch.where(bit == 1, alt, leaf)
            rows_k = table.shape[1]
            diff_table = flat_table[base * rows_k + right] - flat_table[base * rows_k + left]  # (n, C, M)
            diff = (diff_table * g[:, None, :]).sum(-1)
            tanh = torch.tanh((x[:, :, t] - flat_thresholds[base * nnodes + node]) * inv_tau[:, t])
            grad_node = (1 - tanh * tanh) * 0.5 * inv_tau[:, t] * diff
            grad_values[start : start + chunk, :, t] = grad_node
            grad_thresholds.view(-1).index_add_(0, (base * nnodes + node).reshape(-1), -grad_node.reshape(-1))
    return (grad_values if need_values else None), (grad_thresholds if need_thresholds else None)


def tree_backward(surrogate, values, codes, tensors, table, grad_out, needs):
    """The tree encoder's surrogate backward (``EncoderModule.surrogate_backward`` contract):
    tensors = (thresholds, temperature); "soft", "soft-bf16" or "path" surrogate."""
    thresholds, temperature = tensors
    need_values, need_thresholds = needs[0], needs[1]
    if surrogate == "path":
        grad_values, grad_thresholds = path_surrogate_grads(
            values, thresholds, table, temperature, grad_out, codes, need_values, need_thresholds
        )
    else:
        precision = "bfloat16" if surrogate == "soft-bf16" else "float32"
        grad_values, grad_thresholds = tree_surrogate_grads(
            values, thresholds, table, temperature, grad_out, need_values, need_thresholds, precision
        )
    if grad_thresholds is not None:
        grad_thresholds = grad_thresholds.to(thresholds.dtype)
    return grad_values, (grad_thresholds, None)


class _TreeRule:
    """The tree's encode / surrogate on raw tensors (what :func:`madd_lut` hands to
    :class:`MaddLutFunction` in place of an encoder module)."""

    def __init__(self, thresholds: torch.Tensor, surrogate: str) -> None:
        self.thresholds, self.surrogate = thresholds, surrogate

    def encode_values(self, values: torch.Tensor) -> torch.Tensor:
        return encode_values(values, self.thresholds)

    def surrogate_backward(self, values, codes, tensors, table, grad_out, needs):
        return tree_backward(self.surrogate, values, codes, tensors, table, grad_out, needs)


class MaddLutFunction(torch.autograd.Function):
    """Hard encode + LUT read forward; exact LUT gradient and the encoder's surrogate backward.

    ``encoder`` is an :class:`~maddnet.nn.encoders.EncoderModule` (or anything with its
    ``encode_values`` / ``surrogate_backward``); ``tensors`` are its ``surrogate_tensors()``,
    passed through so that autograd hands their gradients to them.
    """

    @staticmethod
    def forward(ctx, values, lut, q_values, q_offsets, q_scale, bits, codes, encoder, *tensors):
        if codes is None:
            codes = encoder.encode_values(values)
        if q_values is None:
            table = lut.detach()
            out = lut_sum(codes, table)
        else:  # integer LUT: the sum inference computes; backward sees its float twin
            qlut = QuantizedLut(q_values, q_offsets, q_scale, bits)
            table = qlut.dequantize()
            out = quantized_lut_sum(codes, qlut)
        ctx.save_for_backward(values, table, codes, *tensors)
        ctx.lut_dtype = lut.dtype
        ctx.encoder = encoder
        return out

    @staticmethod
    def backward(ctx, grad_out):
        with no_autocast(grad_out.device.type):  # backward() called inside an autocast region
            return MaddLutFunction._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        values, table, codes, *tensors = ctx.saved_tensors
        need_values, need_lut = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_tensors = ctx.needs_input_grad[8:]
        grad_out = grad_out.contiguous()
        grad_lut = None
        if need_lut:
            grad_lut = lut_gradient(codes, grad_out, table.shape[1]).to(ctx.lut_dtype)
        grad_values, grad_tensors = None, (None,) * len(tensors)
        if need_values or any(need_tensors):
            grad_values, grad_tensors = ctx.encoder.surrogate_backward(
                values, codes, tuple(tensors), table, grad_out, (need_values, *need_tensors)
            )
        return (grad_values, grad_lut, None, None, None, None, None, None, *grad_tensors)


def madd_lut_encoded(
    values: torch.Tensor,
    encoder,
    lut: torch.Tensor,
    quantized: QuantizedLut | None = None,
    codes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable MADD product of values gathered for ``encoder`` (an
    :class:`~maddnet.nn.encoders.EncoderModule`): (N, C, R) -> (N, M).

    With ``quantized`` (the integer version of ``lut``) the forward pass sums the integer
    LUT and the gradient goes straight through to the float ``lut`` (QAT). ``codes`` (N, C),
    if the caller has them already, must be ``encoder.encode_values(values)``.

    float16 / bfloat16 values, LUTs and encoder tensors are widened to float32 for the
    computation (autocast is off inside); the result has the dtype of ``values``, the
    gradients the dtype of each input.
    """
    tensors = encoder.surrogate_tensors()
    return _apply_widened(values, lut, quantized, codes, encoder, tensors)


def _apply_widened(values, lut, quantized, codes, encoder, tensors) -> torch.Tensor:
    """:class:`MaddLutFunction` on float16 / bfloat16 inputs widened to float32; the output
    in the dtype of ``values``."""
    quantized = widen_quantized(quantized)
    q = (
        (None, None, None, 0)
        if quantized is None
        else (quantized.values, quantized.offsets, quantized.scale, quantized.bits)
    )
    with no_autocast(values.device.type):
        out = MaddLutFunction.apply(widen(values), widen(lut), *q, codes, encoder, *map(widen, tensors))
    return out.to(values.dtype) if values.dtype in REDUCED_DTYPES else out


def madd_lut(
    values: torch.Tensor,
    thresholds: torch.Tensor,
    lut: torch.Tensor,
    temperature: torch.Tensor,
    quantized: QuantizedLut | None = None,
    codes: torch.Tensor | None = None,
    surrogate: str = "soft",
) -> torch.Tensor:
    """Differentiable MADD product of the tree encoder on gathered split values: (N, C, L) -> (N, M).

    The tree's tensors given directly (thresholds (C, K-1), temperature (C, L)); see
    :func:`madd_lut_encoded` for ``quantized`` and ``codes``. ``surrogate`` picks the
    threshold / input gradient: "soft" (the soft decision tree, :func:`tree_surrogate_grads`),
    "soft-bf16" (the same with its leaf-score product in bfloat16) or "path"
    (:func:`path_surrogate_grads`, cheaper).
    """
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
    rule = _TreeRule(thresholds, surrogate)
    return _apply_widened(values, lut, quantized, codes, rule, (thresholds, temperature))
