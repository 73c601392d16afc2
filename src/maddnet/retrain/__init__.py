"""Layer-by-layer retraining of networks onto MADD layers (``maddnet retrain``, ``maddnet demo``)."""

from .config import RetrainConfig
from .pipeline import Retrainer, parameter_groups, run_retrain
from .report import build_report, markdown_report, write_report

__all__ = [
    "RetrainConfig",
    "Retrainer",
    "build_report",
    "markdown_report",
    "parameter_groups",
    "run_retrain",
    "write_report",
]
