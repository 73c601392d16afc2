"""Nearest-prototype encoders: product quantisation under L2, L1 and L-infinity.

Codebook c's code for a row is the index of the nearest of K centroids of the row's c-th
block of columns (the contiguous blocks of :func:`maddnet.amm.hashing.subspace_bounds`).
Under L2 this is product quantisation (Jégou, Douze & Schmid, TPAMI 2011), the encoder of
Bolt / the PQ baselines in Blalock & Guttag (ICML 2021): it needs multiplies, and is the
accuracy upper bound of the block encoders. L1 (the distance of AdderNet, Chen et al.,
CVPR 2020, and of multiplier-free PQ-DNN work) and L-infinity need only adds and
compares.

Centroids are learned by Lloyd iterations under the metric (k-means++ seeding with the
same metric): the centre update is the mean for L2, the coordinate-wise median for L1
(k-medians, the L1 minimiser) and the mean for L-infinity (its exact minimiser, the
midrange, follows single outliers). The prototypes the LUT is built from are the
centroids placed in their block (zero elsewhere), then re-solved jointly by the ridge
regression of :class:`~maddnet.amm.encoders.base.Encoder`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .. import hashing
from .base import Encoder, EncoderCost, register_encoder

METRICS = ("l2", "l1", "linf")
# rows per chunk of the (rows, C, K, W) distance tensor
_DISTANCE_CHUNK = 2048


def block_columns(ndims: int, ncodebooks: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(C, W) int64 columns of each codebook's block, W the widest block; a narrower block
    repeats its last column (the padding is masked out of every distance)."""
    bounds = hashing.subspace_bounds(ndims, ncodebooks)
    width = max(stop - start for start, stop in bounds)
    index = torch.arange(width, device=device)
    starts = torch.tensor([start for start, _ in bounds], device=device)
    stops = torch.tensor([stop for _, stop in bounds], device=device)
    return torch.minimum(starts[:, None] + index, stops[:, None] - 1)


def block_mask(columns: torch.Tensor) -> torch.Tensor:
    """(C, W) bool: True where ``columns`` (from :func:`block_columns`) is not padding."""
    first_repeat = torch.ones_like(columns, dtype=torch.bool)
    first_repeat[:, 1:] = columns[:, 1:] != columns[:, :-1]
    return first_repeat


def distances(values: torch.Tensor, centroids: torch.Tensor, mask: torch.Tensor, metric: str) -> torch.Tensor:
    """Distances of gathered values (N, C, W) to centroids (C, K, W) under ``metric``,
    padding columns (``mask`` False) ignored: (N, C, K)."""
    diff = (values[:, :, None, :] - centroids[None]) * mask[None, :, None, :]
    if metric == "l2":
        return diff.square().sum(-1)
    if metric == "l1":
        return diff.abs().sum(-1)
    if metric == "linf":
        return diff.abs().amax(-1)
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def nearest_codes(
    values: torch.Tensor, centroids: torch.Tensor, mask: torch.Tensor, metric: str
) -> torch.Tensor:
    """(N, C) int64 index of the nearest centroid, in row chunks (``torch.cdist``, whose
    L2 distances may differ from :func:`distances` by rounding)."""
    norm = {"l2": 2.0, "l1": 1.0, "linf": float("inf")}[metric]
    masked = (centroids * mask[:, None, :]).float()
    parts = [
        torch.cdist((chunk * mask).float().transpose(0, 1), masked, p=norm).argmin(-1).T
        for chunk in values.split(_DISTANCE_CHUNK)
    ]
    return torch.cat(parts) if parts else values.new_zeros(0, centroids.shape[0], dtype=torch.int64)


