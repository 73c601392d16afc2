"""``GlobalTreeEncoder``: hash trees whose split columns come from anywhere in the row.

The MADDness tree (:class:`~maddnet.amm.encoders.tree.TreeEncoder`) gives codebook c the
c-th contiguous block of D/C columns and splits only on those. Here every codebook may
split on any of the D columns, and the trees are learned greedily, codebook after
codebook, each on the residual the previous ones left (the additive-quantisation /
residual-VQ idea of Babenko & Lempitsky, CVPR 2014 and Juang & Gray 1982, applied to the
MADDness trees of Blalock & Guttag, ICML 2021). The hardware is the tree's: L = log2 K
compares and L input reads per codebook and row, one split column per tree level.

Learning codebook c:

1. residual ``R = A - sum_{c' < c} P0[c', code_c'(A)]`` (input residual, (N, D)); the
   split objective is the SSE of ``R`` ("input") or of ``R @ B`` ("output", the product
   residual), projected on its top ``ntargets`` principal directions (the SSE of a
   projection on the leading directions is most of the SSE, and the split search costs
   linearly in the width of the targets);
2. candidate columns: the gain of the best single split of every column on the targets
   is computed at once (sort, cumulative sums; a row subsample), the ``ncandidates`` best
   are kept;
3. the tree: :func:`maddnet.amm.hashing.learn_tree` over those columns (one column per
   level, a threshold per node, MADDness's exact search), against the targets;
4. its leaf means of ``R`` become ``P0[c]``.

``refine_sweeps`` > 0 then runs backfitting sweeps (block coordinate descent on the
output error): each codebook's tree is re-learned against the residual that all the
*other* codebooks leave, and after every sweep the prototypes are re-solved jointly
(ridge regression). The final prototypes are always the joint ridge solution
(:func:`maddnet.amm.prototypes.ridge_prototypes`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .. import hashing
from .. import prototypes as prototype_fit
from .base import register_encoder
from .tree import TreeEncoder, product_basis

# rows of the subsample on which every column's best single split is scored
_SCREEN_ROWS = 1024
# column chunk of that screen: bounds its (rows, columns, targets) cumulative sums
_SCREEN_CHUNK = 64


def principal_targets(values: torch.Tensor, ntargets: int) -> torch.Tensor:
    """``values`` (N, W) centred and projected on its top ``ntargets`` principal directions:
    (N, min(W, ntargets)) float64. The SSE of the projection of any bucket's rows is at
    most theirs, and equals it when W <= ntargets."""
    centred = values.double() - values.double().mean(0)
    if centred.shape[1] <= ntargets:
        return centred
    _, vectors = torch.linalg.eigh(centred.T @ centred)
    return centred @ vectors[:, -ntargets:]


def best_split_gains(columns: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """For every column, the largest SSE reduction of ``targets`` by one threshold on it.

    Args:
        columns: (N, D) float candidate split columns.
        targets: (N, t) float64 centred targets.

    Returns:
        (D,) float64 gains ``max_i |S_i|^2 (1/i + 1/(N-i))`` over split positions i between
        distinct sorted values, S_i the sum of the targets of the i smallest rows (0 where
        a column is constant).
    """
    nrows = columns.shape[0]
    gains = torch.zeros(columns.shape[1], dtype=torch.float64, device=columns.device)
    if nrows < 2:
        return gains
    left = torch.arange(1, nrows, dtype=torch.float64, device=columns.device)
    weights = 1.0 / left + 1.0 / (nrows - left)  # (N-1,)
    for start in range(0, columns.shape[1], _SCREEN_CHUNK):
        chunk = columns[:, start : start + _SCREEN_CHUNK]
        values, order = torch.sort(chunk, dim=0)
        sums = targets[order].cumsum(0)[:-1]  # (N-1, w, t): targets of the i smallest rows
        gain = sums.square().sum(-1) * weights[:, None]
        gain = torch.where(values[1:] > values[:-1], gain, 0.0)  # only between distinct values
        gains[start : start + chunk.shape[1]] = gain.amax(0)
    return gains


@register_encoder
class GlobalTreeEncoder(TreeEncoder):
    """Hash trees over the whole row, learned on the residual, codebook after codebook.

    Same encoding, state, cost and torch form as :class:`TreeEncoder` (``split_dims_``
    (C, L) are global column indices, so ``read_columns`` is what the hardware reads);
    only the learning differs (see the module docstring).

    Args:
        ncodebooks, nprototypes, ridge: see :class:`~maddnet.amm.encoders.base.Encoder`.
        ncandidates: columns kept by the screen for each codebook's tree (from all D).
        hash_objective: "input": the splits minimise the SSE of the input residual;
            "output": of the product residual ``R @ B`` (needs the weight in ``fit``).
        ntargets: principal directions of the residual the split objective keeps.
        refine_sweeps: backfitting sweeps after the greedy pass (0: none).
        with_block: the columns of codebook c's MADDness block are candidates of its tree
            besides the screened ones (False: only the ``ncandidates`` screened columns).
        seed: seed of the screen's row subsample.

    Raises ``ValueError`` (naming the encoder and the reason) for too few rows, non-finite
    rows, or rows whose every column is constant.
    """

    name: ClassVar[str] = "tree-global"

    def __init__(
        self,
        ncodebooks: int,
        nprototypes: int = 16,
        ridge: float | None = 1.0,
        ncandidates: int = 16,
        hash_objective: str = "output",
        ntargets: int = 16,
        refine_sweeps: int = 0,
        with_block: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(ncodebooks, nprototypes, ridge, ncandidates, hash_objective)
        for label, value, low in (("ntargets", ntargets, 1), ("refine_sweeps", refine_sweeps, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"tree-global: {label} must be an int >= {low}, got {value!r}")
        self.ntargets = ntargets
        self.refine_sweeps = refine_sweeps
        if not isinstance(with_block, bool):
            raise ValueError(f"tree-global: with_block must be a bool, got {with_block!r}")
        self.with_block = with_block
        self.seed = int(seed)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "ntargets": self.ntargets,
            "refine_sweeps": self.refine_sweeps,
            "with_block": self.with_block,
            "seed": self.seed,
        }

    # ------------------------------------------------------------------ learning
    def _targets(self, residual: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """``weight``: the fit's :func:`~maddnet.amm.encoders.tree.product_basis` of B (the
        product on min(D, M) columns: the same SSEs and principal directions up to a
        rotation, so the same targets), made once per fit by :meth:`_fit_codes`."""
        values = residual @ weight.double() if self.hash_objective == "output" else residual
        return principal_targets(values, self.ntargets)

    def _learn_one(
        self,
        rows: torch.Tensor,
        residual: torch.Tensor,
        weight: torch.Tensor | None,
        screen: torch.Tensor,
        block: tuple[int, int] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One codebook's tree on ``residual`` (N, D) float64: (split columns (L,),
        thresholds (K-1,), leaves (N,), leaf means of the residual (K, D) float64)."""
        targets = self._targets(residual, weight)
        gains = best_split_gains(rows[screen], targets[screen])
        candidates = torch.topk(gains, min(self.ncandidates, rows.shape[1])).indices
        if block is not None:  # the MADDness block's columns are always candidates
            candidates = torch.unique(torch.cat([torch.arange(*block, device=rows.device), candidates]))
        ncand = candidates.numel()
        fit = hashing.learn_tree(rows[:, candidates], self.depth, ncand, targets=targets)
        counts = torch.bincount(fit.leaves, minlength=self.nprototypes).double()
        sums = torch.zeros(self.nprototypes, rows.shape[1], dtype=torch.float64, device=rows.device)
        sums.index_add_(0, fit.leaves, residual)
        # an empty leaf adds nothing (its rows, if any appear later, keep the residual)
        means = sums / counts.clamp_min(1)[:, None]
        return candidates[fit.split_dims], fit.thresholds, fit.leaves, means

    def _fit_codes(
        self, rows: torch.Tensor, weight: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if weight is not None and self.hash_objective == "output":
            weight = product_basis(weight)  # once per fit, not per tree
        nrows, ndims = rows.shape
        rows = rows.float()
        gen = torch.Generator().manual_seed(self.seed)
        screen = torch.randperm(nrows, generator=gen)[: min(nrows, _SCREEN_ROWS)].to(rows.device)
        depth, size = self.depth, self.nprototypes
        split_dims = torch.zeros(self.ncodebooks, depth, dtype=torch.int64, device=rows.device)
        thresholds = torch.zeros(self.ncodebooks, size - 1, dtype=torch.float32, device=rows.device)
        codes = torch.zeros(nrows, self.ncodebooks, dtype=torch.int64, device=rows.device)
        initial = torch.zeros(self.ncodebooks, size, ndims, dtype=torch.float64, device=rows.device)
        residual = rows.double().clone()
        bounds = hashing.subspace_bounds(ndims, self.ncodebooks)
        for c in range(self.ncodebooks):
            split_dims[c], thresholds[c], codes[:, c], initial[c] = self._learn_one(
                rows, residual, weight, screen, bounds[c] if self.with_block else None
            )
            residual -= initial[c][codes[:, c]]
        for _ in range(self.refine_sweeps):
            for c in range(self.ncodebooks):
                residual += initial[c][codes[:, c]]  # the residual of all the other codebooks
                split_dims[c], thresholds[c], codes[:, c], initial[c] = self._learn_one(
                    rows, residual, weight, screen, bounds[c] if self.with_block else None
                )
                residual -= initial[c][codes[:, c]]
            if self.ridge is not None:  # the jointly re-solved prototypes define the next residual
                initial = prototype_fit.ridge_prototypes(rows, codes, initial.float(), self.ridge).double()
                residual = rows.double() - _reconstruct(initial, codes)
        self.split_dims_, self.thresholds_ = split_dims, thresholds
        return codes.to(torch.uint8), initial.float()


def _reconstruct(prototypes: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """sum_c prototypes[c, codes[:, c]]: (N, D)."""
    return sum(prototypes[c][codes[:, c].long()] for c in range(prototypes.shape[0]))
