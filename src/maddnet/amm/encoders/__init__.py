"""Encoders: rows -> codes (the hashing half of MADDness), behind one interface.

``Encoder`` (learn / encode / prototypes / columns read / cost) and a registry by name;
``TreeEncoder`` is MADDness's hash tree. Torch forms for training live in
:mod:`maddnet.nn.encoders`.
"""

from .base import ENCODERS, Encoder, EncoderCost, create_encoder, encoder_class, register_encoder
from .tree import HASH_OBJECTIVES, TreeEncoder

__all__ = [
    "ENCODERS",
    "HASH_OBJECTIVES",
    "Encoder",
    "EncoderCost",
    "TreeEncoder",
    "create_encoder",
    "encoder_class",
    "register_encoder",
]
