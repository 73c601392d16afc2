"""Drop-in MADD layers, model conversion (prepare -> calibrate -> convert), training."""

from .config import MaddConfig, default_codebooks
from .convert import (
    calibrate,
    conversion_plan,
    convert,
    convert_layer,
    learn_layer,
    load_converted,
    madd_layers,
    prepare,
    rebuild,
    record_inputs,
    save_converted,
    summary,
    unprepare,
)
from .functional import madd_lut
from .layers import MaddConv2d, MaddLayer, MaddLinear
from .recording import RowRecorder

__all__ = [
    "MaddConfig",
    "MaddConv2d",
    "MaddLayer",
    "MaddLinear",
    "RowRecorder",
    "calibrate",
    "conversion_plan",
    "convert",
    "convert_layer",
    "default_codebooks",
    "learn_layer",
    "load_converted",
    "madd_layers",
    "madd_lut",
    "prepare",
    "rebuild",
    "record_inputs",
    "save_converted",
    "summary",
    "unprepare",
]
