"""The MADDness hash: one balanced binary regression tree per codebook.

A tree of depth ``L = log2(K)`` has ONE split column per level (``split_dims[c, t]``, a
global column index of ``A``) and one threshold per node. Thresholds are stored in heap
order: node ``i`` of level ``t`` sits at ``thresholds[c, 2**t - 1 + i]``. A row ``x``
descends with ``i = 2*i + (x[split_dims[c, t]] > thresholds[c, 2**t - 1 + i])``; the
leaf index after ``L`` levels is the row's code for that codebook.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import _lut_kernel, _split_kernel


def subspace_bounds(ndims: int, ncodebooks: int) -> list[tuple[int, int]]:
    """Split ``range(ndims)`` into ``ncodebooks`` contiguous blocks ``[start, stop)``.

    Widths differ by at most one; the first ``ndims % ncodebooks`` blocks are the wider.
    """
    if ncodebooks < 1:
        raise ValueError(f"ncodebooks must be >= 1, got {ncodebooks}")
    if ncodebooks > ndims:
        raise ValueError(f"ncodebooks (C={ncodebooks}) cannot exceed the number of input columns (D={ndims})")
    base, extra = divmod(ndims, ncodebooks)
    bounds, start = [], 0
    for c in range(ncodebooks):
        stop = start + base + (1 if c < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


# Rows per block of the CPU encoders (one parallel task; the unit of the NaN/inf check).
_ENCODE_BLOCK = 256


class NonFiniteInputError(ValueError):
    """A value an encoder reads is NaN or +-inf (no code is defined for it).

    ``row`` and ``columns``: where :func:`encode` found it (the first such row and its
    non-finite read columns); None when raised elsewhere (the MADD layers say where in
    their input the value lies, in the message).
    """

    def __init__(self, message: str, row: int | None = None, columns: list[int] | None = None) -> None:
        super().__init__(message)
        self.row, self.columns = row, columns


def check_finite_reads(rows: torch.Tensor, columns: torch.Tensor) -> None:
    """Raise :class:`NonFiniteInputError` naming the first row of ``rows`` (N, D) whose value
    in one of ``columns`` (int64 column indices, any shape) is NaN/inf once cast to float32
    (what the encoders compute in). For the encoders whose kernels do not check as they read
    (the nearest-prototype encoders, the tree off the CPU); costs a pass over those columns
    and, off the CPU, a host synchronisation.
    """
    read = columns.reshape(-1).unique()
    finite = torch.isfinite(rows[:, read].float())
    if not bool(finite.all()):
        row = int((~finite).any(1).nonzero()[0])
        bad = read[~finite[row]].tolist()
        raise NonFiniteInputError(
            f"A contains NaN/inf in row {row}, column(s) {bad} read by the encoder", row, bad
        )


def encode(rows: torch.Tensor, split_dims: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Hash every row with every codebook's tree.

    Args:
        rows: (N, D) float, any strides. Column-major rows (``rows.T`` contiguous, as a
            1x1 convolution's NCHW activations are) are encoded without a copy, reading
            only the split columns.
        split_dims: (C, L) int64 global column indices.
        thresholds: (C, 2**L - 1) float32, heap order.

    Returns:
        (N, C) uint8 codes in ``[0, 2**L)``. CPU tensors go through numba kernels (for
        K = 16 one for row-major and one for column-major rows, see ``_lut_kernel``),
        others through :func:`encode_torch`; all give identical codes.

    Raises:
        NonFiniteInputError: (a ``ValueError``) a value the trees read is NaN or inf (the
            CPU kernels check these for free; other values of ``rows`` cannot change the
            codes). :func:`encode_torch` (other devices) does not check: reading the
            answer back would cost a host synchronisation.
    """
    if rows.device.type != "cpu" or thresholds.device.type != "cpu":
        return encode_torch(rows, split_dims, thresholds)
    _lut_kernel.launch_threads()
    values = _as_numpy_float32(rows)
    dims = np.ascontiguousarray(split_dims.numpy(), dtype=np.int64)
    nodes = np.ascontiguousarray(thresholds.detach().float().numpy())
    depth = dims.shape[1]
    row_stride, col_stride = values.strides
    if depth == 4 and values.shape[0] > 1 and row_stride == values.itemsize and col_stride != values.itemsize:
        codes, bad = _lut_kernel.encode_cols4(values.T, dims, nodes, _ENCODE_BLOCK)
    elif depth == 4 and col_stride == values.itemsize:
        codes, bad = _lut_kernel.encode_rows4(values, dims, nodes, _ENCODE_BLOCK)
    else:
        codes, bad = _lut_kernel.encode_any(values, dims, nodes, _ENCODE_BLOCK)
    if bad.any():
        start = int(np.argmax(bad)) * _ENCODE_BLOCK
        read = values[start : start + _ENCODE_BLOCK][:, np.unique(dims)]
        row = start + int(np.argmax(~np.isfinite(read).all(axis=1)))
        cols = sorted({int(j) for j in dims.reshape(-1) if not np.isfinite(values[row, j])})
        raise NonFiniteInputError(
            f"A contains NaN/inf in row {row}, column(s) {cols} read by the encoder", row, cols
        )
    return torch.from_numpy(codes)


