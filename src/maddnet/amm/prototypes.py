"""Prototypes: leaf means, then a joint ridge regression over all codebooks.

With ``G`` the (N, C*K) one-hot matrix of codes, the prototypes ``P`` (C*K, D) solve

    min_P ||A - G P||^2 + ridge * ||P - P0||^2,

i.e. ``(G^T G + ridge I) P = G^T A + ridge P0`` (the primal form, a (C*K)-square system).
With fewer rows than table rows (N < C*K) the same P is
``P0 + G^T (G G^T + ridge I)^-1 (A - G P0)`` (the dual form, an N-square system; the
push-through identity ``(G^T G + ridge I)^-1 G^T = G^T (G G^T + ridge I)^-1``).
:func:`ridge_prototypes` solves whichever system is smaller, so its memory is
``min(N, C*K)^2`` floats, at most ``N*C*K``, and its factorisation
``min(N, C*K)^3 / 3`` flops (issue 16: a 3x3 conv of 512 channels, C*K = 8,192, seen on
1,024 rows factored an 8,192-square system). ``G`` is never formed: ``G^T G`` counts code
co-occurrences (:func:`code_cooccurrence`), ``G G^T`` code agreements, ``G^T X`` and
``G T`` are scatter and gather sums (:mod:`maddnet.amm._ridge_kernel` on the CPU).
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from . import _lut_kernel, _ridge_kernel, _split_kernel


def leaf_mean_prototypes(
    leaf_means: list[torch.Tensor], bounds: list[tuple[int, int]], ndims: int
) -> torch.Tensor:
    """Stack per-codebook leaf means (K, width) into (C, K, D) prototypes, zero off-block."""
    nprototypes = leaf_means[0].shape[0]
    prototypes = leaf_means[0].new_zeros(len(bounds), nprototypes, ndims)
    for c, ((start, stop), means) in enumerate(zip(bounds, leaf_means, strict=True)):
        prototypes[c, :, start:stop] = means
    return prototypes


def block_leaf_means(
    rows: torch.Tensor, codes: torch.Tensor, bounds: list[tuple[int, int]], fallback: torch.Tensor
) -> torch.Tensor:
    """(C, K, D) float32 prototypes: each code's mean row over its codebook's block, zero
    off-block (as :func:`leaf_mean_prototypes`).

    Args:
        rows: (N, D) float rows; codes: (N, C) integer codes in ``[0, K)``.
        bounds: the codebooks' blocks ``(start, stop)``.
        fallback: (C, K, D) prototypes kept for codes no row has (e.g. the tree's leaf means).
    """
    nprototypes = fallback.shape[1]
    means = fallback.float().clone()
    for c, (start, stop) in enumerate(bounds):
        leaf = codes[:, c].long()
        counts = torch.bincount(leaf, minlength=nprototypes)
        sums = torch.zeros(nprototypes, stop - start, dtype=torch.float64, device=rows.device)
        sums.index_add_(0, leaf, rows[:, start:stop].double())
        used = counts > 0
        means[c, used, start:stop] = (sums[used] / counts[used, None]).float()
    return means


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


def _kernel_floats(values: torch.Tensor) -> np.ndarray:
    """A C-contiguous float32 or float64 numpy view (or copy) of a CPU tensor for the
    ridge kernels (other float dtypes are widened to float32)."""
    values = values.detach()
    if values.dtype not in (torch.float32, torch.float64):
        values = values.float()
    return values.contiguous().numpy()


def one_hot_t_rows(codes: torch.Tensor, rows: torch.Tensor, nprototypes: int) -> torch.Tensor:
    """``G^T X``: (C*K, D) float64, row ``c*K + k`` the sum of the rows of X whose code of
    codebook c is k.

    Args:
        codes: (N, C) integer codes in ``[0, K)``; rows: (N, D) float X on the same device.

    CPU: :func:`maddnet.amm._ridge_kernel.scatter_rows` (N*C*D float64 additions); other
    devices: one (K, N) one-hot product per codebook (float32 products, float64 result).
    """
    if codes.device.type == "cpu":
        _lut_kernel.launch_threads()
        codes_t = np.ascontiguousarray(codes.numpy().T)
        ngroups = max(1, min(codes.shape[1], numba.get_num_threads()))
        return torch.from_numpy(
            _ridge_kernel.scatter_rows(codes_t, _kernel_floats(rows), nprototypes, ngroups)
        )
    return _one_hot_t_rows_torch(codes, rows, nprototypes)


def _one_hot_t_rows_torch(codes: torch.Tensor, rows: torch.Tensor, nprototypes: int) -> torch.Tensor:
    """:func:`one_hot_t_rows` with tensor ops (any device)."""
    rows32 = rows.float()
    return torch.cat(
        [
            torch.nn.functional.one_hot(codes[:, c].long(), nprototypes).float().T @ rows32
            for c in range(codes.shape[1])
        ]
    ).double()


def one_hot_rows(codes: torch.Tensor, table: torch.Tensor, nprototypes: int) -> torch.Tensor:
    """``G T``: (N, D) float64, row i the sum over codebooks c of ``table[c*K + codes[i, c]]``.

    Args:
        codes: (N, C) integer codes in ``[0, K)``; table: (C*K, D) float T on the same device.

    CPU: :func:`maddnet.amm._ridge_kernel.gather_rows`, which skips the columns where a
    codebook's K rows are all zero (leaf means are zero off their block: N*D additions
    instead of N*C*D); other devices: an indexed sum, chunked over rows.
    """
    ncodebooks = codes.shape[1]
    if codes.device.type == "cpu":
        _lut_kernel.launch_threads()
        values = _kernel_floats(table)
        support = (values.reshape(ncodebooks, nprototypes, -1) != 0).any(1)  # (C, D)
        run_ptr, run_start, run_stop = _column_runs(support)
        return torch.from_numpy(
            _ridge_kernel.gather_rows(
                codes.contiguous().numpy(), values, nprototypes, run_ptr, run_start, run_stop
            )
        )
    return _one_hot_rows_torch(codes, table, nprototypes)


def _one_hot_rows_torch(codes: torch.Tensor, table: torch.Tensor, nprototypes: int) -> torch.Tensor:
    """:func:`one_hot_rows` with tensor ops (any device), chunked over rows."""
    index = code_indices(codes, nprototypes)
    table64 = table.double()
    chunk = max(1, (1 << 24) // max(1, codes.shape[1] * table.shape[1]))
    return torch.cat([table64[index[start : start + chunk]].sum(1) for start in range(0, len(index), chunk)])


def _column_runs(support: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(C, D) bool -> CSR-style runs of True columns per row: (C+1,) pointers, (R,) starts,
    (R,) stops (half-open)."""
    padded = np.zeros((support.shape[0], support.shape[1] + 2), np.int8)
    padded[:, 1:-1] = support
    edges = np.diff(padded, axis=1)  # +1 where a run starts, -1 one past where it ends
    rows_up, starts = np.nonzero(edges == 1)
    _, stops = np.nonzero(edges == -1)
    run_ptr = np.searchsorted(rows_up, np.arange(support.shape[0] + 1)).astype(np.int64)
    return run_ptr, starts.astype(np.int64), stops.astype(np.int64)


