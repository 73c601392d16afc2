"""Drop-in MADD layers, model conversion (prepare -> calibrate -> convert), training."""

from .budget import CodebookBudget, allocate_codebooks, allocate_for_model
from .config import MaddConfig, default_codebooks
from .convert import (
    calibrate,
    convert,
    convert_layer,
    learn_layer,
    prepare,
    record_inputs,
    summary,
    unprepare,
)
from .diagnostics import dead_layers, reestimate_batchnorm, threshold_activity
from .encoders import (
    EncoderModule,
    GlobalTreeEncoderModule,
    NearestPrototypeModule,
    TreeEncoderModule,
    register_encoder_module,
)
from .functional import madd_lut, madd_lut_encoded
from .fuse import fuse, fuse_report
from .layers import MaddConv2d, MaddLayer, MaddLinear, MaddUnsupportedError, register_fast_path
from .mapping import DEFAULT_MAPPING, kept_dense, madd_type_for, unsupported_reason
from .plan import (
    conversion_plan,
    load_converted,
    madd_layers,
    rebuild,
    record_pass,
    register_pass,
    save_converted,
)
from .prune import needed_inputs, prune_unread
from .recording import RowRecorder
from .spec import MADDNESS_TREE, LayerSpec

__all__ = [
    "DEFAULT_MAPPING",
    "CodebookBudget",
    "allocate_codebooks",
    "allocate_for_model",
    "EncoderModule",
    "GlobalTreeEncoderModule",
    "NearestPrototypeModule",
    "LayerSpec",
    "MADDNESS_TREE",
    "MaddConfig",
    "MaddConv2d",
    "MaddLayer",
    "MaddLinear",
    "MaddUnsupportedError",
    "RowRecorder",
    "TreeEncoderModule",
    "calibrate",
    "conversion_plan",
    "convert",
    "convert_layer",
    "dead_layers",
    "fuse",
    "fuse_report",
    "default_codebooks",
    "learn_layer",
    "kept_dense",
    "load_converted",
    "madd_layers",
    "madd_lut",
    "madd_lut_encoded",
    "madd_type_for",
    "needed_inputs",
    "prune_unread",
    "prepare",
    "rebuild",
    "record_inputs",
    "reestimate_batchnorm",
    "record_pass",
    "register_encoder_module",
    "register_fast_path",
    "register_pass",
    "save_converted",
    "summary",
    "threshold_activity",
    "unprepare",
    "unsupported_reason",
]
