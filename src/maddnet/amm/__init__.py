"""The MADDness algorithm on plain tensors: hashing, prototypes, LUTs, the estimator."""

from .checks import NotFittedError
from .encoders import Encoder, EncoderCost, TreeEncoder, create_encoder, register_encoder
from .hashing import encode, learn_tree, subspace_bounds
from .lut import QuantizedLut, build_lut, lut_sum, quantize_lut, quantized_lut_sum
from .matmul import MaddnessMatmul

__all__ = [
    "Encoder",
    "EncoderCost",
    "MaddnessMatmul",
    "NotFittedError",
    "QuantizedLut",
    "TreeEncoder",
    "build_lut",
    "create_encoder",
    "encode",
    "learn_tree",
    "lut_sum",
    "quantize_lut",
    "quantized_lut_sum",
    "register_encoder",
    "subspace_bounds",
]