def code_agreement(codes: torch.Tensor, nprototypes: int) -> torch.Tensor:
    """``G G^T``: (N, N) float64, entry (i, m) the number of codebooks in which rows i and
    m have the same code.

    CPU: a numba kernel (N^2*C/2 byte compares); other devices: ``G G^T`` of the (N, C*K)
    float32 one-hot matrix (exact: counts are at most C < 2^24).
    """
    if codes.device.type == "cpu":
        _lut_kernel.launch_threads()
        return torch.from_numpy(_ridge_kernel.code_agreement(codes.contiguous().numpy()))
    return _code_agreement_torch(codes, nprototypes)


def _code_agreement_torch(codes: torch.Tensor, nprototypes: int) -> torch.Tensor:
    """:func:`code_agreement` with tensor ops (any device)."""
    ncodebooks = codes.shape[1]
    index = code_indices(codes, nprototypes)
    # G (N, C*K) as float32 ones: no (N, C, C*K) one_hot temporary
    onehot = torch.zeros(codes.shape[0], ncodebooks * nprototypes, device=codes.device)
    onehot.scatter_(1, index, 1.0)
    return (onehot @ onehot.T).double()


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
        (C, K, D) float32 prototypes. Both forms solve in float64; they agree to float64
        rounding (``tests/test_amm_matmul.py`` checks both against a dense solve).

    Raises:
        ValueError: ridge not > 0.
    """
    ncodebooks, nprototypes, ndims = initial.shape
    solution = ridge_solve(rows, codes, initial.reshape(ncodebooks * nprototypes, ndims), ridge)
    return solution.reshape(ncodebooks, nprototypes, ndims).float()


def ridge_lut(
    rows: torch.Tensor, codes: torch.Tensor, initial: torch.Tensor, ridge: float, weight: torch.Tensor
) -> torch.Tensor:
    """The LUT ``P B`` of the ridge prototypes P, solved for B directly.

    Since ``G^T (A B) = (G^T A) B``, the table ``T = P B`` solves the same system with the
    targets ``A B`` and the prior ``P0 B`` (:mod:`maddnet.amm.lut_fit`): M right-hand sides
    instead of D, so the triangular solves and the scatter sums shrink by D / M (9x for a
    3x3 conv with as many outputs as inputs, 4x for a transformer's MLP down-projection).
    Equal to ``build_lut(ridge_prototypes(...), B)`` up to float64 rounding
    (``tests/test_amm_matmul.py``); worth it only where M < D.

    Args:
        rows: (N, D) float training rows; codes: (N, C) their codes; initial: (C, K, D) P0;
        ridge: lambda > 0; weight: (D, M) float B.

    Returns:
        (C, K, M) float32 table on the rows' device.
    """
    _check_ridge(ridge)
    ncodebooks, nprototypes, ndims = initial.shape
    weight32 = weight.float()
    flat_initial = initial.reshape(ncodebooks * nprototypes, ndims)
    # float32 products (as build_lut's P B), no float64 copy of A or P0 (N x D, C*K x D)
    prior = (flat_initial.float() @ weight32).double()  # (C*K, M) P0 B
    if rows.shape[0] < ncodebooks * nprototypes:
        # the dual's residual A B - G P0 B as (A - G P0) B: G P0 gathers only P0's nonzero
        # (block) columns, N*D additions, where G (P0 B) would gather N*C*M from a dense table
        residual = rows.double() - one_hot_rows(codes, flat_initial, nprototypes)
        solution = _ridge_dual((residual.float() @ weight32).double(), codes, prior, ridge)
    else:
        solution = _ridge_primal((rows.float() @ weight32).double(), codes, prior, ridge)  # targets A B
    return solution.reshape(ncodebooks, nprototypes, -1).float()


def ridge_solve(
    targets: torch.Tensor, codes: torch.Tensor, prior: torch.Tensor, ridge: float
) -> torch.Tensor:
    """``argmin_X ||Y - G X||^2 + ridge ||X - X0||^2``: (C*K, R) float64 for targets Y (N, R),
    codes (N, C) and prior X0 (C*K, R), in the primal or the dual form, whichever system is
    smaller (module docstring). Raises ``ValueError`` for ridge not > 0."""
    _check_ridge(ridge)
    if targets.shape[0] < prior.shape[0]:
        # G X0 gathers from X0 as given (float32 halves the traffic; the sums are float64)
        residual = targets.double() - one_hot_rows(codes, prior, prior.shape[0] // codes.shape[1])
        return _ridge_dual(residual, codes, prior, ridge)
    return _ridge_primal(targets, codes, prior, ridge)


def _check_ridge(ridge: float) -> None:
    if not ridge > 0:
        raise ValueError(f"ridge must be > 0 (the one-hot system is singular without it), got {ridge}")


def _ridge_primal(
    targets: torch.Tensor, codes: torch.Tensor, prior: torch.Tensor, ridge: float
) -> torch.Tensor:
    """The primal form: ``(G^T G + ridge I)^-1 (G^T Y + ridge X0)``, (C*K, R) float64."""
    nprototypes = prior.shape[0] // codes.shape[1]
    gram = code_cooccurrence(codes, nprototypes)
    gram.diagonal().add_(ridge)
    rhs = one_hot_t_rows(codes, targets, nprototypes).add_(prior.double(), alpha=ridge)
    return torch.cholesky_solve(rhs, torch.linalg.cholesky(gram, out=gram))  # in place: one (C*K)^2


def _ridge_dual(
    residual: torch.Tensor, codes: torch.Tensor, prior: torch.Tensor, ridge: float
) -> torch.Tensor:
    """The dual form: ``X0 + G^T (G G^T + ridge I)^-1 R`` for the residual ``R = Y - G X0``
    (N, R) float64; (C*K, R) float64."""
    nprototypes = prior.shape[0] // codes.shape[1]
    system = code_agreement(codes, nprototypes)
    system.diagonal().add_(ridge)
    weights = torch.cholesky_solve(residual, torch.linalg.cholesky(system, out=system))
    return one_hot_t_rows(codes, weights, nprototypes).add_(prior.double())
