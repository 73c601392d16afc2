"""maddnet: neural networks on MADDness approximate matrix multiplication."""

from .amm import MaddnessMatmul, NotFittedError

__version__ = "0.1.0"
__all__ = ["MaddnessMatmul", "NotFittedError", "__version__"]
