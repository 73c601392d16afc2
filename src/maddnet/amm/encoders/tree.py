"""``TreeEncoder``: the MADDness hash, one balanced binary regression tree per codebook.

Blalock & Guttag, "Multiplying Matrices Without Multiplying", ICML 2021, Algorithm 1-2:
the D columns are split into C contiguous blocks; each block gets a tree of depth
L = log2 K with one split column per level and one threshold per node (heap order, see
:mod:`maddnet.amm.hashing`), learned greedily level by level. Encoding a row costs L
compares and L input reads per codebook, no multiply.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .. import hashing, tree_refine
from .. import prototypes as prototype_fit
from .base import Encoder, EncoderCost, register_encoder

HASH_OBJECTIVES = ("input", "output")


@register_encoder
class TreeEncoder(Encoder):
    """The MADDness hash trees.

    Args:
        ncodebooks, nprototypes, ridge: see :class:`~maddnet.amm.encoders.base.Encoder`.
        ncandidates: columns tried per tree level when learning.
        hash_objective: "input": thresholds minimise the SSE of the rows' block columns
            (MADDness); "output": they minimise the SSE of the block's contribution to the
            product, ``A_block @ B_block`` (needs the weight in :meth:`fit`).
        channel_budget: None (every column may be split on), or the input channels the
            trees may read: a float in (0, 1] (that fraction of the channels, rounded, at
            least one) or an int >= 1 (that many). See :func:`steering_columns`.
        channel_size: input columns per channel, consecutive (a conv's kh kw taps of one
            input channel in unfold order; 1 for a linear layer). D must be a multiple.
        refine_sweeps: sweeps of coordinate descent on the split columns and thresholds
            after the greedy pass, against the table solved for the codes
            (:mod:`maddnet.amm.tree_refine`): the product's error for
            ``hash_objective="output"``, the rows' reconstruction error for "input".
            0 (default): MADDness's trees unchanged. Same hardware cost either way.

    Fitted attributes: ``split_dims_`` (C, L) int64 global column indices,
    ``thresholds_`` (C, K-1) float32 heap order, ``prototypes_`` (C, K, D) float32.
    """

    name: ClassVar[str] = "tree"
    STATE: ClassVar[tuple[str, ...]] = ("split_dims_", "thresholds_", "prototypes_")

    def __init__(
        self,
        ncodebooks: int,
        nprototypes: int = 16,
        ridge: float | None = 1.0,
        ncandidates: int = 8,
        hash_objective: str = "input",
        channel_budget: float | int | None = None,
        channel_size: int = 1,
        refine_sweeps: int = 0,
    ) -> None:
        super().__init__(ncodebooks, nprototypes, ridge)
        if isinstance(refine_sweeps, bool) or not isinstance(refine_sweeps, int) or refine_sweeps < 0:
            raise ValueError(f"tree: refine_sweeps must be an int >= 0, got {refine_sweeps!r}")
        self.refine_sweeps = refine_sweeps
        check_channel_budget(channel_budget)
        if isinstance(channel_size, bool) or not isinstance(channel_size, int) or channel_size < 1:
            raise ValueError(f"channel_size must be a positive int, got {channel_size!r}")
        self.channel_budget, self.channel_size = channel_budget, channel_size
        if isinstance(ncandidates, bool) or not isinstance(ncandidates, int) or ncandidates < 1:
            raise ValueError(f"ncandidates must be a positive int, got {ncandidates!r}")
        if hash_objective not in HASH_OBJECTIVES:
            raise ValueError(f"hash_objective must be one of {HASH_OBJECTIVES}, got {hash_objective!r}")
        self.ncandidates = ncandidates
        self.hash_objective = hash_objective
        self.split_dims_: torch.Tensor | None = None
        self.thresholds_: torch.Tensor | None = None

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "ncandidates": self.ncandidates,
            "hash_objective": self.hash_objective,
            **({} if self.channel_budget is None else {"channel_budget": self.channel_budget}),
            **({} if self.channel_size == 1 else {"channel_size": self.channel_size}),
            **({"refine_sweeps": self.refine_sweeps} if self.refine_sweeps else {}),
        }

    # ------------------------------------------------------------------ learning
    def fit_codes(self, rows: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        if self.hash_objective == "output" and weight is None:
            raise ValueError('hash_objective="output" needs the weight: fit_encoder(A_train, B)')
        if self.channel_budget is not None and weight is None:
            raise ValueError(
                "channel_budget ranks channels by their output contribution: it needs the weight B"
            )
        return super().fit_codes(rows, weight)

    def _fit_codes(
        self, rows: torch.Tensor, weight: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ndims = rows.shape[1]
        bounds = hashing.subspace_bounds(ndims, self.ncodebooks)
        output_aware = self.hash_objective == "output"
        steering = None
        if self.channel_budget is not None:
            steering = steering_columns(rows, weight, bounds, self.channel_budget, self.channel_size)
        trees, split_dims = [], []
        for index, (start, stop) in enumerate(bounds):
            targets = rows[:, start:stop] @ product_basis(weight[start:stop]) if output_aware else None
            columns = None if steering is None else steering[index]
            tree = hashing.learn_tree(
                rows[:, start:stop],
                self.depth,
                self.ncandidates,
                targets=targets,
                split_columns=None if columns is None else rows[:, columns],
            )
            trees.append(tree)
            split_dims.append(tree.split_dims + start if columns is None else columns[tree.split_dims])
        self.split_dims_ = torch.stack(split_dims)
        self.thresholds_ = torch.stack([t.thresholds for t in trees])
        initial = prototype_fit.leaf_mean_prototypes([t.leaf_means for t in trees], bounds, ndims)
        codes = torch.stack([t.leaves for t in trees], dim=1)
        if self.refine_sweeps:
            candidates = [
                torch.arange(start, stop, device=rows.device) if columns is None else columns
                for (start, stop), columns in zip(bounds, steering or [None] * len(bounds), strict=True)
            ]
            codes, initial = self._refine(rows, weight, bounds, candidates, initial)
        return codes, initial

    def _refine(
        self,
        rows: torch.Tensor,
        weight: torch.Tensor | None,
        bounds: list[tuple[int, int]],
        candidates: list[torch.Tensor],
        initial: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``refine_sweeps`` of :func:`maddnet.amm.tree_refine.refine_trees`; sets the new
        state and returns the codes (N, C) and the block leaf means of those codes."""
        output_aware = self.hash_objective == "output"
        rows = rows.float()
        if output_aware:
            # the product's errors and tables on min(D, M) columns: the same losses, so the
            # same refinement, up to rounding (product_basis)
            weight = product_basis(weight)
        targets = rows.double() @ weight.double() if output_aware else rows.double()

        def solve_tables(codes: torch.Tensor) -> torch.Tensor:
            prior = prototype_fit.block_leaf_means(rows, codes, bounds, initial)
            if self.ridge is None:
                return (prior @ weight.float() if output_aware else prior).double()
            if output_aware:
                return prototype_fit.ridge_lut(rows, codes, prior, self.ridge, weight).double()
            return prototype_fit.ridge_prototypes(rows, codes, prior, self.ridge).double()

        self.split_dims_, self.thresholds_, codes = tree_refine.refine_trees(
            rows, self.split_dims_, self.thresholds_, targets, solve_tables, candidates, self.refine_sweeps
        )
        return codes, prototype_fit.block_leaf_means(rows, codes, bounds, initial)

    # ------------------------------------------------------------------ inference
    def _encode(self, rows: torch.Tensor) -> torch.Tensor:
        """(N, C) uint8 codes (:func:`maddnet.amm.hashing.encode`: numba on CPU; it refuses
        NaN/inf in the columns the trees read; off the CPU it is checked here)."""
        if rows.device.type != "cpu":
            hashing.check_finite_reads(rows, self.split_dims_)
        return hashing.encode(rows, self.split_dims_, self.thresholds_)

    @property
    def read_columns(self) -> torch.Tensor:
        """(C, L): the split column of each level (one input value read per level)."""
        self.require_fitted()
        return self.split_dims_

    def cost(self) -> EncoderCost:
        return tree_cost(self.ncodebooks, self.depth)


