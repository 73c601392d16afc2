"""Input validation and numpy/torch conversion shared by the AMM code.

Every public entry point funnels its arrays through :func:`as_matrix`, so a bad input
fails early with a message that names the argument and the problem.
"""

from __future__ import annotations

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


class NotFittedError(RuntimeError):
    """Raised when an estimator or encoder is used before it was fitted (``fit`` /
    ``fit_encoder`` / ``set_weight``)."""


def as_matrix(x: ArrayLike, name: str, *, check_finite: bool = True) -> torch.Tensor:
    """Return ``x`` as a detached 2-D float tensor (no copy for float32 tensors and for C- or
    Fortran-ordered float32 arrays).

    numpy arrays are wrapped with ``torch.from_numpy``; the caller converts results back
    with :func:`like_input`. Raises ``ValueError`` naming ``name`` for a wrong rank,
    empty input, a non-numeric dtype or NaN/inf values.
    """
    if isinstance(x, np.ndarray):
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise TypeError(f"{name} must hold numbers, got numpy dtype {x.dtype}")
        if not (x.flags.c_contiguous or x.flags.f_contiguous):
            x = np.ascontiguousarray(x)  # torch.from_numpy cannot take every stride (negative)
        x = torch.from_numpy(x)  # no copy: column-major (Fortran-order) rows stay so
    elif not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
    else:
        x = x.detach()  # the estimator is not differentiable: maddnet.nn layers are
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows x columns), got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")
    if x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} must be real-valued, got dtype {x.dtype}")
    if x.dtype != torch.float32 and x.dtype != torch.float64:
        x = x.float()
    if check_finite:
        check_all_finite(x, name)
    return x


def check_all_finite(x: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` if ``x`` holds NaN or +-inf, saying how many and where."""
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = (~finite).nonzero()
        raise ValueError(
            f"{name} contains {bad.shape[0]} NaN/inf value(s), first at index {tuple(bad[0].tolist())}"
        )


def like_input(result: torch.Tensor, template: ArrayLike) -> ArrayLike:
    """Convert ``result`` back to numpy when the user passed a numpy array."""
    if isinstance(template, np.ndarray):
        return result.detach().cpu().numpy()
    return result


def check_nprototypes(nprototypes: int) -> int:
    """Return ``log2(nprototypes)``: the depth of the hash tree."""
    if not isinstance(nprototypes, int | np.integer) or isinstance(nprototypes, bool):
        raise TypeError(f"nprototypes must be an int, got {type(nprototypes).__name__}")
    if nprototypes < 4 or nprototypes > 256 or nprototypes & (nprototypes - 1):
        raise ValueError(f"nprototypes (K) must be a power of two from 4 to 256, got {nprototypes}")
    return int(nprototypes).bit_length() - 1
