"""Torch forms of encoders: what a MADD layer holds as ``layer.encoder``.

An :class:`EncoderModule` is the trainable twin of a fitted
:class:`maddnet.amm.encoders.Encoder` (same registry name). The layer gathers the input
values the encoder reads, ``values`` (N, C, R) with ``values[n, c, r] =
x_n[read_columns[c, r]]``, and the module does the rest: :meth:`~EncoderModule.encode_values`
(hard codes) and :meth:`~EncoderModule.surrogate_backward` (the gradients of a smooth
stand-in for the hard encoding: straight-through, the forward pass is always hard).

A new trainable encoder is an ``Encoder`` subclass (``maddnet.amm``) plus one subclass of
:class:`EncoderModule` here, registered with :func:`register_encoder_module`; layers,
conversion, saving and rebuilding then work by name.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..amm.checks import check_nprototypes
from ..amm.encoders import Encoder, EncoderCost, NearestPrototypeEncoder, TreeEncoder, nearest
from ..amm.encoders.tree import tree_cost
from . import _nearest_kernel, functional
from .spec import SURROGATES, LayerSpec


class EncoderModule(nn.Module):
    """Base class of the encoders MADD layers hold (see the module docstring).

    Subclasses set ``name`` (the encoder's registry name), keep what they learned as
    parameters/buffers created in ``__init__`` from :meth:`get_config` alone (zeros until
    :meth:`load_encoder` or ``load_state_dict``), and implement the methods below.
    """

    name: ClassVar[str] = ""

    def __init__(self, ncodebooks: int, nprototypes: int) -> None:
        super().__init__()
        self.depth = check_nprototypes(nprototypes)
        self.ncodebooks, self.nprototypes = int(ncodebooks), int(nprototypes)

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-friendly); ``type(self)(**config)`` rebuilds the skeleton."""
        return {"ncodebooks": self.ncodebooks, "nprototypes": self.nprototypes}

    @classmethod
    def from_spec(
        cls, in_dim: int, ncodebooks: int, spec: LayerSpec, device: torch.device | str | None = None
    ):
        """A zero-initialised module for rows of D = ``in_dim`` values, C = ``ncodebooks``
        codebooks, under ``spec``."""
        raise NotImplementedError

    @property
    def read_columns(self) -> torch.Tensor:
        """(C, R) int64: the input columns each codebook reads (the layer gathers them)."""
        raise NotImplementedError

    def load_encoder(self, encoder: Encoder, rows: torch.Tensor | None, spec: LayerSpec) -> None:
        """Copy a fitted encoder's state in (in place); ``rows`` (N, D) are its training rows."""
        raise NotImplementedError

    def encode_values(self, values: torch.Tensor) -> torch.Tensor:
        """Hard codes (N, C) uint8 of gathered values (N, C, R)."""
        raise NotImplementedError

    def surrogate_tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors :meth:`surrogate_backward` reads; the trainable ones among them get
        gradients."""
        raise NotImplementedError

    def surrogate_backward(
        self,
        values: torch.Tensor,
        codes: torch.Tensor,
        tensors: tuple[torch.Tensor, ...],
        table: torch.Tensor,
        grad_out: torch.Tensor,
        needs: tuple[bool, ...],
    ) -> tuple[torch.Tensor | None, tuple[torch.Tensor | None, ...]]:
        """Surrogate gradients of the encoding.

        The gradient w.r.t. the score of code k of codebook c is ``grad_out[n] . table[c, k]``
        (the LUT sum is linear in the scores); it comes as its two factors so that an
        encoder forms it in row chunks, or only at the entries it needs.

        Args:
            values: (N, C, R) gathered input values (those of the forward pass).
            codes: (N, C) the forward pass's hard codes.
            tensors: :meth:`surrogate_tensors` as the forward pass saw them.
            table: (C, K, M) the LUT the forward pass read (de-quantised under QAT).
            grad_out: (N, M) gradient of the loss w.r.t. the LUT sum.
            needs: whether each of ``(values, *tensors)`` needs its gradient.

        Returns:
            (grad_values (N, C, R) or None, one gradient or None per tensor).
        """
        raise NotImplementedError

    def cost(self) -> EncoderCost:
        """Operations to encode one row (all codebooks)."""
        raise NotImplementedError


class TreeEncoderModule(EncoderModule):
    """The MADDness hash trees (:class:`maddnet.amm.encoders.TreeEncoder`) in a layer.

    * ``split_dims`` (buffer, (C, L) int64): the input column read at each tree level
      (its ``read_columns``). Not trained: a column choice has no gradient.
    * ``thresholds`` (Parameter, (C, K-1) float32, heap order).
    * ``temperature`` (buffer, (C, L)): tau of the surrogate per tree level, in the units of
      that level's split column.
    * ``surrogate``: "soft" (soft decision tree over all nodes,
      :func:`maddnet.nn.functional.tree_surrogate_grads`), "soft-bf16" (the same, its
      leaf-score product in bfloat16) or "path" (only the nodes on each row's hard path,
      :func:`maddnet.nn.functional.path_surrogate_grads`).
    """

    name: ClassVar[str] = "tree"

    def __init__(
        self,
        ncodebooks: int,
        nprototypes: int = 16,
        surrogate: str = "soft",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(ncodebooks, nprototypes)
        if surrogate not in SURROGATES:
            raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
        self.surrogate = surrogate
        kw = {"device": device}
        self.register_buffer("split_dims", torch.zeros(ncodebooks, self.depth, dtype=torch.int64, **kw))
        self.thresholds = nn.Parameter(torch.zeros(ncodebooks, nprototypes - 1, **kw))
        self.register_buffer("temperature", torch.ones(ncodebooks, self.depth, **kw))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "surrogate": self.surrogate}

    @classmethod
    def from_spec(
        cls, in_dim: int, ncodebooks: int, spec: LayerSpec, device: torch.device | str | None = None
    ):
        return cls(ncodebooks, spec.nprototypes, spec.surrogate, device=device)

    @property
    def read_columns(self) -> torch.Tensor:
        return self.split_dims

    def load_encoder(self, encoder: Encoder, rows: torch.Tensor | None, spec: LayerSpec) -> None:
        """Take split dims and thresholds from a fitted :class:`TreeEncoder`.

        The surrogate temperature per tree level is ``spec.temperature`` times the standard
        deviation of that level's split column on ``rows`` (N, D), or ``spec.temperature``
        as is without rows.
        """
        if not isinstance(encoder, TreeEncoder):
            raise TypeError(f"TreeEncoderModule loads a TreeEncoder, got {type(encoder).__name__}")
        with torch.no_grad():
            self.split_dims.copy_(encoder.split_dims_)
            self.thresholds.copy_(encoder.thresholds_)
            tau = torch.full_like(self.temperature, float(spec.temperature))
            if rows is not None:
                spread = rows.float().index_select(1, encoder.split_dims_.reshape(-1).to(rows.device))
                spread = spread.std(0).reshape(tau.shape).to(tau.device)
                spread = torch.where(torch.isfinite(spread) & (spread > 0), spread, 1.0)
                tau = tau * spread
            self.temperature.copy_(tau)

    def encode_values(self, values: torch.Tensor) -> torch.Tensor:
        return functional.encode_values(values, self.thresholds)

    def surrogate_tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.thresholds, self.temperature)

    def surrogate_backward(self, values, codes, tensors, table, grad_out, needs):
        return functional.tree_backward(self.surrogate, values, codes, tensors, table, grad_out, needs)

    def cost(self) -> EncoderCost:
        return tree_cost(self.ncodebooks, self.depth)

    def extra_repr(self) -> str:
        return f"C={self.ncodebooks}, K={self.nprototypes}, surrogate={self.surrogate!r}"


# ---------------------------------------------------------------------- registry
ENCODER_MODULES: dict[str, type[EncoderModule]] = {}


def register_encoder_module(module: type[EncoderModule]) -> type[EncoderModule]:
    """Make ``module`` the torch form of the encoder registered as ``module.name``."""
    if not module.name:
        raise ValueError(f"{module.__name__}.name must be the registry name of its Encoder")
    ENCODER_MODULES[module.name] = module
    return module


def encoder_module_class(name: str) -> type[EncoderModule]:
    """The EncoderModule class of encoder ``name``; ValueError if it has none."""
    if name not in ENCODER_MODULES:
        raise ValueError(
            f"encoder {name!r} has no torch form for MADD layers; registered: {sorted(ENCODER_MODULES)} "
            "(register an EncoderModule with maddnet.nn.register_encoder_module)"
        )
    return ENCODER_MODULES[name]


register_encoder_module(TreeEncoderModule)


class GlobalTreeEncoderModule(TreeEncoderModule):
    """The whole-row hash trees (:class:`maddnet.amm.encoders.GlobalTreeEncoder`) in a layer:
    the tree's module (split columns anywhere in the row; same surrogates, same cost)."""

    name: ClassVar[str] = "tree-global"


class NearestPrototypeModule(EncoderModule):
    """A nearest-prototype encoder (:class:`maddnet.amm.encoders.NearestPrototypeEncoder`:
    "pq", "pq-l1", "pq-linf") in a layer.

    * ``centroids`` (Parameter, (C, K, W)): trained through the surrogate.
    * ``columns`` (buffer, (C, W) int64): the block columns read (narrower blocks repeat
      their last column; ``mask`` marks the real ones).
    * ``temperature`` (buffer, (C,)): tau of the soft-argmin surrogate
      ``softmax(-d(v, c_k) / tau)``, in the metric's distance units.

    The forward pass is the hard nearest centroid; the backward pass is the gradient of the
    soft-argmin's LUT sum (straight-through), computed with autograd of the metric's
    distance (for L-infinity a subgradient: the coordinate of the largest difference).
    """

    name: ClassVar[str] = ""
    metric: ClassVar[str] = "l2"

    def __init__(
        self, ncodebooks: int, nprototypes: int = 16, ndims: int = 1, device: torch.device | str | None = None
    ) -> None:
        super().__init__(ncodebooks, nprototypes)
        self.ndims = int(ndims)
        columns = nearest.block_columns(self.ndims, ncodebooks, device)
        self.register_buffer("columns", columns)
        self.register_buffer("mask", nearest.block_mask(columns))
        self.centroids = nn.Parameter(torch.zeros(ncodebooks, nprototypes, columns.shape[1], device=device))
        self.register_buffer("temperature", torch.ones(ncodebooks, device=device))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "ndims": self.ndims}

    @classmethod
    def from_spec(
        cls, in_dim: int, ncodebooks: int, spec: LayerSpec, device: torch.device | str | None = None
    ):
        return cls(ncodebooks, spec.nprototypes, in_dim, device=device)

    @property
    def read_columns(self) -> torch.Tensor:
        return self.columns

    def load_encoder(self, encoder: Encoder, rows: torch.Tensor | None, spec: LayerSpec) -> None:
        """Take the centroids of a fitted encoder of the same metric. The surrogate's tau
        per codebook is ``spec.temperature`` times the mean distance of ``rows`` (N, D) to
        their nearest centroid (``spec.temperature`` as is without rows)."""
        if not isinstance(encoder, NearestPrototypeEncoder) or encoder.metric != self.metric:
            raise TypeError(
                f"{type(self).__name__} loads a {self.name!r} encoder, got {type(encoder).__name__}"
            )
        with torch.no_grad():
            self.centroids.copy_(encoder.centroids_)
            tau = torch.full_like(self.temperature, float(spec.temperature))
            if rows is not None:
                values = rows.float()[:, self.columns.to(rows.device)]
                nearest_d = nearest.distances(
                    values, encoder.centroids_.to(rows.device), self.mask.to(rows.device), self.metric
                )
                scale = nearest_d.amin(-1).mean(0).to(tau.device)
                tau = tau * torch.where(torch.isfinite(scale) & (scale > 0), scale, 1.0)
            self.temperature.copy_(tau)

    def encode_values(self, values: torch.Tensor) -> torch.Tensor:
        return nearest.nearest_codes(values, self.centroids.detach(), self.mask, self.metric).to(torch.uint8)

    def surrogate_tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.centroids, self.temperature)

    def soft_scores(
        self, values: torch.Tensor, centroids: torch.Tensor, temperature: torch.Tensor
    ) -> torch.Tensor:
        """The surrogate's code scores ``softmax_k(-d(v_c, centroid_ck) / tau_c)``: (N, C, K)."""
        dist = nearest.distances(values, centroids, self.mask, self.metric)
        return torch.softmax(-dist / temperature[None, :, None], dim=-1)

    def surrogate_backward(self, values, codes, tensors, table, grad_out, needs):
        centroids, temperature = tensors
        if not (needs[0] or needs[1]):
            return None, (None, None)
        if _nearest_kernel_applies(self.metric, values, centroids, grad_out):
            return self._fused_backward(values, centroids, temperature, table, grad_out, needs)
        with torch.enable_grad():
            inputs = (values.detach().requires_grad_(needs[0]), centroids.detach().requires_grad_(needs[1]))
            wanted = [x for x in inputs if x.requires_grad]
            scores = self.soft_scores(inputs[0], inputs[1], temperature.detach())
            grad_scores = torch.einsum("nm,ckm->nck", grad_out.to(scores.dtype), table.to(scores.dtype))
            grads = iter(torch.autograd.grad(scores, wanted, grad_scores))
        grad_values = next(grads) if needs[0] else None
        grad_centroids = next(grads) if needs[1] else None
        return grad_values, (grad_centroids, None)

    def _fused_backward(self, values, centroids, temperature, table, grad_out, needs):
        """:meth:`surrogate_backward` by the numba kernel (CPU, float32, L1 / L2): no
        (N, C, K, W) tensor is formed; the same gradients as autograd to float32 rounding."""
        grad_scores = torch.einsum("nm,ckm->nck", grad_out, table.float())
        grad_values, parts = _nearest_kernel.soft_argmin_backward(
            values.detach().contiguous().numpy(),
            centroids.detach().contiguous().numpy(),
            self.mask.to(torch.float32).contiguous().numpy(),
            (1.0 / temperature.detach().float()).contiguous().numpy(),
            grad_scores.contiguous().numpy(),
            _nearest_kernel.METRIC_CODES[self.metric],
            bool(needs[0]),
            bool(needs[1]),
            _nearest_kernel.BLOCK,
        )
        grad_values = torch.from_numpy(grad_values) if needs[0] else None
        grad_centroids = torch.from_numpy(parts.sum(0)).transpose(1, 2).contiguous() if needs[1] else None
        return grad_values, (grad_centroids, None)

    def cost(self) -> EncoderCost:
        return nearest.nearest_cost(self.metric, self.ndims, self.ncodebooks, self.nprototypes)

    def extra_repr(self) -> str:
        return f"C={self.ncodebooks}, K={self.nprototypes}, metric={self.metric!r}"


def _nearest_kernel_applies(metric: str, values, centroids, grad_out) -> bool:
    """Whether the fused CPU kernel computes this surrogate backward (else autograd)."""
    tensors = (values, centroids, grad_out)
    return (
        metric in _nearest_kernel.METRIC_CODES
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and values.dim() == 3
    )


class PQModule(NearestPrototypeModule):
    """Torch form of the "pq" encoder (L2)."""

    name: ClassVar[str] = "pq"
    metric: ClassVar[str] = "l2"


class L1Module(NearestPrototypeModule):
    """Torch form of the "pq-l1" encoder."""

    name: ClassVar[str] = "pq-l1"
    metric: ClassVar[str] = "l1"


class LinfModule(NearestPrototypeModule):
    """Torch form of the "pq-linf" encoder."""

    name: ClassVar[str] = "pq-linf"
    metric: ClassVar[str] = "linf"


for _module in (GlobalTreeEncoderModule, PQModule, L1Module, LinfModule):
    register_encoder_module(_module)
