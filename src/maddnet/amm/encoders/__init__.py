"""Encoders: rows -> codes (the hashing half of MADDness), behind one interface.

``Encoder`` (learn / encode / prototypes / columns read / cost) and a registry by name;
``TreeEncoder`` is MADDness's hash tree; ``GlobalTreeEncoder`` ("tree-global") its
residual, whole-row variant; ``PQEncoder`` / ``L1Encoder`` / ``LinfEncoder`` ("pq",
"pq-l1", "pq-linf") the nearest-prototype encoders (see docs/encoders.md). Torch forms
for training live in :mod:`maddnet.nn.encoders`.
"""

from .base import ENCODERS, Encoder, EncoderCost, create_encoder, encoder_class, register_encoder
from .global_tree import GlobalTreeEncoder
from .nearest import L1Encoder, LinfEncoder, NearestPrototypeEncoder, PQEncoder
from .tree import HASH_OBJECTIVES, TreeEncoder

__all__ = [
    "ENCODERS",
    "HASH_OBJECTIVES",
    "Encoder",
    "EncoderCost",
    "GlobalTreeEncoder",
    "L1Encoder",
    "LinfEncoder",
    "NearestPrototypeEncoder",
    "PQEncoder",
    "TreeEncoder",
    "create_encoder",
    "encoder_class",
    "register_encoder",
]
