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

from .. import hashing
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
    ) -> None:
        super().__init__(ncodebooks, nprototypes, ridge)
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
        }

    # ------------------------------------------------------------------ learning
    def fit(self, rows: torch.Tensor, weight: torch.Tensor | None = None) -> TreeEncoder:
        if self.hash_objective == "output" and weight is None:
            raise ValueError('hash_objective="output" needs the weight: fit_encoder(A_train, B)')
        return super().fit(rows, weight)

    def _fit_codes(
        self, rows: torch.Tensor, weight: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ndims = rows.shape[1]
        bounds = hashing.subspace_bounds(ndims, self.ncodebooks)
        output_aware = self.hash_objective == "output"
        trees = [
            hashing.learn_tree(
                rows[:, start:stop],
                self.depth,
                self.ncandidates,
                targets=rows[:, start:stop] @ weight[start:stop] if output_aware else None,
            )
            for start, stop in bounds
        ]
        starts = torch.tensor([start for start, _ in bounds], device=rows.device)
        self.split_dims_ = torch.stack([t.split_dims for t in trees]) + starts[:, None]
        self.thresholds_ = torch.stack([t.thresholds for t in trees])
        initial = prototype_fit.leaf_mean_prototypes([t.leaf_means for t in trees], bounds, ndims)
        return torch.stack([t.leaves for t in trees], dim=1), initial

    # ------------------------------------------------------------------ inference
    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        """(N, C) uint8 codes (:func:`maddnet.amm.hashing.encode`: numba on CPU)."""
        self.require_fitted()
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