def tree_cost(ncodebooks: int, depth: int) -> EncoderCost:
    """Per row: L compares and L input reads per codebook (4 C each for K = 16), no add or
    multiply."""
    reads = ncodebooks * depth
    return EncoderCost(compares=reads, reads=reads)


def check_channel_budget(budget: object, owner: str = "channel_budget") -> None:
    """Raise ``ValueError`` naming ``owner`` unless ``budget`` is None, a float in (0, 1]
    or an int >= 1 (bools refused)."""
    if budget is None:
        return
    if isinstance(budget, bool) or not isinstance(budget, int | float):
        raise ValueError(
            f"{owner} must be None, a fraction in (0, 1] or a channel count >= 1, got {budget!r}"
        )
    if isinstance(budget, float) and not 0 < budget <= 1:
        raise ValueError(f"{owner} as a fraction must lie in (0, 1], got {budget!r}")
    if isinstance(budget, int) and budget < 1:
        raise ValueError(f"{owner} as a channel count must be >= 1, got {budget!r}")


def channel_scores(rows: torch.Tensor, weight: torch.Tensor, channel_size: int) -> torch.Tensor:
    """(D / channel_size,) float64: ``||A_c B_c||_F``, each input channel's contribution to
    the product on the rows ``A`` (N, D) with weight ``B`` (D, M).

    The product is the sum of the channels' terms ``A_c B_c``; He, Zhang & Sun, "Channel
    Pruning for Accelerating Very Deep Neural Networks", ICCV 2017, select the channels
    that best reconstruct it (LASSO). Here the channels are ranked by the size of their
    own term, computed exactly without forming it: ``||A_c B_c||_F^2 = sum(G_c * H_c)``
    with the Gram matrices ``G_c = A_c^T A_c`` and ``H_c = B_c B_c^T`` (s x s each).
    """
    nrows, ndims = rows.shape
    nchannels = ndims // channel_size
    per_channel = rows.double().reshape(nrows, nchannels, channel_size)
    gram = torch.einsum("nci,ncj->cij", per_channel, per_channel)
    blocks = weight.double().reshape(nchannels, channel_size, -1)
    return (gram * (blocks @ blocks.transpose(1, 2))).sum((1, 2)).clamp_min(0).sqrt()


