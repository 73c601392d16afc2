"""Drop-in MADD layers: ``MaddLinear`` and ``MaddConv2d``.

A MADD layer holds an encoder and the LUTs of its weight:

* ``encoder`` (an :class:`~maddnet.nn.encoders.EncoderModule` submodule): maps the layer's
  rows to codes; for the MADDness tree (:class:`~maddnet.nn.encoders.TreeEncoderModule`)
  ``encoder.split_dims`` (C, L) (columns of the layer's rows; for a conv, columns of the
  unfolded patch in ``F.unfold`` order; not trained), ``encoder.thresholds`` (Parameter,
  (C, K-1), heap order) and ``encoder.temperature`` (the surrogate's tau per tree level).
  ``layer.split_dims`` / ``layer.thresholds`` / ``layer.temperature`` are aliases.
* ``lut`` (Parameter, (C, K, M) float32): ``lut[c, k] = prototype[c, k] @ weight``.
* ``bias`` (Parameter (M,) or None).
* when ``lut_bits`` is set: ``lut_q_values`` (uint8 (C, K, M)), ``lut_q_offsets`` (C, M)
  and ``lut_q_scale`` (M,) buffers, the integer LUT inference uses
  (see :class:`maddnet.amm.lut.QuantizedLut`). They are re-derived from ``lut`` whenever
  ``lut`` changed (e.g. after training steps) before they are used or saved.
* ``spec``: the :class:`~maddnet.nn.LayerSpec` it was built with (K, encoder, LUT bits, QAT,
  surrogate, ...), saved in its config.

Which LUT the forward pass reads: the integer one in eval mode (when ``lut_bits`` is
set), and in train mode too when ``qat`` is on (fake quantisation with a straight-through
gradient to ``lut``); otherwise the float ``lut``. Without gradients (``torch.no_grad``
or nothing requiring grad) the fast path runs: encode + LUT sum. With gradients,
:func:`maddnet.nn.functional.madd_lut_encoded` runs the same encoding and LUT sum and adds
the backward pass (exact LUT gradient, the encoder's surrogate for the rest). Where a
fused kernel exists for a (layer type, encoder type) pair it is registered with
:func:`register_fast_path` and used instead (for the tree on CPU: the fused conv kernels,
and for ``MaddLinear`` eval with an integer LUT the packed uint8 LUT-sum kernel of
``MaddnessMatmul``, :class:`TreeLinearFastPath`).

``drop_float_lut()`` (or ``save_converted(..., for_inference=True)``) makes a layer
inference-only: the float ``lut`` is freed and not saved, eval reads the integer LUT as
before; ``restore_float_lut()`` makes it trainable again.

A layer is built from its config alone (``type(layer).from_config(layer.get_config())``;
zeros until learned or loaded), so a saved converted model loads into a freshly built
skeleton. Checkpoints written before the encoder became a submodule (flat
``split_dims``/``thresholds``/``temperature`` keys, flat configs) load unchanged.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Protocol

import torch
from torch import nn
from torch.autograd import forward_ad

from ..amm import MaddnessMatmul, NotFittedError, hashing
from ..amm.hashing import NonFiniteInputError
from ..amm.lut import (
    PackedLut,
    QuantizedLut,
    lut_sum,
    pack_lut,
    packed_lut_sum,
    quantize_lut,
    quantized_lut_sum,
    unchanged_since,
)
from ..amm.prototypes import code_indices
from .encoders import TreeEncoderModule, encoder_module_class
from .functional import compute_dtype, encode_values, madd_lut_encoded, no_autocast, widen, widen_quantized
from .patches import (
    ConvGeometry,
    MaddConvFunction,
    conv_lut_forward,
    encode_patches,
    gather_patch_columns,
    nonfinite_tap,
)
from .spec import DEFAULT_TEMPERATURE, LayerSpec, spec_with

__all__ = [
    "DEFAULT_TEMPERATURE",
    "MaddConv2d",
    "MaddLayer",
    "MaddLinear",
    "MaddUnsupportedError",
    "register_fast_path",
]

# the layer-level state of the encoder before it became a submodule (format 1 checkpoints)
_LEGACY_ENCODER_KEYS = ("split_dims", "thresholds", "temperature")
# the flat config keys of format 1 plans that now live in the spec
_LEGACY_SPEC_KEYS = ("nprototypes", "lut_bits", "lut_granularity", "qat", "surrogate")


class MaddUnsupportedError(NotImplementedError):
    """Something PyTorch code does with an ``nn.Linear`` / ``nn.Conv2d`` (or with autograd)
    that a MADD layer refuses rather than compute a wrong value (docs/nn.md, "Drop-in
    contracts"): tracing, scripting, export, ``torch.func`` transforms, forward-mode AD,
    higher-order gradients, computing with ``.weight``."""


# torch >= 2.5 has is_exporting; on older versions that check is skipped
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)
_is_compiling = torch.compiler.is_compiling  # torch >= 2.3 (pyproject.toml)


def _keep_out_of_fused_paths(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook of every MADD layer.

    Being a hook, it makes the fused eval paths of ``nn.TransformerEncoderLayer`` /
    ``nn.MultiheadAttention`` (which skip calling their children when any has a hook) call
    the MADD layer. It also refuses the tracers that would record a wrong program: the
    encoding runs in numba / numpy, invisible to them, so ``torch.jit.trace`` would replay
    the traced input's codes for every input, and ``torch.export`` / ONNX / FX cannot see it;
    and the transforms it has no rules for (``torch.func``, forward-mode AD: a frozen layer
    would return no tangent, as if its output did not depend on its input).
    """
    name = type(module).__name__
    if torch.jit.is_tracing():
        raise MaddUnsupportedError(
            f"{name} cannot be traced with torch.jit.trace (or the TorchScript ONNX exporter): its "
            "encoding runs in numba/numpy kernels the tracer does not record, so the trace would "
            "replay the traced input's codes for every input. Run the module eagerly or with "
            "torch.compile."
        )
    if _is_exporting():
        raise MaddUnsupportedError(
            f"{name} cannot be exported with torch.export (or torch.onnx.export): its encoding runs "
            "in numba/numpy kernels on real data, which export's symbolic tracing cannot capture. "
            "Export the MADD layer's state instead (get_config, state_dict, quantized_lut())."
        )
    if _is_compiling():
        return None  # torch.compile (dynamo) breaks its graph around the kernels: outputs as eager
    if any(isinstance(arg, torch.fx.Proxy) for arg in args):
        raise MaddUnsupportedError(
            f"{name} cannot be symbolically traced by torch.fx: its forward branches on shapes and "
            "runs numba kernels. Keep it a leaf: a torch.fx.Tracer subclass whose is_leaf_module "
            "returns True for maddnet.nn.MaddLayer instances records it as one call_module node."
        )
    tensors = [arg for arg in args if isinstance(arg, torch.Tensor)]
    if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors):
        raise MaddUnsupportedError(
            f"{name} does not support torch.func transforms (vmap, grad, jvp, jacrev, ...): its "
            "encoding runs numba kernels on real tensors and its autograd functions have no "
            "functorch rules. Loop over the batch and use torch.autograd instead."
        )
    if forward_ad._current_level >= 0 and any(forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise MaddUnsupportedError(
            f"{name} does not support forward-mode AD (dual tensors, torch.autograd.forward_ad): "
            "the hard encoding has no tangent, and the layer's surrogate gradient exists for the "
            "backward pass only. Use backward-mode autograd."
        )
    return None


def _refuse_higher_order_grads(module: nn.Module, args: tuple, output: Any) -> None:
    """Forward hook of every MADD layer: marks its output so that a backward pass that builds
    a graph of the gradient (``create_graph=True``) raises instead of returning gradients
    that miss the (non-differentiable) MADD backward's part."""
    if isinstance(output, torch.Tensor) and output.requires_grad and torch.is_grad_enabled():
        output.register_hook(_SecondOrderGuard(type(module).__name__))


class _SecondOrderGuard:
    """Tensor hook on a MADD layer's output: during a backward pass grad mode is on exactly
    when it was asked to build a differentiable graph of the gradients (create_graph=True)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, grad: torch.Tensor) -> None:
        if torch.is_grad_enabled():
            raise MaddUnsupportedError(
                f"{self.name} does not support higher-order gradients (backward / autograd.grad "
                "with create_graph=True: gradient penalties, double backward, Hessian-vector "
                "products): the backward pass of a MADD layer (the exact LUT gradient and the "
                "encoder's straight-through surrogate) is not itself differentiable, so second "
                "derivatives through it would be silently wrong. Keep MADD layers out of the "
                "part of the model the penalty differentiates twice."
            )
        return None


class _NoDenseWeight(torch.Tensor):
    """What ``layer.weight`` of a MADD layer returns: a tensor with the dense layer's shape,
    dtype, device and ``requires_grad`` but no data, which refuses every computation.

    Model code and PyTorch internals read ``.weight`` of linear/conv children (e.g. the fused
    path checks of ``nn.TransformerEncoder``). Being a tensor subclass with
    ``__torch_function__`` it makes those checks refuse their fused paths (which would
    compute with the weight instead of calling the layer), and anything that does compute
    with it (``F.linear``, ``nn.init``, ``nn.MultiheadAttention`` with a MADD ``out_proj``)
    raises :class:`MaddUnsupportedError`.
    """

    @staticmethod
    def __new__(cls, owner: str, shape: tuple[int, ...], like: torch.Tensor):
        tensor = torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=like.dtype, device=like.device, requires_grad=like.requires_grad
        )
        tensor._owner = owner
        return tensor

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        return f"<no dense weight of {self._owner}: shape {tuple(self.shape)}, {self.dtype}, {self.device}>"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # explicit, so that torch.overrides.has_torch_function() sees this subclass
        return super().__torch_function__(func, types, args, kwargs or {})

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        owner = next((a._owner for a in args if isinstance(a, _NoDenseWeight)), "a MADD layer")
        raise MaddUnsupportedError(
            f"{owner} has no dense weight: it computes with an encoder and look-up tables "
            f"(layer.encoder, layer.lut), and its .weight is a data-less placeholder that refuses "
            f"every computation (here {func}). Call the layer instead of computing with its "
            "weight; modules that use a child's weight directly (e.g. nn.MultiheadAttention's "
            "out_proj) cannot hold a MADD layer there."
        )


class FastPath(Protocol):
    """Fused kernels for one (layer type, encoder type) pair; each method returns None
    where it does not apply (device, dtype, shape), and the general path runs instead."""

    def forward(self, layer: _MaddLayer, x: torch.Tensor, quantized: bool) -> torch.Tensor | None:
        """The whole no-grad forward (bias included)."""

    def codes(self, layer: _MaddLayer, x: torch.Tensor) -> torch.Tensor | None:
        """(N, C) codes straight from the input."""

    def train_forward(self, layer: _MaddLayer, x: torch.Tensor, quantized: bool) -> torch.Tensor | None:
        """The differentiable forward (bias included)."""


_FAST_PATHS: dict[tuple[type, type], FastPath] = {}


def register_fast_path(layer_type: type, encoder_type: type, path: FastPath) -> None:
    """Use ``path`` for layers of ``layer_type`` whose encoder is an ``encoder_type``."""
    _FAST_PATHS[(layer_type, encoder_type)] = path


def fast_path_for(layer: _MaddLayer) -> FastPath | None:
    """The registered fast path of the most specific matching (layer, encoder) types."""
    for layer_type in type(layer).__mro__:
        for encoder_type in type(layer.encoder).__mro__:
            path = _FAST_PATHS.get((layer_type, encoder_type))
            if path is not None:
                return path
    return None


class _MaddLayer(nn.Module):
    """Shared state and forward logic; subclasses gather the encoder's values from their input."""

    kind = "madd"
    # the dense layer type this MADD type replaces (see maddnet.nn.mapping)
    DENSE_TYPE: ClassVar[type[nn.Module]] = nn.Module
    # Hardware-exact inference (docs/hardware.md, "Hardware-exact inference"): a runtime mode,
    # not saved; set per model with maddnet.hw.set_hw_exact
    hw_exact: bool = False
    hw_accumulator_bits: int = 32
    hw_overflow: str = "refuse"

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        ncodebooks: int,
        spec: LayerSpec,
        bias: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("ncodebooks", ncodebooks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if ncodebooks > in_dim:
            raise ValueError(f"ncodebooks (C={ncodebooks}) cannot exceed the input dimension (D={in_dim})")
        self.in_dim, self.out_dim, self.ncodebooks = in_dim, out_dim, ncodebooks
        self._spec = spec
        kw = {"device": device}
        self.encoder = encoder_module_class(spec.encoder).from_spec(in_dim, ncodebooks, spec, device=device)
        nprototypes = spec.nprototypes
        self.lut = nn.Parameter(torch.zeros(ncodebooks, nprototypes, out_dim, **kw))
        self.bias = nn.Parameter(torch.zeros(out_dim, **kw)) if bias else None
        if spec.lut_bits is not None:
            self.register_buffer(
                "lut_q_values", torch.zeros(ncodebooks, nprototypes, out_dim, dtype=torch.uint8, **kw)
            )
            self.register_buffer("lut_q_offsets", torch.zeros(ncodebooks, out_dim, **kw))
            self.register_buffer("lut_q_scale", torch.ones(out_dim, **kw))
        # the float LUT the integer buffers were made from (not state: a cache check)
        self._quantized_source: torch.Tensor | None = None
        # (storage and versions of the integer buffers, their CPU kernel layout): packed_lut()
        self._packed_cache: tuple[tuple, PackedLut | None] | None = None
        # False after drop_float_lut(): an inference-only layer (the integer LUT is the state)
        self._float_lut = True
        # the name the layer has in its model (set by maddnet.nn.plan.replace_module, i.e. by
        # conversion, rebuilding and the passes), so that errors name the layer
        self.placed_as: str | None = None
        # Fused fast paths (nn.TransformerEncoderLayer, nn.MultiheadAttention in eval mode)
        # read their Linear children's .weight instead of calling them; they fall back to
        # calling each child when any submodule has a hook, so this hook keeps the MADD layer
        # in the computation (it also refuses tracers and transforms, see its docstring).
        self.register_forward_pre_hook(_keep_out_of_fused_paths)
        self.register_forward_hook(_refuse_higher_order_grads)

    # ------------------------------------------------------------------ drop-in contracts
    @property
    def weight(self) -> torch.Tensor:
        """No dense weight exists: a placeholder of the dense layer's weight shape, dtype,
        device and ``requires_grad`` that raises :class:`MaddUnsupportedError` on any
        computation (see :class:`_NoDenseWeight`)."""
        owner = f"{type(self).__name__}(D={self.in_dim}, M={self.out_dim})"
        return _NoDenseWeight(owner, self._dense_weight_shape(), self.lut)

    def _dense_weight_shape(self) -> tuple[int, ...]:
        return (self.out_dim, self.in_dim)

    def __prepare_scriptable__(self):
        raise MaddUnsupportedError(
            f"{type(self).__name__} cannot be compiled by torch.jit.script: its forward runs "
            "numba kernels and Python autograd functions TorchScript does not support. Run the "
            "module eagerly or with torch.compile."
        )

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_packed_cache", None)  # pickled by older maddnet
        self.__dict__.setdefault("_float_lut", True)
        # whole layers pickled by older maddnet lack the guard hooks
        if _keep_out_of_fused_paths not in self._forward_pre_hooks.values():
            self.register_forward_pre_hook(_keep_out_of_fused_paths)
        if _refuse_higher_order_grads not in self._forward_hooks.values():
            self.register_forward_hook(_refuse_higher_order_grads)

    # ------------------------------------------------------------------ settings
    @property
    def spec(self) -> LayerSpec:
        """The :class:`~maddnet.nn.LayerSpec` of this layer (K, encoder, LUT bits, QAT, ...)."""
        return self._spec

    @property
    def nprototypes(self) -> int:
        return self._spec.nprototypes

    @property
    def depth(self) -> int:
        return self.encoder.depth

    @property
    def lut_granularity(self) -> str:
        return self._spec.lut_granularity

    @property
    def lut_bits(self) -> int | None:
        return self._spec.lut_bits

    @lut_bits.setter
    def lut_bits(self, bits: int | None) -> None:
        if bits is not None and not hasattr(self, "lut_q_values"):
            raise ValueError(
                "this layer was built with float LUTs (lut_bits=None): it has no integer LUT buffers"
            )
        self._spec = self._spec.replace(lut_bits=bits)
        self._quantized_source = None

    @property
    def qat(self) -> bool:
        return self._spec.qat

    @qat.setter
    def qat(self, value: bool) -> None:
        self._spec = self._spec.replace(qat=bool(value))

    @property
    def surrogate(self) -> str:
        return self._spec.surrogate

    @surrogate.setter
    def surrogate(self, value: str) -> None:
        self._spec = self._spec.replace(surrogate=value)
        self.encoder.surrogate = value

    # the tree encoder's tensors under the names they had on the layer
    @property
    def split_dims(self) -> torch.Tensor:
        return self.encoder.split_dims

    @property
    def thresholds(self) -> nn.Parameter:
        return self.encoder.thresholds

    @property
    def temperature(self) -> torch.Tensor:
        return self.encoder.temperature

    # ------------------------------------------------------------------ config
    def get_config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-friendly); ``from_config`` rebuilds the skeleton.
        An inference-only layer (:meth:`drop_float_lut`) adds ``"float_lut": False``."""
        config = {"ncodebooks": self.ncodebooks, "bias": self.bias is not None, "spec": self._spec.to_dict()}
        if not self._float_lut:
            config["float_lut"] = False
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any], device: torch.device | str | None = None):
        """A zero-initialised layer of the given config (load a state_dict into it).

        Flat configs of plans saved before ``LayerSpec`` existed are migrated."""
        config = dict(config)
        float_lut = config.pop("float_lut", True)
        if "spec" in config:
            spec = LayerSpec.from_saved(config.pop("spec"))
        else:
            spec = LayerSpec.from_saved({key: config.pop(key) for key in _LEGACY_SPEC_KEYS if key in config})
        layer = cls(**config, spec=spec, device=device)
        if not float_lut:
            layer.drop_float_lut()
        return layer

    @property
    def encoder_reads(self) -> int:
        """Input values the encoder reads per row (4 C for the tree with K = 16)."""
        return self.encoder.cost().reads

    @property
    def lut_bytes(self) -> int:
        """Bytes of the LUT inference reads (integer when ``lut_bits`` is set)."""
        bits = 32 if self.lut_bits is None else self.lut_bits
        return math.ceil(self.ncodebooks * self.nprototypes * self.out_dim * bits / 8)

    # ------------------------------------------------------------------ learning
    @staticmethod
    def _dense_weight(dense: nn.Module) -> torch.Tensor:
        """The dense layer's weight as the (D, M) matrix its rows multiply."""
        raise NotImplementedError

    @classmethod
    def _skeleton_of(cls, dense: nn.Module, ncodebooks: int, spec: LayerSpec) -> _MaddLayer:
        """A zero-initialised MADD layer of ``dense``'s shape."""
        raise NotImplementedError

    @classmethod
    def _learn_from_dense(
        cls, dense: nn.Module, rows: torch.Tensor, ncodebooks: int, spec: LayerSpec
    ) -> _MaddLayer:
        weight = cls._dense_weight(dense)
        # columns per input channel (a conv's kh kw taps, 1 for a linear): channel_budget's unit
        amm = learn_amm(rows, weight, ncodebooks, spec, channel_size=dense.weight[0, 0].numel())
        layer = cls._skeleton_of(dense, ncodebooks, spec)
        return layer.load_fitted(amm.to(weight.device), dense.bias, rows)

    def load_fitted(
        self, amm: MaddnessMatmul, bias: torch.Tensor | None = None, rows: torch.Tensor | None = None
    ) -> _MaddLayer:
        """Take encoder and LUT from a fitted ``MaddnessMatmul`` (D, M, C, K and encoder must match).

        ``rows`` (N, D), if given, are the rows it was learned from; the tree encoder sets
        its surrogate temperature per level from their spread (see
        :meth:`maddnet.nn.encoders.TreeEncoderModule.load_encoder`).
        """
        if amm.lut_ is None:
            raise NotFittedError("the MaddnessMatmul has no LUT: call fit(A, B) first")
        expected = (self.ncodebooks, self.nprototypes, self.in_dim, self.out_dim, self._spec.encoder)
        got = (amm.ncodebooks, amm.nprototypes, amm.input_dim, amm.output_dim, amm.encoder)
        if expected != got:
            raise ValueError(f"MaddnessMatmul has (C, K, D, M, encoder) = {got}, this layer needs {expected}")
        self.encoder.load_encoder(amm.encoder_, rows, self._spec)
        if not self._float_lut:  # learning makes a float LUT again
            self._zero_float_lut()
        with torch.no_grad():
            self.lut.copy_(amm.lut_)
            if self.bias is not None:
                if bias is None:
                    self.bias.zero_()
                else:
                    self.bias.copy_(bias.detach().reshape(-1))
        self._quantized_source = None
        self.refresh_quantized_lut()
        return self

    # ------------------------------------------------------------------ int LUT
    def refresh_quantized_lut(self) -> None:
        """Re-quantise ``lut`` into the integer buffers unless they were made from exactly
        the values ``lut`` holds now.

        The values are compared (not version counters, which miss writes through
        ``lut.data`` such as an EMA or clipping); on CPU that costs one pass over the float
        LUT (about 0.6 ms per million entries), on other devices the LUT is re-quantised at
        every use instead (comparing would need a host synchronisation).
        """
        if self.lut_bits is None or not self._float_lut:  # inference-only: the integer LUT is the state
            return
        lut = self.lut.detach()
        if unchanged_since(lut, self._quantized_source):
            return
        with torch.no_grad():
            q = quantize_lut(lut, self.lut_bits, self.lut_granularity)
            self.lut_q_values.copy_(q.values)
            self.lut_q_offsets.copy_(q.offsets)
            self.lut_q_scale.copy_(q.scale)
        self._quantized_source = lut.clone() if lut.device.type == "cpu" else None

    def quantized_lut(self) -> QuantizedLut | None:
        """The integer LUT inference uses (None for a float-LUT layer)."""
        if self.lut_bits is None:
            return None
        self.refresh_quantized_lut()
        return QuantizedLut(self.lut_q_values, self.lut_q_offsets, self.lut_q_scale, self.lut_bits)

    def packed_lut(self) -> PackedLut | None:
        """The integer LUT in the layout of the CPU LUT-sum kernel
        (:func:`maddnet.amm.lut.pack_lut`), or None where that kernel cannot reproduce
        :func:`~maddnet.amm.lut.quantized_lut_sum` exactly (no integer LUT, not on the CPU,
        more than 257 codebooks at 8 bits).

        Made once per integer LUT. The integer buffers are derived state (re-made from the
        float LUT, which is compared by value, or loaded), so the cache is keyed on their
        storage and version counters: every in-place write to them, re-quantising included,
        makes it re-pack; only writes through ``.data`` to the integer buffers themselves
        would go unseen (the float LUT's are seen). A value compare here cost as much as the
        LUT sum of a 128-row layer.
        """
        q = self.quantized_lut()
        if q is None or q.values.device.type != "cpu":
            return None
        buffers = (q.values, q.offsets, q.scale)  # before widening (a cast makes new tensors)
        key = tuple((t.data_ptr(), t._version, t.dtype, tuple(t.shape)) for t in buffers)
        if self._packed_cache is not None and self._packed_cache[0] == key:
            return self._packed_cache[1]
        packed = pack_lut(widen_quantized(q))
        self._packed_cache = (key, packed)
        return packed

    # ------------------------------------------------------------------ inference-only layers
    def _zero_float_lut(self) -> None:
        """Give an inference-only layer a zero float LUT of the full shape (to be filled)."""
        shape = (self.ncodebooks, self.nprototypes, self.out_dim)
        self.lut = nn.Parameter(torch.zeros(shape, device=self.lut.device, dtype=self.lut.dtype))
        self._float_lut = True

    @property
    def has_float_lut(self) -> bool:
        """False for an inference-only layer (:meth:`drop_float_lut`)."""
        return self._float_lut

    def drop_float_lut(self) -> None:
        """Make this an inference-only layer: the float ``lut`` (what training updates) is
        freed and no longer saved; the integer LUT (what eval reads) becomes the state.

        Eval outputs are unchanged (bit for bit; the layer's own parameters then get no
        gradients). Train mode, or an input that requires grad, raises
        :class:`MaddUnsupportedError` until :meth:`restore_float_lut` is called. A saved
        model stores a quarter of the LUT bytes (``maddnet.nn.save_converted(...,
        for_inference=True)`` saves any model this way without changing it).

        Raises:
            ValueError: the layer has float LUTs only (``lut_bits=None``).
        """
        if self.lut_bits is None:
            raise ValueError(
                f"{self._describe()} has no integer LUT (lut_bits=None): its float LUT is what "
                "inference reads and cannot be dropped"
            )
        if not self._float_lut:
            return
        self.refresh_quantized_lut()
        # an empty tensor keeps the dtype and device that the forward pass reads from ``lut``
        self.lut = nn.Parameter(self.lut.detach().new_empty(self.ncodebooks, self.nprototypes, 0), False)
        self._float_lut = False
        self._quantized_source = None

    def restore_float_lut(self) -> None:
        """Give an inference-only layer a float LUT again, the de-quantised integer LUT
        (``values / scale + offsets``, within ``quantized_lut().max_abs_error()`` per output
        of the float LUT it was made from), so that it can be trained; the integer LUT is
        kept as it is (it is the integer LUT of that float LUT)."""
        if self._float_lut:
            return
        q = QuantizedLut(self.lut_q_values, self.lut_q_offsets, self.lut_q_scale, self.lut_bits)
        q = widen_quantized(q)
        lut = q.dequantize().to(self.lut.dtype)
        self.lut = nn.Parameter(lut)
        self._float_lut = True
        self._quantized_source = lut.detach().clone() if lut.device.type == "cpu" else None

    def _refuse_without_float_lut(self, x: torch.Tensor) -> None:
        """An inference-only layer runs in eval mode for inputs that need no gradient (its own
        parameters' gradients cannot exist without the float LUT, so they are not asked for)."""
        if self._float_lut or not (self.training or (x.requires_grad and torch.is_grad_enabled())):
            return
        raise MaddUnsupportedError(
            f"{self._describe()} is inference-only (saved or made without its float LUT: "
            "save_converted(..., for_inference=True) or drop_float_lut()): it runs in eval mode "
            "without gradients only. Call restore_float_lut() on each MADD layer to train from the "
            "de-quantised integer LUT"
        )

    @property
    def reads_quantized_lut(self) -> bool:
        """Whether the forward pass (in the current mode) reads the integer LUT."""
        return self.lut_bits is not None and (self.qat or not self.training)

    # The integer LUT's scales and offsets stay float32 whatever dtype the model is cast to: a
    # power-of-two scale above 65504 (LUT spreads below ~0.004) is inf in float16, which would
    # silently drop the integer part of every output.
    _FLOAT32_BUFFERS = ("lut_q_offsets", "lut_q_scale")

    def _apply(self, fn, recurse=True):
        kept = {
            name: self._buffers[name] for name in self._FLOAT32_BUFFERS if self._buffers.get(name) is not None
        }
        current = self.lut_bits is not None and unchanged_since(self.lut.detach(), self._quantized_source)
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            if after.dtype != torch.float32:  # a dtype cast: keep the float32 values, follow the device
                self._buffers[name] = before.to(device=after.device, dtype=torch.float32)
        # An integer LUT made from the float LUT before a cast stays (it is the more precise one:
        # re-deriving it from a float16/bfloat16-rounded LUT would round twice); otherwise it is
        # re-derived at next use. Later edits of the float LUT are caught as always.
        lut = self.lut.detach()
        self._quantized_source = lut.clone() if current and lut.device.type == "cpu" else None
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.refresh_quantized_lut()  # never save integer buffers older than the float LUT
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not self._float_lut:  # its empty stand-in is no state
            destination.pop(prefix + "lut", None)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # format 1: the tree's tensors sat on the layer; they now belong to its encoder
        for key in _LEGACY_ENCODER_KEYS:
            if prefix + key in state_dict and prefix + "encoder." + key not in state_dict:
                state_dict[prefix + "encoder." + key] = state_dict.pop(prefix + key)
        if not self._float_lut:
            if prefix + "lut" in state_dict:  # a full state: the layer trains again
                self._zero_float_lut()
            else:
                state_dict[prefix + "lut"] = self.lut.detach()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._packed_cache = None
        # re-derived from the loaded float LUT at first use (identical for a consistent state;
        # a state whose integer buffers went stale is made consistent)
        self._quantized_source = None

    # ------------------------------------------------------------------ forward
    def _gather(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """(values (N, C, R) the encoder reads, context for :meth:`_restore`)."""
        raise NotImplementedError

    def _restore(self, out: torch.Tensor, context: Any) -> torch.Tensor:
        raise NotImplementedError

    def _encode(self, x: torch.Tensor, refuse: bool = True) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
        """(codes (N, C) uint8, context, gathered values or None) without gradients, in the
        layer's compute dtype (float32 for float16 / bfloat16).

        NaN / inf among the values the encoder reads raise :class:`NonFiniteInputError`; on
        devices other than the CPU only with ``refuse`` (it costs a host synchronisation;
        the forward pass makes those rows NaN instead).
        """
        try:
            values, context = self._gather(x.detach().to(compute_dtype(self.lut.dtype)))
            self._check_values(values, refuse)
            return self.encoder.encode_values(values), context, values
        except NonFiniteInputError as error:
            raise self._nonfinite_error(x, error) from None

    def _check_values(self, values: torch.Tensor, refuse: bool) -> None:
        """Refuse NaN / inf among gathered ``values`` where nothing else does: the tree's CPU
        encoder checks the values it reads for free, other encoders' are checked here (one
        pass); on other devices only with ``refuse``."""
        if values.device.type == "cpu":
            if type(self.encoder).encode_values is TreeEncoderModule.encode_values:
                return
        elif not refuse:
            return
        if not bool(torch.isfinite(values).all()):
            raise NonFiniteInputError("NaN/inf among the values the encoder reads")

    def _describe(self) -> str:
        where = "" if self.placed_as is None else f" {self.placed_as!r}"
        return f"{type(self).__name__}{where}(D={self.in_dim}, M={self.out_dim}, C={self.ncodebooks})"

    def _locate_nonfinite(self, x: torch.Tensor) -> str | None:
        """Where the first NaN / inf the encoder reads lies in input ``x``, as a sentence."""
        raise NotImplementedError

    def _nonfinite_error(self, x: torch.Tensor, error: NonFiniteInputError) -> NonFiniteInputError:
        """``error`` restated with this layer and the position in its input ``x``."""
        if getattr(error, "layer", None) is self:
            return error
        with torch.no_grad():
            where = self._locate_nonfinite(x.detach().to(compute_dtype(self.lut.dtype)))
        located = NonFiniteInputError(f"{self._describe()}: {where or error}")
        located.layer = self
        return located

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) uint8 codes of the layer's rows (N = rows of :meth:`_gather`); in
        hardware-exact mode the FP16 encoder's."""
        if self.hw_exact:
            x = x.detach().to(compute_dtype(self.lut.dtype))
            try:
                return self._hw_encode(x)[0]
            except NonFiniteInputError as error:
                raise self._nonfinite_error(x, error) from None
        return self._encode(x)[0]

    # ------------------------------------------------------------------ hardware-exact mode
    def check_hw_exact(self) -> None:
        """Raise ValueError unless this layer can run in hardware-exact mode (a tree encoder
        and an integer LUT)."""
        if not isinstance(self.encoder, TreeEncoderModule):
            raise ValueError(
                f"{self._describe()}: hardware-exact mode needs the tree encoder, not {self._spec.encoder!r}"
            )
        if self.lut_bits is None:
            raise ValueError(
                f"{self._describe()}: hardware-exact mode needs an integer LUT (lut_bits=8); the "
                "accelerator's FP16-LUT / FP32-accumulator variant is not modelled"
            )

    def _hw_encode(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """(codes, context) of the accelerator's FP16 encoder: the input and the thresholds
        rounded to float16 before the compares (``x.half() > t.half()``).

        Values are rounded to float32 first (float64 layers), then to float16. Compares run on
        float32 copies of the float16 values (the same results), with float16
        inf stood in for by +-65536 (greater than any finite float16) so that a finite input
        that overflows float16 goes right of every finite threshold; true NaN / inf inputs are
        refused as always."""
        from ..hw.datapath import FP16_INF_STANDIN

        self.check_hw_exact()
        rounded = x.float().to(torch.float16).to(x.dtype).clamp_(-FP16_INF_STANDIN, FP16_INF_STANDIN)
        rounded = torch.where(torch.isinf(x), x, rounded)
        thresholds = self.thresholds.detach().float().to(torch.float16).float()
        thresholds = thresholds.clamp_(-FP16_INF_STANDIN, FP16_INF_STANDIN)
        return self._hw_codes(rounded, thresholds)

    def _hw_codes(self, x: torch.Tensor, thresholds: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Codes of (already rounded) ``x`` against ``thresholds``: gather and encode."""
        values, context = self._gather(x)
        self._check_values(values, refuse=True)
        return encode_values(values, thresholds), context

    def _hw_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The accelerator's datapath (:mod:`maddnet.hw.datapath`): FP16 encoder, unsigned
        8-bit LUT entries summed in a ``hw_accumulator_bits`` integer accumulator, then
        ``float32(acc) * (1 / scale) + (bias + offsets[0] + offsets[1] + ...)`` in float32."""
        from ..hw.datapath import OVERFLOW_POLICIES, AccumulatorOverflowError

        if self.hw_overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"hw_overflow must be one of {OVERFLOW_POLICIES}, got {self.hw_overflow!r}")
        codes, context = self._hw_encode(x)
        q = self.quantized_lut()
        values = q.values
        ncodebooks, nprototypes, nout = values.shape
        if ncodebooks * 255 < 2**24:  # float32 sums of integers below 2**24 are exact
            acc = lut_sum(codes, values.float().to(values.device)).to(torch.int64)
        else:
            table = values.reshape(ncodebooks * nprototypes, nout).to(torch.int64)
            index = code_indices(codes, nprototypes)
            acc = torch.zeros(codes.shape[0], nout, dtype=torch.int64, device=values.device)
            for c in range(ncodebooks):
                acc += table[index[:, c]]
        high = 2 ** (self.hw_accumulator_bits - 1) - 1
        # unsigned entries: every partial sum lies in [0, acc], so checking or clamping the final
        # sum is what a refusing / saturating adder does at each add
        if acc.numel() and int(acc.max()) > high:
            if self.hw_overflow == "refuse":
                raise AccumulatorOverflowError(
                    f"{self._describe()}: the LUT sum ({int(acc.max())}) exceeds the "
                    f"{self.hw_accumulator_bits}-bit accumulator's maximum {high}"
                )
            acc = acc.clamp_(max=high)
        offsets = q.offsets.detach().float()
        init = (
            torch.zeros(nout, device=offsets.device)
            if self.bias is None
            else self.bias.detach().float().clone()
        )
        for c in range(ncodebooks):  # in codebook order, as the datapath model
            init = init + offsets[c]
        inv_scale = 1.0 / q.scale.detach().float()
        out = acc.to(torch.float32) * inv_scale + init
        return self._restore(out, context)

    def _needs_grad(self, x: torch.Tensor) -> bool:
        if not torch.is_grad_enabled():
            return False
        return (
            x.requires_grad
            or self.lut.requires_grad
            or any(p.requires_grad for p in self.encoder.parameters())
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float16 / bfloat16 layers and inputs compute in float32 (compares against float32
        # thresholds, float32 LUT sums and de-quantisation, float32 surrogate backward) with
        # autocast off inside; the output has the input's dtype
        dtype = compute_dtype(self.lut.dtype)
        out_dtype = x.dtype if x.is_floating_point() else dtype
        with no_autocast(x.device.type):
            try:
                out = self._forward(x.to(dtype))
            except NonFiniteInputError as error:
                raise self._nonfinite_error(x, error) from None
        return out if out.dtype == out_dtype else out.to(out_dtype)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hw_exact:
            if self._needs_grad(x):
                raise MaddUnsupportedError(
                    f"{self._describe()} is in hardware-exact mode, which is for inference only: "
                    "run it under torch.no_grad() (or with nothing requiring a gradient), or switch "
                    "the mode off (maddnet.hw.set_hw_exact(model, False)) to train"
                )
            return self._hw_forward(x)
        self._refuse_without_float_lut(x)
        quantized = self.reads_quantized_lut
        fast = fast_path_for(self)
        lut = widen(self.lut)
        if self._float_lut and self._needs_grad(x):
            out = None if fast is None else fast.train_forward(self, x, quantized)
            if out is not None:
                return out
            values, context = self._gather(x)
            codes = None if fast is None else fast.codes(self, x)
            if codes is None:
                self._check_values(values, refuse=False)
            qlut = widen_quantized(self.quantized_lut()) if quantized else None
            out = madd_lut_encoded(values, self.encoder, lut, qlut, codes)
        else:
            out = None if fast is None else fast.forward(self, x, quantized)
            if out is not None:
                return out
            codes, context, values = self._encode(x, refuse=False)
            if quantized:
                q = widen_quantized(self.quantized_lut())
                out = quantized_lut_sum(codes, q, q.sum_table().to(lut.dtype))
            else:
                out = lut_sum(codes, lut)
        if values is not None and values.device.type != "cpu":
            # checking here would cost a host synchronisation: rows that read NaN / inf are NaN
            finite = torch.isfinite(values).flatten(1).all(1, keepdim=True)
            out = out.masked_fill(~finite, float("nan"))
        if self.bias is not None:
            out = out + widen(self.bias)
        return self._restore(out, context)

    def extra_repr(self) -> str:
        encoder = "" if self._spec.encoder == "tree" else f", encoder={self._spec.encoder!r}"
        return (
            f"D={self.in_dim}, M={self.out_dim}, C={self.ncodebooks}, K={self.nprototypes}, "
            f"lut_bits={self.lut_bits}, qat={self.qat}, bias={self.bias is not None}, "
            f"surrogate={self.surrogate!r}{encoder}"
        )


# Public name of the common base class (isinstance checks: "is this a MADD layer?").
MaddLayer = _MaddLayer


def learn_amm(
    rows: torch.Tensor, weight: torch.Tensor, ncodebooks: int, spec: LayerSpec, channel_size: int = 1
) -> MaddnessMatmul:
    """A ``MaddnessMatmul`` of ``spec`` with C = ``ncodebooks`` fitted on ``rows`` (N, D) and
    ``weight`` (D, M), on the rows' device. ``channel_size``: consecutive columns per input
    channel, the unit of ``spec.channel_budget``."""
    if not isinstance(rows, torch.Tensor) or rows.dim() != 2:
        raise ValueError(f"rows must be a 2-D (N, D) tensor, got {getattr(rows, 'shape', rows)}")
    if rows.shape[1] != weight.shape[0]:
        raise ValueError(
            f"rows have {rows.shape[1]} columns, the layer's input dimension D is {weight.shape[0]}"
        )
    amm = MaddnessMatmul(
        ncodebooks=ncodebooks,
        nprototypes=spec.nprototypes,
        lut_bits=spec.lut_bits,
        ridge=spec.ridge,
        ncandidates=spec.ncandidates,
        lut_granularity=spec.lut_granularity,
        hash_objective=spec.hash_objective,
        encoder=spec.encoder,
        encoder_options={
            **spec.encoder_options,
            # MaddnessMatmul has no refine_sweeps argument (its tree reproduces MADDness)
            **({"refine_sweeps": spec.refine_sweeps} if spec.encoder == "tree" else {}),
            **spec.steering_options(channel_size),
        },
    )
    # the layer keeps the LUT, not the prototypes: solve the ridge step for the weight
    # directly (M instead of D right-hand sides where M < D, e.g. 9x fewer for a 3x3 conv)
    return amm.fit_lut(rows.detach().float(), weight.detach().float().to(rows.device))


class MaddLinear(_MaddLayer):
    """MADD replacement of ``nn.Linear``: input (..., D) -> (..., M).

    ``MaddLinear(in_features, out_features, ncodebooks, spec=None, bias=True, device=None,
    **spec_fields)``: ``spec`` (default ``LayerSpec()``) with any ``LayerSpec`` field given
    by keyword replaced (e.g. ``lut_bits=None``).
    """

    kind = "linear"
    DENSE_TYPE = nn.Linear

    def __init__(
        self,
        in_features: int,
        out_features: int,
        ncodebooks: int,
        spec: LayerSpec | None = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        **spec_fields: Any,
    ) -> None:
        super().__init__(in_features, out_features, ncodebooks, spec_with(spec, **spec_fields), bias, device)
        self.in_features, self.out_features = in_features, out_features

    def get_config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, **super().get_config()}

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        rows: torch.Tensor,
        ncodebooks: int,
        spec: LayerSpec | None = None,
        **spec_fields: Any,
    ) -> MaddLinear:
        """Learn a MADD layer from ``linear`` and its input ``rows`` (N, in_features).

        ``spec`` and ``spec_fields`` as in the constructor; the layer lands on the device
        of ``linear``'s weight, learning runs on the rows' device.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"MaddLinear.from_dense needs an nn.Linear, got {type(linear).__name__}")
        return cls._learn_from_dense(linear, rows, ncodebooks, spec_with(spec, **spec_fields))

    @staticmethod
    def _dense_weight(dense: nn.Linear) -> torch.Tensor:
        return dense.weight.T

    @classmethod
    def _skeleton_of(cls, dense: nn.Linear, ncodebooks: int, spec: LayerSpec) -> MaddLinear:
        return cls(
            dense.in_features,
            dense.out_features,
            ncodebooks,
            spec,
            dense.bias is not None,
            dense.weight.device,
        )

    def _gather(self, x: torch.Tensor):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features in its last dim, expected {self.in_features}")
        rows = x.reshape(-1, self.in_features)
        columns = self.encoder.read_columns
        values = rows.index_select(1, columns.reshape(-1))
        return values.reshape(rows.shape[0], *columns.shape), x.shape[:-1]

    def _restore(self, out: torch.Tensor, lead_shape) -> torch.Tensor:
        return out.reshape(*lead_shape, self.out_features)

    def _locate_nonfinite(self, x: torch.Tensor) -> str | None:
        values, lead_shape = self._gather(x)
        bad = (~torch.isfinite(values)).reshape(values.shape[0], -1)
        rows = bad.any(1).nonzero()
        if rows.shape[0] == 0:
            return None
        row = int(rows[0])
        index = int(bad[row].nonzero()[0])
        codebook = index // values.shape[2]
        feature = int(self.encoder.read_columns.reshape(-1)[index])
        position = ""
        if len(lead_shape) > 1:
            index_in = torch.unravel_index(torch.tensor(row), tuple(lead_shape))
            position = f" (index {tuple(int(i) for i in index_in)})"
        value = float(values.reshape(values.shape[0], -1)[row, index])
        return (
            f"input row {row}{position}, feature {feature} is {value}, "
            f"a value the encoder reads (codebook {codebook})"
        )


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    pair = tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair  # type: ignore[return-value]


def conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """The symmetric zero padding of ``conv`` as ints (resolves 'valid' / 'same')."""
    if conv.padding_mode != "zeros":
        raise ValueError(f"MaddConv2d supports padding_mode='zeros' only, got {conv.padding_mode!r}")
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        pads = []
        for k, d in zip(conv.kernel_size, conv.dilation, strict=True):
            total = d * (k - 1)
            if total % 2:
                raise ValueError("padding='same' with an even effective kernel is asymmetric; not supported")
            pads.append(total // 2)
        return (pads[0], pads[1])
    return _pair(conv.padding, "padding")


# output positions per image from which the fused conv training function is used (CPU)
_FUSED_MIN_POSITIONS = 16
# the surrogates MaddConvFunction has a fused backward for
_FUSED_SURROGATES = ("soft", "soft-bf16", "path")


class MaddConv2d(_MaddLayer):
    """MADD replacement of ``nn.Conv2d`` (groups = 1, zero padding).

    Rows are the im2col patches (D = Cin kh kw, columns in ``F.unfold`` order); the layer
    reads only the columns its encoder reads (4 C for the tree) straight from the padded
    input, never unfolding it. Input (B, Cin, H, W) or (Cin, H, W); output
    (B, Cout, Hout, Wout) contiguous. ``spec`` / ``spec_fields`` as in :class:`MaddLinear`.
    """

    kind = "conv2d"
    DENSE_TYPE = nn.Conv2d

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        ncodebooks: int,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        spec: LayerSpec | None = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        **spec_fields: Any,
    ) -> None:
        if groups != 1:
            raise ValueError(
                f"MaddConv2d supports groups=1 only (got groups={groups}); grouped and depthwise "
                "convs are not converted — exclude them from the conversion"
            )
        kernel = _pair(kernel_size, "kernel_size")
        spec = spec_with(spec, **spec_fields)
        super().__init__(in_channels * kernel[0] * kernel[1], out_channels, ncodebooks, spec, bias, device)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.geometry = ConvGeometry(
            kernel, _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
        )

    @property
    def kernel_size(self) -> tuple[int, int]:
        return self.geometry.kernel_size

    # nn.Conv2d's attributes, as model code reads them (padding resolved to a pair)
    groups: ClassVar[int] = 1
    padding_mode: ClassVar[str] = "zeros"
    transposed: ClassVar[bool] = False
    output_padding: ClassVar[tuple[int, int]] = (0, 0)

    @property
    def stride(self) -> tuple[int, int]:
        return self.geometry.stride

    @property
    def padding(self) -> tuple[int, int]:
        return self.geometry.padding

    @property
    def dilation(self) -> tuple[int, int]:
        return self.geometry.dilation

    def _dense_weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    def get_config(self) -> dict[str, Any]:
        g = self.geometry
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(g.kernel_size),
            "stride": list(g.stride),
            "padding": list(g.padding),
            "dilation": list(g.dilation),
            **super().get_config(),
        }

    @classmethod
    def from_dense(
        cls,
        conv: nn.Conv2d,
        rows: torch.Tensor,
        ncodebooks: int | None = None,
        spec: LayerSpec | None = None,
        **spec_fields: Any,
    ) -> MaddConv2d:
        """Learn a MADD conv from ``conv`` and its patch ``rows`` (N, Cin kh kw).

        ``ncodebooks`` defaults to Cin (one codebook per input channel, D/C = kh kw).
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"MaddConv2d.from_dense needs an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(
                f"MaddConv2d supports groups=1 only (got groups={conv.groups}); grouped and "
                "depthwise convs are not converted — exclude them from the conversion"
            )
        conv_padding(conv)  # refuses other padding modes before anything is learned
        ncodebooks = conv.in_channels if ncodebooks is None else ncodebooks
        return cls._learn_from_dense(conv, rows, ncodebooks, spec_with(spec, **spec_fields))

    @staticmethod
    def _dense_weight(dense: nn.Conv2d) -> torch.Tensor:
        return dense.weight.reshape(dense.out_channels, -1).T  # (D, M), D in unfold order

    @classmethod
    def _skeleton_of(cls, dense: nn.Conv2d, ncodebooks: int, spec: LayerSpec) -> MaddConv2d:
        return cls(
            dense.in_channels,
            dense.out_channels,
            dense.kernel_size,
            ncodebooks,
            dense.stride,
            conv_padding(dense),
            dense.dilation,
            1,
            spec,
            dense.bias is not None,
            dense.weight.device,
        )

    def _check_input(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input (B, {self.in_channels}, H, W) or ({self.in_channels}, H, W), "
                f"got {tuple(x.shape)}"
            )
        out_h, out_w = self.geometry.output_size(x.shape[2], x.shape[3])
        if out_h < 1 or out_w < 1:
            raise ValueError(f"input {tuple(x.shape)} is smaller than the kernel {self.kernel_size}")
        return x, (x.shape[0], out_h, out_w, unbatched)

    def _gather(self, x: torch.Tensor):
        x, context = self._check_input(x)
        return gather_patch_columns(x, self.geometry, self.encoder.read_columns), context

    def _encode(self, x: torch.Tensor, refuse: bool = True):
        fast = fast_path_for(self)
        try:
            codes = None if fast is None else fast.codes(self, x.detach())
        except NonFiniteInputError as error:
            raise self._nonfinite_error(x, error) from None
        if codes is None:
            return super()._encode(x, refuse)
        return codes, self._check_input(x)[1], None

    def _hw_codes(self, x: torch.Tensor, thresholds: torch.Tensor) -> tuple[torch.Tensor, Any]:
        images, context = self._check_input(x)
        codes = encode_patches(images, self.geometry, self.split_dims, thresholds)
        if codes is None:
            return super()._hw_codes(x, thresholds)
        return codes, context

    def _locate_nonfinite(self, x: torch.Tensor) -> str | None:
        images, _ = self._check_input(x)
        return nonfinite_tap(images, self.geometry, self.encoder.read_columns)

    def _restore(self, out: torch.Tensor, context) -> torch.Tensor:
        batch, out_h, out_w, unbatched = context
        out = out.reshape(batch, out_h, out_w, self.out_channels).permute(0, 3, 1, 2).contiguous()
        return out[0] if unbatched else out

    def extra_repr(self) -> str:
        g = self.geometry
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={g.kernel_size}, stride={g.stride}, "
            f"padding={g.padding}, dilation={g.dilation}, " + super().extra_repr()
        )


