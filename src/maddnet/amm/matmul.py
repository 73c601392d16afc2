"""``MaddnessMatmul``: the approximate matrix product as a scikit-learn-like estimator."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from .._atomic import atomic_torch_save
from . import lut
from . import prototypes as prototype_fit
from .checks import ArrayLike, NotFittedError, as_matrix, check_all_finite, check_nprototypes, like_input
from .encoders import HASH_OBJECTIVES, Encoder, create_encoder

_CONFIG_KEYS = (
    "ncodebooks",
    "nprototypes",
    "lut_bits",
    "ridge",
    "ncandidates",
    "lut_granularity",
    "hash_objective",
    "encoder",
    "encoder_options",
)
# get_config() of estimators saved before the encoder settings existed lacks these
_CONFIG_DEFAULTS = {"encoder": "tree", "encoder_options": {}}
__all__ = ["HASH_OBJECTIVES", "MaddnessMatmul", "NotFittedError"]


class MaddnessMatmul:
    """Approximate ``A @ B`` with MADDness: encode each row of A, add up LUT entries.

    The estimator is an encoder (:class:`~maddnet.amm.encoders.Encoder`; by default the
    MADDness hash tree, :class:`~maddnet.amm.encoders.TreeEncoder`) plus the LUT code.

    Example::

        amm = MaddnessMatmul(ncodebooks=16).fit(A_train, B)
        Y = amm(A_test)                     # ~ A_test @ B, same kind (numpy/torch) as A_test

    Args:
        ncodebooks: C, the number of column blocks (subspaces) of A.
        nprototypes: K, leaves per hash tree; a power of two from 4 to 256.
        lut_bits: bits per LUT entry with integer accumulation, or ``None`` for float LUTs.
        ridge: lambda of the joint prototype regression, or ``None`` to keep leaf means.
        ncandidates: columns tried per tree level when learning the hash. 8 (the default)
            matched the original MADDness NMSE on Fashion-MNIST at every C where 4 was 2-4 %
            worse, for ~1.7x the fit time (benchmarks/README.md); MADD layer conversion
            (``MaddConfig``) uses 4.
        lut_granularity: "codebook" (one scale for the whole LUT, as MADDness) or "column"
            (one power-of-two scale and offset per output column).
        hash_objective: "input": tree thresholds minimise the SSE of the rows' block columns
            (MADDness); "output": they minimise the SSE of the block's contribution to the
            product, ``A_block @ B_block`` (needs B when learning the encoder).
            ``ncandidates`` and ``hash_objective`` are options of the tree encoder.
        encoder: registry name of the encoder (``maddnet.amm.encoders.ENCODERS``).
        encoder_options: further constructor arguments of the encoder, those without a
            parameter here (e.g. the tree's ``refine_sweeps``, docs/encoders.md).

    Fitted attributes (torch tensors on the device of the training data):
        encoder_ (the fitted :class:`~maddnet.amm.encoders.Encoder`), prototypes_
        (C, K, D) float32, lut_ (C, K, M) float32 and, when quantised, lut_q_ (a
        :class:`~maddnet.amm.lut.QuantizedLut`); for the tree encoder also split_dims_
        (C, log2 K) int64 and thresholds_ (C, K-1) float32 (heap order).
    """

    def __init__(
        self,
        ncodebooks: int = 16,
        nprototypes: int = 16,
        lut_bits: int | None = 8,
        ridge: float | None = 1.0,
        ncandidates: int = 8,
        lut_granularity: str = "codebook",
        hash_objective: str = "input",
        encoder: str = "tree",
        encoder_options: dict[str, Any] | None = None,
    ) -> None:
        self.depth = check_nprototypes(nprototypes)
        if not isinstance(ncodebooks, int | np.integer) or ncodebooks < 1:
            raise ValueError(f"ncodebooks (C) must be a positive int, got {ncodebooks!r}")
        if lut_bits is not None and not (isinstance(lut_bits, int) and 1 <= lut_bits <= 8):
            raise ValueError(f"lut_bits must be None (float LUT) or an int in 1..8, got {lut_bits!r}")
        if ridge is not None and not (float(ridge) > 0 and np.isfinite(ridge)):
            raise ValueError(f"ridge must be a positive number or None, got {ridge!r}")
        if not isinstance(ncandidates, int) or ncandidates < 1:
            raise ValueError(f"ncandidates must be a positive int, got {ncandidates!r}")
        if lut_granularity not in lut.GRANULARITIES:
            raise ValueError(f"lut_granularity must be one of {lut.GRANULARITIES}, got {lut_granularity!r}")
        if hash_objective not in HASH_OBJECTIVES:
            raise ValueError(f"hash_objective must be one of {HASH_OBJECTIVES}, got {hash_objective!r}")
        self.hash_objective = hash_objective
        self.ncodebooks = int(ncodebooks)
        self.nprototypes = int(nprototypes)
        self.lut_bits = lut_bits
        self.ridge = None if ridge is None else float(ridge)
        self.ncandidates = ncandidates
        self.lut_granularity = lut_granularity
        self.encoder = encoder
        self.encoder_options = dict(encoder_options or {})
        self._new_encoder()  # validates the encoder's name and options now, not at fit time
        self.encoder_: Encoder | None = None
        self.lut_: torch.Tensor | None = None
        self._lut_only = False  # fitted by fit_lut: no ridge prototypes, set_weight refuses
        self.lut_q_: lut.QuantizedLut | None = None
        self._lut_q_table: torch.Tensor | None = None
        self._packed: lut.PackedLut | None | bool = False  # False: not made yet (see _decode)
        # what the derived tables were made from (see _refresh_derived)
        self._lut_source: torch.Tensor | None = None
        self._lut_q_source: torch.Tensor | None = None

    # ------------------------------------------------------------------ config
    def get_config(self) -> dict[str, Any]:
        """Constructor arguments, enough to rebuild an unfitted twin."""
        return {key: getattr(self, key) for key in _CONFIG_KEYS}

    def _new_encoder(self) -> Encoder:
        """An unfitted encoder of this estimator's settings."""
        common = {"ncodebooks": self.ncodebooks, "nprototypes": self.nprototypes, "ridge": self.ridge}
        if self.encoder == "tree":
            common.update(ncandidates=self.ncandidates, hash_objective=self.hash_objective)
        # create_encoder names an option the encoder does not take (a TypeError otherwise)
        return create_encoder(self.encoder, **common, **self.encoder_options)

    # the fitted encoder's state, under the names the estimator has always had
    @property
    def split_dims_(self) -> torch.Tensor | None:
        return None if self.encoder_ is None else self.encoder_.split_dims_

    @property
    def thresholds_(self) -> torch.Tensor | None:
        return None if self.encoder_ is None else self.encoder_.thresholds_

    @property
    def prototypes_(self) -> torch.Tensor | None:
        return None if self.encoder_ is None else self.encoder_.prototypes_

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"MaddnessMatmul({args})"

    @property
    def input_dim(self) -> int | None:
        """D, the number of columns of A (None before fitting)."""
        return None if self.prototypes_ is None else self.prototypes_.shape[2]

    @property
    def output_dim(self) -> int | None:
        """M, the number of columns of B (None before ``set_weight``)."""
        return None if self.lut_ is None else self.lut_.shape[2]

    # ------------------------------------------------------------------ learning
    def fit(self, A_train: ArrayLike, B: ArrayLike) -> MaddnessMatmul:
        """Learn the hash and prototypes from the rows of ``A_train`` (N, D), then the LUT of B (D, M)."""
        self._check_weight(B, as_matrix(A_train, "A_train", check_finite=False).shape[1])
        return self.fit_encoder(A_train, B).set_weight(B)

    def fit_encoder(self, A_train: ArrayLike, B: ArrayLike | None = None) -> MaddnessMatmul:
        """Learn the hash trees and prototypes from the rows of ``A_train`` (N, D).

        ``B`` (D, M) is only read by encoders whose objective is the product (the tree with
        ``hash_objective="output"``); no LUT is built here.
        """
        rows = as_matrix(A_train, "A_train").float()
        weight = None
        if self.hash_objective == "output" and B is None:
            raise ValueError('hash_objective="output" needs the weight: fit_encoder(A_train, B)')
        if B is not None:
            weight = self._check_weight(B, rows.shape[1]).float().to(rows.device)
        # autocast would run the ridge regression in reduced precision and round the result
        with torch.autocast(rows.device.type, enabled=False):
            self.encoder_ = self._new_encoder().fit(rows, weight)
        self._lut_only = False
        self.lut_ = None
        self.lut_q_ = None
        self._lut_q_table = None
        self._packed = False
        return self

    def fit_lut(self, A_train: ArrayLike, B: ArrayLike) -> MaddnessMatmul:
        """:meth:`fit` for one fixed B, with the ridge step solved for the LUT directly.

        The table equals ``fit(A_train, B)``'s up to float64 rounding
        (:func:`maddnet.amm.prototypes.ridge_lut`: M right-hand sides instead of D), so where
        M < D it is cheaper (layer conversion uses it: a 3x3 conv has D = 9 Cin). The
        prototypes are never solved: ``prototypes_`` keep the encoder's initial ones (leaf
        means) and :meth:`set_weight` refuses; fit again for another B. Without a ridge step
        (``ridge=None``) or where M >= D this is :meth:`fit`.
        """
        rows = as_matrix(A_train, "A_train").float()
        weight = self._check_weight(B, rows.shape[1]).float().to(rows.device)
        if self.ridge is None or weight.shape[1] >= weight.shape[0]:
            return self.fit(A_train, B)
        with torch.autocast(rows.device.type, enabled=False):  # float64 solve, float32 table
            encoder = self._new_encoder()
            codes = encoder.fit_codes(rows, weight)
            table = prototype_fit.ridge_lut(rows, codes, encoder.prototypes_, self.ridge, weight)
        self.encoder_ = encoder
        self._set_lut(table)
        self._lut_only = True
        return self

    def set_weight(self, B: ArrayLike) -> MaddnessMatmul:
        """Build the LUTs of weight ``B`` (D, M) for the learned encoder."""
        self._require_encoder()
        if self._lut_only:
            raise ValueError(
                "this estimator was fitted with fit_lut: its LUT was solved for one B and its ridge "
                "prototypes were never formed; call fit(A_train, B) to change the weight"
            )
        weight = self._check_weight(B, self.input_dim)
        with torch.autocast(self.prototypes_.device.type, enabled=False):  # an exact float32 LUT
            self._set_lut(lut.build_lut(self.prototypes_, weight.to(self.prototypes_.device)))
        return self

    def _set_lut(self, table: torch.Tensor) -> None:
        self.lut_ = table
        self._packed = False
        if self.lut_bits is None:
            self.lut_q_, self._lut_q_table = None, None
        else:
            self.lut_q_ = lut.quantize_lut(table, self.lut_bits, self.lut_granularity)
            self._lut_q_table = self.lut_q_.sum_table()
        self._remember_sources()

    def _remember_sources(self) -> None:
        """Snapshot what the derived tables were made from (CPU only, see ``unchanged_since``)."""
        on_cpu = self.lut_ is not None and self.lut_.device.type == "cpu"
        self._lut_source = self.lut_.clone() if on_cpu and self.lut_q_ is not None else None
        self._lut_q_source = self.lut_q_.values.clone() if on_cpu and self.lut_q_ is not None else None

    def _refresh_derived(self) -> None:
        """Re-derive the integer LUT from ``lut_``, and the sum / packed tables from ``lut_q_``,
        when their values changed since they were made (in-place edits of the fitted
        tensors included), so decoding always follows ``lut_``."""
        if self.lut_q_ is None:
            return
        if not lut.unchanged_since(self.lut_, self._lut_source):
            self._set_lut(self.lut_)
        elif not lut.unchanged_since(self.lut_q_.values, self._lut_q_source):
            self._lut_q_table, self._packed = self.lut_q_.sum_table(), False
            self._remember_sources()

    @staticmethod
    def _check_weight(B: ArrayLike, ndims: int) -> torch.Tensor:
        weight = as_matrix(B, "B")
        if weight.shape[0] != ndims:
            raise ValueError(f"B has {weight.shape[0]} rows but A has {ndims} columns (D); B must be (D, M)")
        return weight

    # ------------------------------------------------------------------ inference
    def encode(self, A: ArrayLike) -> ArrayLike:
        """Codes of the rows of ``A`` (N, D): (N, C) uint8, one leaf index per codebook."""
        rows = self._check_rows(A)
        return like_input(self.encoder_.encode(rows), A)

    def decode(self, codes: ArrayLike) -> ArrayLike:
        """Sum the LUT entries that ``codes`` (N, C) select: (N, M) float32."""
        self._require_weight()
        tensor = torch.from_numpy(np.asarray(codes)) if isinstance(codes, np.ndarray) else codes
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
            raise ValueError(f"codes must be a 2-D (N, C) array, got {getattr(codes, 'shape', codes)}")
        if tensor.shape[1] != self.ncodebooks:
            raise ValueError(f"codes has {tensor.shape[1]} columns, expected C={self.ncodebooks}")
        if tensor.is_floating_point() or tensor.is_complex():
            raise TypeError(f"codes must be integers, got dtype {tensor.dtype}")
        if tensor.numel() and (int(tensor.min()) < 0 or int(tensor.max()) >= self.nprototypes):
            raise ValueError(f"codes must lie in [0, {self.nprototypes}), got values outside")
        return like_input(self._decode(tensor.to(self.lut_.device)), codes)

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        if self.lut_q_ is None:
            return lut.lut_sum(codes, self.lut_)
        self._refresh_derived()
        if self._packed is False:  # made on first use after every change of the LUT
            self._packed = lut.pack_lut(self.lut_q_)
        if self._packed is not None and codes.device.type == "cpu":
            # numba uint16 LUT sum: the same result as quantized_lut_sum, bit for bit (codes
            # come from the encoder or were checked by decode)
            return lut.packed_lut_sum(codes, self._packed, check_codes=False)
        return lut.quantized_lut_sum(codes, self.lut_q_, self._lut_q_table)

    def predict(self, A: ArrayLike) -> ArrayLike:
        """Approximate ``A @ B`` for ``A`` (N, D): (N, M) float32, same kind as ``A``."""
        self._require_weight()
        rows = self._check_rows(A)
        return like_input(self._decode(self.encoder_.encode(rows)), A)

    __call__ = predict

    def _check_rows(self, A: ArrayLike) -> torch.Tensor:
        self._require_encoder()
        rows = as_matrix(A, "A", check_finite=False)
        if rows.shape[1] != self.input_dim:
            raise ValueError(f"A has {rows.shape[1]} columns, the estimator was fit with D={self.input_dim}")
        if rows.device != self.prototypes_.device:
            raise ValueError(
                f"A is on {rows.device} but the estimator is on {self.prototypes_.device}; "
                "move one of them (estimator.to(device))"
            )
        if rows.device.type != "cpu":  # the CPU encoder checks the values it reads itself
            check_all_finite(rows, "A")
        return rows

    def _require_encoder(self) -> None:
        if self.encoder_ is None:
            raise NotFittedError("MaddnessMatmul is not fitted: call fit() or fit_encoder() first")

    def _require_weight(self) -> None:
        self._require_encoder()
        if self.lut_ is None:
            raise NotFittedError("no weight set: call fit(A, B) or set_weight(B) first")

    # ------------------------------------------------------------------ state
    def to(self, device: torch.device | str) -> MaddnessMatmul:
        """Move every fitted tensor to ``device`` (in place); returns self."""
        if self.encoder_ is not None:
            self.encoder_.to(device)
        for name in ("lut_", "_lut_q_table"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        if self.lut_q_ is not None:
            q = self.lut_q_
            self.lut_q_ = lut.QuantizedLut(
                q.values.to(device), q.offsets.to(device), q.scale.to(device), q.bits
            )
        self._packed = False
        self._remember_sources()
        return self

    def state_dict(self) -> dict[str, Any]:
        """Config and fitted tensors; :meth:`load_state_dict` restores identical outputs."""
        state: dict[str, Any] = {"config": self.get_config()}
        if self.encoder_ is not None:
            state.update(self.encoder_.state_dict())  # the tree: split_dims, thresholds, prototypes
        if self.lut_ is not None:
            state["lut"] = self.lut_
        if self._lut_only:
            state["lut_only"] = True
        if self.lut_q_ is not None:
            state.update(
                lut_q_values=self.lut_q_.values,
                lut_q_offsets=self.lut_q_.offsets,
                lut_q_scale=self.lut_q_.scale,
            )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> MaddnessMatmul:
        """Restore from :meth:`state_dict`; the config must match this estimator's."""
        config = state.get("config")
        if config is None or {**_CONFIG_DEFAULTS, **config} != self.get_config():
            raise ValueError(f"state was saved with config {config}, this estimator has {self.get_config()}")
        self.encoder_ = self._new_encoder().load_state_dict(state)
        self._lut_only = bool(state.get("lut_only", False))
        self.lut_, self.lut_q_, self._lut_q_table = None, None, None
        self._packed = False
        if "lut" in state:
            self.lut_ = state["lut"].float()
            if self.lut_bits is not None:
                missing = {"lut_q_values", "lut_q_offsets", "lut_q_scale"} - state.keys()
                if missing:
                    raise ValueError(f"state has a LUT but misses its quantised form: {sorted(missing)}")
                self.lut_q_ = lut.QuantizedLut(
                    state["lut_q_values"], state["lut_q_offsets"], state["lut_q_scale"], self.lut_bits
                )
                self._lut_q_table = self.lut_q_.sum_table()
        self._remember_sources()
        return self

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`state_dict` to ``path`` with ``torch.save``, atomically (an
        interrupted or failed write leaves no truncated file; a full disk raises
        :class:`OSError` naming ``path``)."""
        atomic_torch_save(self.state_dict(), path, "MaddnessMatmul state")

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device | None = None) -> MaddnessMatmul:
        """Rebuild an estimator saved with :meth:`save` (safe ``weights_only`` loading)."""
        from maddnet.models.weights import read_checkpoint

        state = read_checkpoint(path, map_location=map_location, weights_only=True)
        if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
            raise ValueError(f"{path} is not an estimator saved by MaddnessMatmul.save")
        return cls(**state["config"]).load_state_dict(state)