def steering_columns(
    rows: torch.Tensor,
    weight: torch.Tensor,
    bounds: list[tuple[int, int]],
    budget: float | int,
    channel_size: int,
) -> list[torch.Tensor | None]:
    """Per codebook, the global columns its tree may split on under a channel budget.

    The allowed channels are the ``budget`` channels with the largest
    :func:`channel_scores`, chosen once from the calibration rows. A codebook whose block
    holds allowed columns splits on those (None when its whole block is allowed: the
    unrestricted tree). A block holding none would otherwise have nothing to read and
    degenerate to one constant code; it splits instead on the ``width`` allowed columns
    (``width`` = the block's) that best explain it linearly: the largest
    ``sum_k cov(a_j, x_k)^2 / var(a_j)`` over its columns ``x_k`` (the variance a
    least-squares fit on column ``a_j`` alone removes). Every tree keeps L levels: L
    compares and L reads per codebook and row, as without a budget.

    Args:
        rows: (N, D) float rows; weight: (D, M) float; bounds: the codebooks' blocks.
        budget: a fraction in (0, 1] or a channel count (see :func:`check_channel_budget`).
        channel_size: consecutive columns per channel.

    Returns:
        One (d',) int64 tensor of global column indices (or None) per codebook.

    Raises:
        ValueError: D not a multiple of ``channel_size``.
    """
    check_channel_budget(budget)
    ndims = rows.shape[1]
    if ndims % channel_size:
        raise ValueError(f"D = {ndims} input columns are not whole channels of {channel_size} columns")
    nchannels = ndims // channel_size
    # a count at or above the channels allows them all (e.g. a network-wide 64 on a 1-channel stem)
    count = max(1, round(budget * nchannels)) if isinstance(budget, float) else min(budget, nchannels)
    allowed = torch.zeros(nchannels, dtype=torch.bool, device=rows.device)
    allowed[torch.topk(channel_scores(rows, weight, channel_size), count).indices] = True
    column_allowed = allowed.repeat_interleave(channel_size)
    allowed_columns = column_allowed.nonzero().flatten()
    centred = rows.double() - rows.double().mean(0)
    candidates = centred[:, allowed_columns]
    candidate_sq = (candidates * candidates).sum(0).clamp_min(1e-300)
    result: list[torch.Tensor | None] = []
    for start, stop in bounds:
        inside = column_allowed[start:stop]
        if inside.all():
            result.append(None)
        elif inside.any():
            result.append(inside.nonzero().flatten() + start)
        else:
            cov = candidates.T @ centred[:, start:stop]  # (allowed, width), times N
            explained = (cov * cov).sum(1) / candidate_sq
            nearest = torch.topk(explained, min(stop - start, allowed_columns.numel())).indices
            result.append(allowed_columns[nearest.sort().values])
    return result


def product_basis(weight: torch.Tensor) -> torch.Tensor:
    """A (D, r) stand-in for the weight B (D, M) in the output objective's losses, r = min(D, M).

    With the thin SVD ``B = U S V^T``, ``||x B|| = ||x U S||`` for every row x, because V's
    columns are orthonormal. Every loss the output objective computes is a sum of such
    norms (a split's SSE of ``A_block B_block``, a row's error against a table fitted to
    ``A B``, which is ``P B`` and so has the same V), so ``U S`` gives the same losses on r
    columns instead of M: a block of w = 8 columns of a 1,024-output layer costs 128x less.
    Returns B itself where M <= D (no saving); float64 SVD, result in B's dtype.
    """
    if weight.shape[1] <= weight.shape[0]:
        return weight
    u, s, _ = torch.linalg.svd(weight.double(), full_matrices=False)
    return (u * s).to(weight.dtype)