class NearestPrototypeEncoder(Encoder):
    """Nearest of K centroids per block of columns, under ``metric`` (see module docstring).

    Args:
        ncodebooks, nprototypes, ridge: see :class:`~maddnet.amm.encoders.base.Encoder`.
        iterations: Lloyd iterations after the k-means++ seeding.
        max_rows: rows (a seeded subsample) the centroids are learned from.
        seed: seed of the subsample and the seeding.

    Fitted attributes: ``centroids_`` (C, K, W) float32 (W the widest block; padding
    columns are ignored), ``prototypes_`` (C, K, D).

    Raises ``ValueError`` naming the encoder and the reason for too few rows, non-finite
    rows, or a block with fewer than K distinct rows (constant data included).
    """

    metric: ClassVar[str] = "l2"
    STATE: ClassVar[tuple[str, ...]] = ("centroids_", "prototypes_")

    def __init__(
        self,
        ncodebooks: int,
        nprototypes: int = 16,
        ridge: float | None = 1.0,
        iterations: int = 10,
        max_rows: int = 20000,
        seed: int = 0,
    ) -> None:
        super().__init__(ncodebooks, nprototypes, ridge)
        for label, value, low in (("iterations", iterations, 0), ("max_rows", max_rows, nprototypes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{self.name}: {label} must be an int >= {low}, got {value!r}")
        self.iterations, self.max_rows, self.seed = iterations, max_rows, int(seed)
        self.centroids_: torch.Tensor | None = None

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "iterations": self.iterations,
            "max_rows": self.max_rows,
            "seed": self.seed,
        }

    def _columns(self, ndims: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        columns = block_columns(ndims, self.ncodebooks, device)
        return columns, block_mask(columns)

    def _gather(self, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        return rows.float()[:, columns]  # (N, C, W)

    # ------------------------------------------------------------------ learning
    def _centre(self, values: torch.Tensor) -> torch.Tensor:
        """Centre of ``values`` (n, W) under the metric (the mean; the median for L1)."""
        return values.median(0).values if self.metric == "l1" else values.mean(0)

    def _seed_centroids(self, block: torch.Tensor, mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """k-means++ seeding (Arthur & Vassilvitskii 2007) of one block (n, W): (K, W)."""
        nrows = block.shape[0]
        chosen = [int(torch.randint(nrows, (1,), generator=gen))]
        nearest = distances(block[:, None], block[chosen][None], mask[None], self.metric)[:, 0, 0]
        for _ in range(1, self.nprototypes):
            weights = nearest.square() if self.metric != "l2" else nearest  # squared distances
            pick = int(torch.multinomial(weights.double().cpu(), 1, generator=gen))
            chosen.append(pick)
            new = distances(block[:, None], block[pick][None, None], mask[None], self.metric)[:, 0, 0]
            nearest = torch.minimum(nearest, new)
        return block[chosen].clone()

    def _fit_codes(
        self, rows: torch.Tensor, weight: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        nrows, ndims = rows.shape
        columns, mask = self._columns(ndims, rows.device)
        gen = torch.Generator().manual_seed(self.seed)
        sample = torch.randperm(nrows, generator=gen)[: self.max_rows].to(rows.device)
        values = self._gather(rows[sample], columns)  # (n, C, W)
        for c in range(self.ncodebooks):
            distinct = torch.unique(values[:, c][:, mask[c]], dim=0).shape[0]
            if distinct < self.nprototypes:
                start, stop = int(columns[c, 0]), int(columns[c].max()) + 1
                raise ValueError(
                    f"{self.name} encoder: codebook {c} (columns {start}..{stop - 1}) has only {distinct} "
                    f"distinct training rows, fewer than K={self.nprototypes} (constant or near-constant "
                    "data, e.g. dead input channels); use fewer prototypes or fewer codebooks, the tree "
                    "encoder for this layer, or keep the layer dense (--exclude LAYER)"
                )
        centroids = torch.stack(
            [self._seed_centroids(values[:, c], mask[c], gen) for c in range(self.ncodebooks)]
        )
        for _ in range(self.iterations):
            codes = nearest_codes(values, centroids, mask, self.metric)
            for c in range(self.ncodebooks):
                for k in range(self.nprototypes):
                    members = codes[:, c] == k
                    if bool(members.any()):  # an empty cluster keeps its centroid
                        centroids[c, k] = self._centre(values[members, c])
        self.centroids_ = centroids
        codes = nearest_codes(self._gather(rows, columns), centroids, mask, self.metric)
        initial = rows.new_zeros(self.ncodebooks, self.nprototypes, ndims, dtype=torch.float32)
        for c in range(self.ncodebooks):
            initial[c][:, columns[c][mask[c]]] = centroids[c][:, mask[c]]
        return codes.to(torch.uint8), initial

    # ------------------------------------------------------------------ inference
    def _encode(self, rows: torch.Tensor) -> torch.Tensor:
        """(N, C) uint8 codes: the nearest centroid of each block."""
        columns, mask = self._columns(rows.shape[1], rows.device)
        values = self._gather(rows, columns)  # float32: what the distances are computed in
        if not bool(torch.isfinite(values).all()):  # a NaN distance would pick an arbitrary centroid
            hashing.check_finite_reads(rows, columns)  # raises, naming the row and its columns
        return nearest_codes(values, self.centroids_, mask, self.metric).to(torch.uint8)

    @property
    def read_columns(self) -> torch.Tensor:
        """(C, W): every column of the codebook's block (narrower blocks repeat their last)."""
        self.require_fitted()
        return block_columns(self.input_dim, self.ncodebooks, self.centroids_.device)

    def cost(self) -> EncoderCost:
        """Per row; needs D (fitted). See :func:`nearest_cost`."""
        self.require_fitted()
        return nearest_cost(self.metric, self.input_dim, self.ncodebooks, self.nprototypes)


def nearest_cost(metric: str, ndims: int, ncodebooks: int, nprototypes: int) -> EncoderCost:
    """Operations to encode one row of D = ``ndims`` values with C blocks of K centroids.

    Per codebook with block width w and K centroids: K*w subtractions (counted as adds);
    L2: K*w squares (multiplies) and K*(w-1) accumulating adds; L1: K*(w-1) adds (|x| is a
    sign-bit clear, counted free); L-infinity: K*(w-1) compares for the running max;
    all: K-1 compares for the argmin. Reads: every input value once (D).
    """
    bounds = hashing.subspace_bounds(ndims, ncodebooks)
    widths = [stop - start for start, stop in bounds]
    k = nprototypes
    subtracts = sum(k * w for w in widths)
    accumulate = sum(k * (w - 1) for w in widths)
    argmin = ncodebooks * (k - 1)
    if metric == "l2":
        return EncoderCost(compares=argmin, adds=subtracts + accumulate, multiplies=subtracts, reads=ndims)
    if metric == "l1":
        return EncoderCost(compares=argmin, adds=subtracts + accumulate, reads=ndims)
    if metric == "linf":
        return EncoderCost(compares=argmin + accumulate, adds=subtracts, reads=ndims)
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


@register_encoder
class PQEncoder(NearestPrototypeEncoder):
    """Nearest centroid under L2 (product quantisation; needs multiplies)."""

    name: ClassVar[str] = "pq"
    metric: ClassVar[str] = "l2"


@register_encoder
class L1Encoder(NearestPrototypeEncoder):
    """Nearest centroid under L1 (k-medians; adds and compares only)."""

    name: ClassVar[str] = "pq-l1"
    metric: ClassVar[str] = "l1"


@register_encoder
class LinfEncoder(NearestPrototypeEncoder):
    """Nearest centroid under L-infinity (adds and compares only)."""

    name: ClassVar[str] = "pq-linf"
    metric: ClassVar[str] = "linf"