class TreeConvFastPath:
    """The fused numba CPU kernels of a tree-encoded MADD conv (:mod:`maddnet.nn._conv_kernels`):
    taps read straight from the image, no gathered (N, C, L) values (float32 CPU tensors)."""

    def codes(self, layer: MaddConv2d, x: torch.Tensor) -> torch.Tensor | None:
        images, _ = layer._check_input(x.detach())
        images = images.to(compute_dtype(layer.lut.dtype))
        return encode_patches(images, layer.geometry, layer.split_dims, layer.thresholds)

    def forward(self, layer: MaddConv2d, x: torch.Tensor, quantized: bool) -> torch.Tensor | None:
        images, (_, _, _, unbatched) = layer._check_input(x)
        lut = widen(layer.lut)
        if not layer.has_float_lut:  # the kernel reads the integer LUT; only the shape is taken here
            lut = lut.new_empty(1).expand(layer.ncodebooks, layer.nprototypes, layer.out_dim)
        out = conv_lut_forward(
            images.to(compute_dtype(layer.lut.dtype)),
            layer.geometry,
            layer.split_dims,
            layer.thresholds,
            lut,
            widen_quantized(layer.quantized_lut()) if quantized else None,
            layer.bias,
        )
        if out is None:
            return None
        return out[0] if unbatched else out

    def train_forward(self, layer: MaddConv2d, x: torch.Tensor, quantized: bool) -> torch.Tensor | None:
        # CPU float32: the fused function reads taps from the image and writes the input
        # gradient directly (no (N, C, L) gathered values), for both surrogates.
        images, (_, out_h, out_w, unbatched) = layer._check_input(x)
        lut = widen(layer.lut)  # float16 / bfloat16 layers compute in float32
        on_cpu = all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (images, lut))
        # below ~16 output positions per image the per-image work is too small to pay for the
        # per-image kernel; the gathered-values path batches all rows instead (measured: 3x3
        # outputs 1.7x faster unfused, 7x7 1.2x faster fused)
        fused = layer.surrogate in _FUSED_SURROGATES and out_h * out_w >= _FUSED_MIN_POSITIONS
        if not on_cpu or not fused:
            return None
        q = widen_quantized(layer.quantized_lut()) if quantized else None
        q_args = (None, None, None, 0) if q is None else (q.values, q.offsets, q.scale, q.bits)
        out = MaddConvFunction.apply(
            images,
            widen(layer.thresholds),
            lut,
            widen(layer.temperature),
            widen(layer.bias),
            *q_args,
            layer.geometry,
            layer.split_dims,
            layer.surrogate,
        )
        return out[0] if unbatched else out


