"""The LUT fitted to the product: least squares of ``A @ B`` on the one-hot codes.

With G the (N, C*K) one-hot code matrix, the table T (C*K, M) solving

    min_T ||Y - G T||^2 + ridge * ||T - T0||^2,     Y = A @ B,

is ``T = (G^T G + ridge I)^-1 (G^T Y + ridge T0)``.

**It is the MADDness LUT when T0 = P0 B.** The ridge prototypes
(:func:`maddnet.amm.prototypes.ridge_prototypes`) are
``P = (G^T G + ridge I)^-1 (G^T A + ridge P0)``, and the LUT is ``P B``; since
``G^T (A B) = (G^T A) B``, ``P B = (G^T G + ridge I)^-1 (G^T A B + ridge P0 B)`` -- the
same T, for every A, B, codes and ridge (tests/test_encoder_study.py checks it to float64
rounding). Fitting the LUT to the product therefore changes nothing unless something
else changes: the prior (``T0 = 0``, or no ridge at all) or the target (``Y`` the layer's
true output rather than ``A @ B``, e.g. with the bias or with rows from another
distribution). :func:`product_lut` takes both as arguments; docs/encoders.md reports
what they measure.
"""

from __future__ import annotations

import torch

from .prototypes import ridge_solve


def product_lut(
    codes: torch.Tensor,
    targets: torch.Tensor,
    nprototypes: int,
    ridge: float,
    prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """Least-squares LUT of ``targets`` on the one-hot codes (see the module docstring).

    Args:
        codes: (N, C) integer codes in ``[0, K)``.
        targets: (N, M) float, what the LUT sum should reproduce (e.g. ``A @ B``).
        nprototypes: K.
        ridge: lambda > 0 (the one-hot system is singular without it: the C codebooks'
            one-hot blocks each sum to the all-ones column).
        prior: (C, K, M) T0 the ridge pulls towards (e.g. ``P0 @ B``); ``None``: zeros.

    Returns:
        (C, K, M) float32 table, on the device of ``codes``.

    Raises:
        ValueError: ridge not > 0, mismatched shapes, or non-finite targets.
    """
    if not ridge > 0:
        raise ValueError(
            f"product_lut: ridge must be > 0 (the one-hot system is singular without it), got {ridge}"
        )
    nrows, ncodebooks = codes.shape
    if targets.dim() != 2 or targets.shape[0] != nrows:
        raise ValueError(f"product_lut: targets must be (N={nrows}, M), got {tuple(targets.shape)}")
    if not bool(torch.isfinite(targets).all()):
        raise ValueError("product_lut: targets hold NaN/inf")
    noutputs = targets.shape[1]
    size = ncodebooks * nprototypes
    if prior is not None and tuple(prior.shape) != (ncodebooks, nprototypes, noutputs):
        raise ValueError(
            f"product_lut: prior must be (C, K, M) = {(ncodebooks, nprototypes, noutputs)}, "
            f"got {tuple(prior.shape)}"
        )
    zeros = torch.zeros(size, noutputs, dtype=torch.float64, device=codes.device)
    start = zeros if prior is None else prior.reshape(size, noutputs)
    return ridge_solve(targets, codes, start, ridge).reshape(ncodebooks, nprototypes, noutputs).float()
