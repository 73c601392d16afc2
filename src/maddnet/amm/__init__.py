"""The MADDness algorithm on plain tensors: hashing, prototypes, LUTs, the estimator."""

from .hashing import encode, learn_tree, subspace_bounds
from .lut import QuantizedLut, build_lut, lut_sum, quantize_lut, quantized_lut_sum
from .matmul import MaddnessMatmul, NotFittedError

__all__ = [
    "MaddnessMatmul",
    "NotFittedError",
    "QuantizedLut",
    "build_lut",
    "encode",
    "learn_tree",
    "lut_sum",
    "quantize_lut",
    "quantized_lut_sum",
    "subspace_bounds",
]
