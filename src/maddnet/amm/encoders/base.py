"""The encoder interface: how rows become codes, in the spirit of faiss's ``Quantizer``.

An :class:`Encoder` learns from rows (``fit``), maps rows to codes (``encode``), holds the
prototypes the LUT is built from (``prototypes_``), says which input columns it reads
(``read_columns``, for needed-input analysis and export) and what one row costs in
hardware (``cost``).

Its trainable torch form, held by MADD layers, is a :class:`maddnet.nn.EncoderModule`
registered under the same name (the layering is amm -> nn: the algorithm on plain
tensors here, torch modules and autograd there). A new encoder is one :class:`Encoder`
subclass registered with :func:`register_encoder` (enough for ``MaddnessMatmul``), plus
its ``EncoderModule`` to train it inside networks; ``MaddLinear``, ``MaddConv2d``,
conversion and the CLI's ``--encoder`` then find it by name. ``maddnet.amm.encoders.tree``
is the MADDness hash tree.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .. import prototypes as prototype_fit
from ..checks import NotFittedError, check_nprototypes


@dataclass(frozen=True)
class EncoderCost:
    """Hardware operations of encoding ONE row with all C codebooks.

    compares: value-against-threshold comparisons; adds: additions/subtractions (e.g.
    distance accumulation); multiplies: multiplications; reads: input values read.
    """

    compares: int = 0
    adds: int = 0
    multiplies: int = 0
    reads: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "compares": self.compares,
            "adds": self.adds,
            "multiplies": self.multiplies,
            "reads": self.reads,
        }


class Encoder(ABC):
    """Learns and applies the map rows (N, D) -> codes (N, C) in ``[0, K)``.

    Configured in ``__init__`` (JSON-friendly arguments, returned by :meth:`get_config`),
    learned in :meth:`fit`; learned state ends in ``_`` and is listed in ``STATE``
    (tensors, saved by :meth:`state_dict`).

    Args:
        ncodebooks: C, codes per row.
        nprototypes: K, codes per codebook (a power of two from 4 to 256).
        ridge: lambda of the joint prototype regression run after the codes are learned
            (:func:`maddnet.amm.prototypes.ridge_prototypes`), or ``None`` to keep the
            encoder's own initial prototypes.

    Fitted attributes: ``prototypes_`` (C, K, D) float32, on the device of the rows.
    """

    name: ClassVar[str] = ""
    STATE: ClassVar[tuple[str, ...]] = ("prototypes_",)

    def __init__(self, ncodebooks: int, nprototypes: int = 16, ridge: float | None = 1.0) -> None:
        self.depth = check_nprototypes(nprototypes)
        if isinstance(ncodebooks, bool) or not isinstance(ncodebooks, int) or ncodebooks < 1:
            raise ValueError(f"ncodebooks (C) must be a positive int, got {ncodebooks!r}")
        if ridge is not None and not (float(ridge) > 0 and float(ridge) < float("inf")):
            raise ValueError(f"ridge must be a positive number or None, got {ridge!r}")
        self.ncodebooks = int(ncodebooks)
        self.nprototypes = int(nprototypes)
        self.ridge = None if ridge is None else float(ridge)
        self.prototypes_: torch.Tensor | None = None

    # ------------------------------------------------------------------ config
    def get_config(self) -> dict[str, Any]:
        """Constructor arguments: ``type(self)(**config)`` is an unfitted twin."""
        return {"ncodebooks": self.ncodebooks, "nprototypes": self.nprototypes, "ridge": self.ridge}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    @property
    def fitted(self) -> bool:
        """Whether the encoding is learned (its own state; prototypes may come later, so
        ``encode`` works inside ``_fit_codes`` once the encoding state is set)."""
        own = [name for name in self.STATE if name != "prototypes_"] or ["prototypes_"]
        return all(getattr(self, name) is not None for name in own)

    @property
    def input_dim(self) -> int | None:
        """D (None before fitting)."""
        return None if self.prototypes_ is None else self.prototypes_.shape[2]

    # ------------------------------------------------------------------ learning
    def fit(self, rows: torch.Tensor, weight: torch.Tensor | None = None) -> Encoder:
        """Learn the encoder and its prototypes from ``rows`` (N, D) float32.

        ``weight`` (D, M) is the matrix the codes will multiply; encoders whose objective
        is the product (e.g. the tree with ``hash_objective="output"``) read it, others
        only check it. Raises ``TypeError`` for rows or weight that are not tensors, and
        ``ValueError`` naming the encoder for rows that are not 2-D, a weight that is not
        (D, M), too few rows (fewer than K), C > D, NaN/inf in the rows or the weight, or
        rows that are all the same (nothing to split or cluster).
        """
        codes = self.fit_codes(rows, weight)
        if self.ridge is not None:
            self.prototypes_ = prototype_fit.ridge_prototypes(rows, codes, self.prototypes_, self.ridge)
        return self

    def fit_codes(self, rows: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Learn the encoding only: ``prototypes_`` become the initial prototypes (e.g. leaf
        means, no ridge step); returns the training rows' codes (N, C). What
        :meth:`maddnet.amm.MaddnessMatmul.fit_lut` builds on. Raises as :meth:`fit`."""
        label = self.name or type(self).__name__
        for what, values in (("training rows", rows), ("weight", weight)):
            if values is not None and not isinstance(values, torch.Tensor):
                raise TypeError(
                    f"{label} encoder: the {what} must be a torch.Tensor, got {type(values).__name__} "
                    "(maddnet.amm.MaddnessMatmul takes numpy arrays)"
                )
            if values is not None and values.dim() != 2:
                raise ValueError(
                    f"{label} encoder: the {what} must be 2-D ({'N, D' if what != 'weight' else 'D, M'}), "
                    f"got shape {tuple(values.shape)}"
                )
        nrows, ndims = rows.shape
        if weight is not None and weight.shape[0] != ndims:
            raise ValueError(
                f"{label} encoder: the weight has {weight.shape[0]} rows but the training rows have "
                f"D={ndims} columns; it must be (D, M)"
            )
        if self.ncodebooks > ndims:
            raise ValueError(
                f"ncodebooks (C={self.ncodebooks}) cannot exceed the number of input columns (D={ndims})"
            )
        if nrows < self.nprototypes:
            raise ValueError(
                f"A_train has {nrows} rows; learning a {label} encoder with "
                f"K={self.nprototypes} codes per codebook needs at least {self.nprototypes}"
            )
        for what, values in (("training rows hold", rows), ("weight holds", weight)):
            if values is not None and not bool(torch.isfinite(values).all()):
                bad = int((~torch.isfinite(values)).sum())
                raise ValueError(
                    f"{label} encoder: the {what} {bad} NaN/inf values; it cannot learn from non-finite data"
                )
        # every row the same: any split or cluster is arbitrary and every code but one empty
        as_float = rows.float()  # what the encoders compute in: rows equal there are equal
        if not bool((as_float != as_float[:1]).any()):
            raise ValueError(
                f"{label} encoder: every training row is the same (constant data); nothing to learn "
                "(a layer whose input is constant on the calibration data, e.g. behind ReLUs that "
                "are all off, is exact only dense: exclude it, or calibrate on other data)"
            )
        # the input is accepted (a refused refit leaves the last fit): start clean, so that
        # encode inside _fit_codes sees no old D and a fit that fails leaves no mixed state
        for name in self.STATE:
            setattr(self, name, None)
        codes, self.prototypes_ = self._fit_codes(rows, weight)
        return codes

    @abstractmethod
    def _fit_codes(
        self, rows: torch.Tensor, weight: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Learn the encoding; return the training rows' codes (N, C) and initial
        prototypes (C, K, D) float32 (e.g. the mean row of each code)."""

    # ------------------------------------------------------------------ inference
    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        """Codes of ``rows`` (N, D): (N, C) uint8 (int64 where K > 256 were allowed).

        Raises ``NotFittedError`` before :meth:`fit`, ``ValueError`` naming the encoder for
        rows that are not a 2-D tensor or whose D differs from the fitted one, and
        :class:`maddnet.amm.hashing.NonFiniteInputError` (a ``ValueError``) for a NaN/inf
        value the encoder reads (the row and columns in the message).
        """
        self.require_fitted()
        label = self.name or type(self).__name__
        if not isinstance(rows, torch.Tensor) or rows.dim() != 2:
            raise ValueError(
                f"{label} encoder: rows must be a 2-D (N, D) tensor, got {type(rows).__name__} of shape "
                f"{tuple(getattr(rows, 'shape', ()))}"
            )
        # during _fit_codes the prototypes (and so D) are not known yet: the rows are the
        # training rows then
        if self.input_dim is not None and rows.shape[1] != self.input_dim:
            raise ValueError(
                f"{label} encoder: rows have {rows.shape[1]} columns, it was fit with D={self.input_dim}"
            )
        return self._encode(rows)

    @abstractmethod
    def _encode(self, rows: torch.Tensor) -> torch.Tensor:
        """:meth:`encode` on checked rows (N, D) of a fitted encoder."""

    @property
    @abstractmethod
    def read_columns(self) -> torch.Tensor:
        """(C, R) int64: the input columns codebook c reads (R per codebook, in the order
        the encoder reads them). Needed-input analysis and export read this."""

    @abstractmethod
    def cost(self) -> EncoderCost:
        """Operations to encode one row (all codebooks)."""

    # ------------------------------------------------------------------ state
    def require_fitted(self) -> None:
        if not self.fitted:
            raise NotFittedError(f"{type(self).__name__} is not fitted: call fit() first")

    def to(self, device: torch.device | str) -> Encoder:
        """Move every fitted tensor to ``device`` (in place); returns self."""
        for name in self.STATE:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Fitted tensors under their names without the trailing ``_``."""
        return {name[:-1]: getattr(self, name) for name in self.STATE if getattr(self, name) is not None}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> Encoder:
        """Restore fitted tensors saved by :meth:`state_dict` (extra keys are ignored)."""
        missing = sorted(name[:-1] for name in self.STATE if name[:-1] not in state)
        if missing:
            raise ValueError(f"state is missing fitted tensors: {missing}")
        for name in self.STATE:
            value = state[name[:-1]]
            setattr(self, name, value.long() if not value.is_floating_point() else value.float())
        return self


# ---------------------------------------------------------------------- registry
ENCODERS: dict[str, type[Encoder]] = {}


def register_encoder(encoder: type[Encoder]) -> type[Encoder]:
    """Make ``encoder`` known under ``encoder.name`` (usable as a class decorator)."""
    if not encoder.name:
        raise ValueError(f"{encoder.__name__}.name must be a non-empty registry name")
    ENCODERS[encoder.name] = encoder
    return encoder


def encoder_class(name: str) -> type[Encoder]:
    """The Encoder class registered as ``name``; ValueError naming the known ones if unknown."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; registered encoders: {sorted(ENCODERS)}")
    return ENCODERS[name]


def encoder_settings(cls: type[Encoder]) -> list[str] | None:
    """The keyword settings encoder class ``cls`` takes (in signature order), or None when
    it takes any (``**kwargs``)."""
    parameters = inspect.signature(cls).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return [p.name for p in parameters]


def create_encoder(name: str, **config: Any) -> Encoder:
    """An unfitted encoder: ``encoder_class(name)(**config)``.

    Raises:
        KeyError: an unknown name; ValueError: a setting the encoder does not take (the
        settings it takes are listed).
    """
    cls = encoder_class(name)
    accepted = encoder_settings(cls)
    unknown = [] if accepted is None else sorted(set(config) - set(accepted))
    if unknown:
        raise ValueError(f"encoder {name!r} has no setting(s) {unknown}; it takes {sorted(accepted)}")
    return cls(**config)
