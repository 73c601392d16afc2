"""Prototypes: leaf means, then a joint ridge regression over all codebooks.

With ``G`` the (N, C*K) one-hot matrix of codes, the prototypes ``P`` (C*K, D) solve

    min_P ||A - G P||^2 + ridge * ||P - P0||^2,

i.e. ``(G^T G + ridge I) P = G^T A + ridge P0``. ``G`` is never formed: ``G^T G`` is a
count matrix (co-occurrences of codes, :func:`code_cooccurrence`) and ``G^T A`` sums rows
of ``A`` per code with one (K, N) one-hot product per codebook.
"""

from __future__ import annotations

import numpy as np
import torch

from . import _lut_kernel, _split_kernel


def leaf_mean_prototypes(
    leaf_means: list[torch.Tensor], bounds: list[tuple[int, int]], ndims: int
) -> torch.Tensor:
    """Stack per-codebook leaf means (K, width) into (C, K, D) prototypes, zero off-block."""
    nprototypes = leaf_means[0].shape[0]
    prototypes = leaf_means[0].new_zeros(len(bounds), nprototypes, ndims)
    for c, ((start, stop), means) in enumerate(zip(bounds, leaf_means, strict=True)):
        prototypes[c, :, start:stop] = means
    return prototypes


def code_indices(codes: torch.Tensor, nprototypes: int) -> torch.Tensor:
    """(N, C) codes -> (N, C) int64 row indices into a stacked (C*K, ...) table."""
    ncodebooks = codes.shape[1]
    offsets = torch.arange(ncodebooks, device=codes.device) * nprototypes
    return codes.long() + offsets


def code_cooccurrence(codes: torch.Tensor, nprototypes: int, max_chunk: int = 1 << 24) -> torch.Tensor:
    """``G^T G`` for the one-hot code matrix G: (C*K, C*K) float64 co-occurrence counts.

    Args:
        codes: (N, C) integer codes in ``[0, K)`` (uint8, or int64 for K > 256), any device.
        nprototypes: K.
        max_chunk: off-CPU path only: at most this many (row, codebook pair) entries are
            counted per ``bincount`` call (bounds its temporaries).

    Returns:
        (C*K, C*K) float64 exact counts on ``codes``' device: entry ``(c*K + a, c'*K + b)``
        is the number of rows whose code of codebook c is a and of codebook c' is b.

    CPU tensors are counted by a numba kernel (``_split_kernel.cooccurrence``: one (K, K)
    table per codebook pair, O(N C^2) increments and no (N, C^2) or (C*K)^2 temporaries
    besides the result); other devices chunk ``bincount`` over flattened pair indices.
    Both give the same integers.
    """
    nrows, ncodebooks = codes.shape
    size = ncodebooks * nprototypes
    if codes.device.type == "cpu":
        _lut_kernel.launch_threads()
        codes_t = np.ascontiguousarray(codes.numpy().T)
        return torch.from_numpy(_split_kernel.cooccurrence(codes_t, nprototypes))
    index = code_indices(codes, nprototypes)
    gram = torch.zeros(size * size, dtype=torch.float64, device=codes.device)
    rows_per_chunk = max(1, max_chunk // (ncodebooks * ncodebooks))
    for start in range(0, nrows, rows_per_chunk):
        part = index[start : start + rows_per_chunk]
        pairs = (part[:, :, None] * size + part[:, None, :]).reshape(-1)
        gram += torch.bincount(pairs, minlength=size * size).to(torch.float64)
    return gram.reshape(size, size)


def ridge_prototypes(
    rows: torch.Tensor, codes: torch.Tensor, initial: torch.Tensor, ridge: float
) -> torch.Tensor:
    """Optimise all prototypes jointly (see module docstring).

    Args:
        rows: (N, D) float training rows.
        codes: (N, C) codes of those rows.
        initial: (C, K, D) starting prototypes P0 (e.g. leaf means).
        ridge: lambda > 0; pulls prototypes of rarely used codes towards P0.

    Returns:
        (C, K, D) float32 prototypes.
    """
    if not ridge > 0:
        raise ValueError(f"ridge must be > 0 (the one-hot system is singular without it), got {ridge}")
    ncodebooks, nprototypes, ndims = initial.shape
    size = ncodebooks * nprototypes
    gram = code_cooccurrence(codes, nprototypes)
    gram.diagonal().add_(ridge)
    rows32 = rows.float()
    # G^T A one codebook at a time: (K, N) one-hot @ (N, D) runs on BLAS.
    rhs = torch.cat(
        [
            torch.nn.functional.one_hot(codes[:, c].long(), nprototypes).float().T @ rows32
            for c in range(ncodebooks)
        ]
    )
    rhs = rhs.double() + ridge * initial.reshape(size, ndims).double()
    factor = torch.linalg.cholesky(gram)
    solution = torch.cholesky_solve(rhs, factor)
    return solution.reshape(ncodebooks, nprototypes, ndims).float()