register_fast_path(MaddConv2d, TreeEncoderModule, TreeConvFastPath())


class TreeLinearFastPath:
    """The CPU inference path of a tree-encoded :class:`MaddLinear` with an integer LUT, the
    kernels of ``MaddnessMatmul``: the trees read their split columns straight from the
    input rows (no gathered (N, C, L) copy) and :func:`maddnet.amm.lut.packed_lut_sum` adds
    the uint8 LUT rows in uint16 with the bias fused (no float table made per call). Equal
    bit for bit to the general path (``quantized_lut_sum(...) + bias``)."""

    @staticmethod
    def _rows(layer: MaddLinear, x: torch.Tensor) -> torch.Tensor | None:
        if x.device.type != "cpu" or x.dtype != torch.float32:
            return None
        if x.shape[-1] != layer.in_features:
            layer._gather(x)  # raises the shape error the general path gives
        return x.detach().reshape(-1, layer.in_features)

    def codes(self, layer: MaddLinear, x: torch.Tensor) -> torch.Tensor | None:
        rows = self._rows(layer, x)
        if rows is None:
            return None
        return hashing.encode(rows, layer.split_dims, layer.thresholds.detach())

    def forward(self, layer: MaddLinear, x: torch.Tensor, quantized: bool) -> torch.Tensor | None:
        rows = self._rows(layer, x) if quantized else None
        if rows is None:
            return None
        bias = widen(layer.bias)
        if bias is not None and (bias.device.type != "cpu" or bias.dtype != torch.float32):
            return None
        if _is_compiling():
            # run eagerly: dynamo would trace pack_lut's numpy code through torch._numpy (no
            # uint16 adds), and the general path, compiled by inductor, sums the offsets in
            # another order (not eager's bits). Applied here, not as a decorator: that imports
            # torch._dynamo (seconds) with maddnet; under compile it is loaded already.
            return torch.compiler.disable(TreeLinearFastPath._packed_forward)(self, layer, rows, bias, x)
        return self._packed_forward(layer, rows, bias, x)

    def _packed_forward(
        self, layer: MaddLinear, rows: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor
    ) -> torch.Tensor | None:
        packed = layer.packed_lut()
        if packed is None:
            return None
        codes = hashing.encode(rows, layer.split_dims, layer.thresholds.detach())
        out = packed_lut_sum(codes, packed, None if bias is None else bias.detach(), check_codes=False)
        return layer._restore(out, x.shape[:-1])

    def train_forward(self, layer: MaddLinear, x: torch.Tensor, quantized: bool) -> None:
        return None  # the general path: gathered values feed the surrogate backward


register_fast_path(MaddLinear, TreeEncoderModule, TreeLinearFastPath())