def _as_numpy_float32(rows: torch.Tensor) -> np.ndarray:
    """A float32 numpy view of ``rows`` (a converted copy for other dtypes, strides kept)."""
    rows = rows.detach()
    if rows.dtype != torch.float32:
        rows = rows.float()  # preserves the layout of dense tensors
    return rows.numpy()


def encode_torch(rows: torch.Tensor, split_dims: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """:func:`encode` with tensor ops only (any device): 2*L gathers on (N, C) tensors."""
    ncodebooks, depth = split_dims.shape
    nnodes = thresholds.shape[1]
    rows = rows.float()
    flat_thresholds = thresholds.float().reshape(-1)
    codebook_base = torch.arange(ncodebooks, device=rows.device) * nnodes
    leaf = torch.zeros(rows.shape[0], ncodebooks, dtype=torch.int64, device=rows.device)
    for level in range(depth):
        values = rows.index_select(1, split_dims[:, level])
        node_thresholds = flat_thresholds[codebook_base + (2**level - 1) + leaf]
        leaf = 2 * leaf + (values > node_thresholds)
    return leaf.to(torch.uint8)


@dataclass
class TreeFit:
    """Result of learning one codebook's tree on its block of columns.

    Attributes:
        split_dims: (L,) int64 column indices *within the block*.
        thresholds: (2**L - 1,) float32, heap order.
        leaf_means: (2**L, width) float32 mean of the training rows in each leaf; an
            empty leaf holds the mean of its nearest non-empty ancestor.
        leaves: (N,) int64 leaf of each training row.
    """

    split_dims: torch.Tensor
    thresholds: torch.Tensor
    leaf_means: torch.Tensor
    leaves: torch.Tensor


def _bucket_onehot(buckets: torch.Tensor, nbuckets: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, N) one-hot of the rows' buckets (a transposed view)."""
    return torch.nn.functional.one_hot(buckets, nbuckets).to(dtype).T


def _bucket_stats(
    onehot: torch.Tensor, block: torch.Tensor, block_sq: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Row counts (B,), column sums (B, d) and, given ``block_sq = block * block``, column
    sums of squares (B, d) per bucket (else None), from :func:`_bucket_onehot`."""
    # A (B, N) one-hot product runs on BLAS; index_add_ is several times slower on CPU.
    counts = onehot.sum(1)
    return counts, onehot @ block, None if block_sq is None else onehot @ block_sq


def _best_splits_torch(
    column: torch.Tensor,
    block: torch.Tensor,
    row_sqnorm: torch.Tensor,
    buckets: torch.Tensor,
    counts: torch.Tensor,
    nbuckets: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best threshold on ``column`` for every bucket, all buckets at once.

    Sort rows by (bucket, value); prefix sums then give the summed SSE over all block
    columns of every (left, right) split in one pass.

    Returns:
        loss: (B,) summed child SSE of the best split per bucket (float64).
        lower, upper: (B,) sorted values on either side of the best split; ``upper`` is
            +inf when the best choice is to send every row left (no valid split).
    """
    n = column.shape[0]
    order = torch.argsort(column, stable=True)
    order = order[torch.argsort(buckets[order], stable=True)]
    sorted_values = column[order]
    sorted_buckets = buckets[order]

    csum = torch.cumsum(block[order], dim=0)  # (N, d)
    csq = torch.cumsum(row_sqnorm[order], dim=0)  # (N,)
    icounts = counts.long()
    ends = torch.cumsum(icounts, 0)  # exclusive end of each bucket in sorted order
    starts = ends - icounts
    zero_row = csum.new_zeros(1, csum.shape[1])
    csum_before = torch.cat([zero_row, csum])[starts]  # (B, d) prefix before each bucket
    csq_before = torch.cat([csq.new_zeros(1), csq])[starts]
    bucket_sum = torch.cat([zero_row, csum])[ends] - csum_before
    bucket_sq = torch.cat([csq.new_zeros(1), csq])[ends] - csq_before

    # Position p puts sorted rows [start, p] left and (p, end) right.
    left_n = (torch.arange(n, device=column.device) - starts[sorted_buckets] + 1).to(block.dtype)
    left_sum = csum - csum_before[sorted_buckets]
    left_sq = csq - csq_before[sorted_buckets]
    right_n = counts[sorted_buckets] - left_n
    right_sum = bucket_sum[sorted_buckets] - left_sum
    right_sq = bucket_sq[sorted_buckets] - left_sq
    left_sse = left_sq - (left_sum * left_sum).sum(1) / left_n
    right_sse = right_sq - (right_sum * right_sum).sum(1) / right_n.clamp_min(1)
    loss = left_sse + right_sse

    # A split is only possible between different values of the same bucket; the last row
    # of a bucket ("all rows left") is always allowed so every non-empty bucket has one.
    next_values = torch.cat([sorted_values[1:], sorted_values.new_full((1,), float("inf"))])
    next_buckets = torch.cat([sorted_buckets[1:], sorted_buckets.new_full((1,), -1)])
    last_of_bucket = next_buckets != sorted_buckets
    valid = last_of_bucket | (next_values > sorted_values)
    loss = torch.where(valid, loss, torch.full_like(loss, float("inf")))

    best_loss = torch.full((nbuckets,), float("inf"), dtype=loss.dtype, device=loss.device)
    best_loss = best_loss.scatter_reduce(0, sorted_buckets, loss, reduce="amin")
    is_best = loss == best_loss[sorted_buckets]
    positions = torch.where(is_best, torch.arange(n, device=column.device), n)
    best_pos = torch.full((nbuckets,), n, dtype=torch.int64, device=column.device)
    best_pos = best_pos.scatter_reduce(0, sorted_buckets, positions, reduce="amin")

    empty = icounts == 0
    best_pos = torch.where(empty, torch.zeros_like(best_pos), best_pos)
    best_loss = torch.where(empty, torch.zeros_like(best_loss), best_loss)
    lower = sorted_values[best_pos]
    upper = torch.where(last_of_bucket[best_pos], torch.full_like(lower, float("inf")), next_values[best_pos])
    return best_loss, lower, upper


def split_thresholds(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """float32 thresholds ``v`` with ``lower <= v < upper`` (so ``x > v`` separates them).

    The midpoint is rounded to float32; when rounding lands on ``upper`` (neighbouring
    floats) ``lower`` itself is used, which still separates the two values.
    """
    lower32, upper32 = lower.float(), upper.float()
    mid = (lower32 + (upper32 - lower32) / 2).float()
    mid = torch.where(torch.isfinite(upper32), mid, lower32)
    return torch.where(mid >= upper32, lower32, mid)


BACKENDS = ("auto", "numba", "torch")


class _SplitSearch:
    """Best threshold per bucket on every candidate column of a level (numba kernel on
    CPU, tensor ops elsewhere), with each column's sort order kept across levels."""

    def __init__(
        self,
        block: torch.Tensor,
        loss_source: torch.Tensor,
        loss_mean: torch.Tensor,
        loss_values: torch.Tensor,
        use_numba: bool,
    ) -> None:
        """``loss_values = loss_source.double() - loss_mean``: the centred rows whose SSE
        the splits minimise."""
        self.block, self.loss_values, self.use_numba = block, loss_values, use_numba
        self.value_orders: dict[int, np.ndarray] = {}
        if use_numba:
            _lut_kernel.launch_threads()
            self.block_np = block.numpy()
            self.source_np = np.ascontiguousarray(loss_source.numpy())
            self.mean_np = np.ascontiguousarray(loss_mean.numpy())
            self.row_sq = _split_kernel.row_sqnorms(np.ascontiguousarray(loss_values.numpy()))
        else:
            self.row_sqnorm = (loss_values * loss_values).sum(1)

    def splits(
        self, cols: list[int], buckets: torch.Tensor, counts: torch.Tensor, nbuckets: int
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(loss (B,), lower (B,), upper (B,)) per column of ``cols``, as
        :func:`_best_splits_torch` returns them."""
        if not self.use_numba:
            return [
                _best_splits_torch(
                    self.block[:, col], self.loss_values, self.row_sqnorm, buckets, counts, nbuckets
                )
                for col in cols
            ]
        values = np.ascontiguousarray(self.block_np[:, cols].T)
        new = [k for k, col in enumerate(cols) if col not in self.value_orders]
        if new:
            for k, order in zip(new, _split_kernel.stable_argsort(values[new]), strict=True):
                self.value_orders[cols[k]] = order
        orders = np.stack([self.value_orders[col] for col in cols])
        buckets_np = buckets.numpy()
        bucket_sq = np.bincount(buckets_np, weights=self.row_sq, minlength=nbuckets)
        loss, lower, upper = _split_kernel.best_splits_level(
            values, orders, self.source_np, self.mean_np, self.row_sq, bucket_sq, buckets_np, nbuckets
        )
        return [
            (torch.from_numpy(loss[k]), torch.from_numpy(lower[k]), torch.from_numpy(upper[k]))
            for k in range(len(cols))
        ]


def learn_tree(
    block: torch.Tensor,
    depth: int,
    ncandidates: int = 4,
    backend: str = "auto",
    targets: torch.Tensor | None = None,
    split_columns: torch.Tensor | None = None,
) -> TreeFit:
    """Learn one codebook's tree greedily, level by level (MADDness, Blalock & Guttag 2021).

    At each level, the ``ncandidates`` columns with the largest within-bucket SSE are
    tried; for each, every bucket gets the threshold that minimises the SSE of its two
    children summed over all block columns; the column with the lowest total wins.

    Args:
        block: (N, d) float32 rows restricted to this codebook's columns.
        depth: tree depth L (K = 2**L leaves).
        ncandidates: columns tried per level.
        backend: "numba" (CPU kernel), "torch" (vectorised tensor ops on any device), or
            "auto": numba for CPU tensors, torch elsewhere. Both compute the same splits;
            they can differ only where two splits' losses tie to rounding.
        targets: (N, t) values whose within-bucket SSE the thresholds minimise instead of
            the block's own (e.g. the block's contribution to the output, ``block @ B_block``:
            output-aware hashing). Split candidates are still the block's columns.
        split_columns: (N, d') float32 columns the splits may compare instead of the
            block's own (channel steering, :class:`~maddnet.amm.encoders.TreeEncoder`'s
            ``channel_budget``): candidates are ranked by their own within-bucket SSE, the
            thresholds still minimise the block's (or ``targets``') SSE, and
            ``TreeFit.split_dims`` index these columns. None: the block's columns.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    use_numba = backend == "numba" or (backend == "auto" and block.device.type == "cpu")
    if use_numba and block.device.type != "cpu":
        raise ValueError(f"the numba backend needs CPU tensors, got {block.device}; use 'torch'")
    nrows, width = block.shape
    block = block.float()
    block64 = block.double()
    block_mean = block64.mean(0)
    centred = block64 - block_mean  # less cancellation in the sums
    centred_sq = centred * centred
    if split_columns is None:
        candidate_block, candidate_centred, candidate_sq = block, centred, centred_sq
    else:
        if split_columns.shape[0] != nrows or split_columns.dim() != 2 or split_columns.shape[1] < 1:
            raise ValueError(f"split_columns must be ({nrows}, d' >= 1), got {tuple(split_columns.shape)}")
        candidate_block = split_columns.float()
        candidate_centred = candidate_block.double() - candidate_block.double().mean(0)
        candidate_sq = candidate_centred * candidate_centred
    if targets is not None:
        if targets.shape[0] != nrows:
            raise ValueError(f"targets has {targets.shape[0]} rows, the block {nrows}")
        targets_mean = targets.double().mean(0)
        search = _SplitSearch(
            candidate_block, targets, targets_mean, targets.double() - targets_mean, use_numba
        )
    else:
        search = _SplitSearch(candidate_block, block, block_mean, centred, use_numba)
    buckets = torch.zeros(nrows, dtype=torch.int64, device=block.device)
    split_dims = torch.zeros(depth, dtype=torch.int64, device=block.device)
    thresholds = torch.zeros(2**depth - 1, dtype=torch.float32, device=block.device)
    means = block64.mean(0, keepdim=True)  # (1, d) root mean

    onehot = _bucket_onehot(buckets, 1, centred.dtype)
    for level in range(depth):
        nbuckets = 2**level
        counts, sums, sumsq = _bucket_stats(onehot, candidate_centred, candidate_sq)
        column_sse = (sumsq - sums * sums / counts.clamp_min(1)[:, None]).sum(0)
        candidates = torch.topk(column_sse, min(ncandidates, candidate_block.shape[1])).indices.tolist()
        best = None
        for col, (loss, lower, upper) in zip(
            candidates, search.splits(candidates, buckets, counts, nbuckets), strict=True
        ):
            total = float(loss.sum())
            if best is None or total < best[0]:
                best = (total, col, lower, upper)
        _, col, lower, upper = best
        level_thresholds = split_thresholds(lower, upper)
        split_dims[level] = col
        thresholds[nbuckets - 1 : 2 * nbuckets - 1] = level_thresholds
        # Route rows with the float32 comparison that encode() uses, so the training
        # partition is exactly the one inference will see.
        buckets = 2 * buckets + (candidate_block[:, col] > level_thresholds[buckets]).long()

        onehot = _bucket_onehot(buckets, 2 * nbuckets, centred.dtype)  # also the next level's
        child_counts, child_sums, _ = _bucket_stats(onehot, block64)
        parent_means = means.repeat_interleave(2, dim=0)
        child_means = child_sums / child_counts.clamp_min(1)[:, None]
        means = torch.where(child_counts[:, None] > 0, child_means, parent_means)

    return TreeFit(split_dims, thresholds, means.float(), buckets)
