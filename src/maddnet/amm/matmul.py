"""``MaddnessMatmul``: the approximate matrix product as a scikit-learn-like estimator."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from . import hashing, lut, prototypes
from .checks import ArrayLike, as_matrix, check_all_finite, check_nprototypes, like_input

_CONFIG_KEYS = (
    "ncodebooks",
    "nprototypes",
    "lut_bits",
    "ridge",
    "ncandidates",
    "lut_granularity",
    "hash_objective",
)
HASH_OBJECTIVES = ("input", "output")


class NotFittedError(RuntimeError):
    """Raised when an estimator is used before ``fit`` / ``fit_encoder`` / ``set_weight``."""


class MaddnessMatmul:
    """Approximate ``A @ B`` with MADDness: hash each row of A, add up LUT entries.

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

    Fitted attributes (torch tensors on the device of the training data):
        split_dims_ (C, log2 K) int64, thresholds_ (C, K-1) float32 (heap order),
        prototypes_ (C, K, D) float32, lut_ (C, K, M) float32 and, when quantised,
        lut_q_ (a :class:`~maddnet.amm.lut.QuantizedLut`).
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
        self.split_dims_: torch.Tensor | None = None
        self.thresholds_: torch.Tensor | None = None
        self.prototypes_: torch.Tensor | None = None
        self.lut_: torch.Tensor | None = None
        self.lut_q_: lut.QuantizedLut | None = None
        self._lut_q_table: torch.Tensor | None = None
        self._packed: lut.PackedLut | None | bool = False  # False: not made yet (see _decode)

    # ------------------------------------------------------------------ config
    def get_config(self) -> dict[str, Any]:
        """Constructor arguments, enough to rebuild an unfitted twin."""
        return {key: getattr(self, key) for key in _CONFIG_KEYS}

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

        ``B`` (D, M) is only read by ``hash_objective="output"``; no LUT is built here.
        """
        rows = as_matrix(A_train, "A_train").float()
        weight = None
        if self.hash_objective == "output":
            if B is None:
                raise ValueError('hash_objective="output" needs the weight: fit_encoder(A_train, B)')
            weight = self._check_weight(B, rows.shape[1]).float().to(rows.device)
        nrows, ndims = rows.shape
        bounds = hashing.subspace_bounds(ndims, self.ncodebooks)
        if nrows < self.nprototypes:
            raise ValueError(
                f"A_train has {nrows} rows; learning a tree with K={self.nprototypes} leaves "
                f"needs at least {self.nprototypes}"
            )
        trees = [
            hashing.learn_tree(
                rows[:, start:stop],
                self.depth,
                self.ncandidates,
                targets=None if weight is None else rows[:, start:stop] @ weight[start:stop],
            )
            for start, stop in bounds
        ]
        starts = torch.tensor([start for start, _ in bounds], device=rows.device)
        self.split_dims_ = torch.stack([t.split_dims for t in trees]) + starts[:, None]
        self.thresholds_ = torch.stack([t.thresholds for t in trees])
        initial = prototypes.leaf_mean_prototypes([t.leaf_means for t in trees], bounds, ndims)
        if self.ridge is None:
            self.prototypes_ = initial
        else:
            codes = torch.stack([t.leaves for t in trees], dim=1)
            self.prototypes_ = prototypes.ridge_prototypes(rows, codes, initial, self.ridge)
        self.lut_ = None
        self.lut_q_ = None
        self._lut_q_table = None
        self._packed = False
        return self

    def set_weight(self, B: ArrayLike) -> MaddnessMatmul:
        """Build the LUTs of weight ``B`` (D, M) for the learned encoder."""
        self._require_encoder()
        weight = self._check_weight(B, self.input_dim)
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
        return like_input(hashing.encode(rows, self.split_dims_, self.thresholds_), A)

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
        if self._packed is False:  # made on first use after every change of the LUT
            self._packed = lut.pack_lut(self.lut_q_)
        if self._packed is not None and codes.device.type == "cpu":
            # numba uint16 LUT sum: the same result as quantized_lut_sum, bit for bit
            return lut.packed_lut_sum(codes, self._packed)
        return lut.quantized_lut_sum(codes, self.lut_q_, self._lut_q_table)

    def predict(self, A: ArrayLike) -> ArrayLike:
        """Approximate ``A @ B`` for ``A`` (N, D): (N, M) float32, same kind as ``A``."""
        self._require_weight()
        rows = self._check_rows(A)
        codes = hashing.encode(rows, self.split_dims_, self.thresholds_)
        return like_input(self._decode(codes), A)

    __call__ = predict

    def _check_rows(self, A: ArrayLike) -> torch.Tensor:
        self._require_encoder()
        rows = as_matrix(A, "A", check_finite=False)
        if rows.shape[1] != self.input_dim:
            raise ValueError(f"A has {rows.shape[1]} columns, the estimator was fit with D={self.input_dim}")
        if rows.device != self.split_dims_.device:
            raise ValueError(
                f"A is on {rows.device} but the estimator is on {self.split_dims_.device}; "
                "move one of them (estimator.to(device))"
            )
        if rows.device.type != "cpu":  # the CPU encoder checks the values it reads itself
            check_all_finite(rows, "A")
        return rows

    def _require_encoder(self) -> None:
        if self.split_dims_ is None:
            raise NotFittedError("MaddnessMatmul is not fitted: call fit() or fit_encoder() first")

    def _require_weight(self) -> None:
        self._require_encoder()
        if self.lut_ is None:
            raise NotFittedError("no weight set: call fit(A, B) or set_weight(B) first")

    # ------------------------------------------------------------------ state
    def to(self, device: torch.device | str) -> MaddnessMatmul:
        """Move every fitted tensor to ``device`` (in place); returns self."""
        for name in ("split_dims_", "thresholds_", "prototypes_", "lut_", "_lut_q_table"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        if self.lut_q_ is not None:
            q = self.lut_q_
            self.lut_q_ = lut.QuantizedLut(
                q.values.to(device), q.offsets.to(device), q.scale.to(device), q.bits
            )
        self._packed = False
        return self

    def state_dict(self) -> dict[str, Any]:
        """Config and fitted tensors; :meth:`load_state_dict` restores identical outputs."""
        state: dict[str, Any] = {"config": self.get_config()}
        for name in ("split_dims", "thresholds", "prototypes", "lut"):
            value = getattr(self, name + "_")
            if value is not None:
                state[name] = value
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
        if config != self.get_config():
            raise ValueError(f"state was saved with config {config}, this estimator has {self.get_config()}")
        missing = {"split_dims", "thresholds", "prototypes"} - state.keys()
        if missing:
            raise ValueError(f"state is missing fitted tensors: {sorted(missing)}")
        self.split_dims_ = state["split_dims"].long()
        self.thresholds_ = state["thresholds"].float()
        self.prototypes_ = state["prototypes"].float()
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
        return self

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`state_dict` to ``path`` with ``torch.save``."""
        torch.save(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device | None = None) -> MaddnessMatmul:
        """Rebuild an estimator saved with :meth:`save` (safe ``weights_only`` loading)."""
        state = torch.load(path, map_location=map_location, weights_only=True)
        return cls(**state["config"]).load_state_dict(state)
