"""The ``maddnet`` command.

Each sub-command lives next to the code it drives and exposes
``add_parser(subparsers) -> argparse.ArgumentParser`` whose parser sets ``func``; the flags
they share (KEY=VALUE pairs, LayerSpec settings, device/threads/progress, number checks)
come from :mod:`maddnet.cli_args`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .cli_args import USER_ERRORS, run_parsed

__all__ = ["COMMANDS", "USER_ERRORS", "build_parser", "main"]

# module path of each sub-command, in the order ``--help`` lists them
COMMANDS = [
    "maddnet.retrain.cli",
    "maddnet.analysis.single_layer_cli",
    "maddnet.analysis.amm_cli",
    "maddnet.train.cli",
    "maddnet.hw.energy_cli",
    "maddnet.hw.export_cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maddnet",
        description="Run neural networks on MADDness approximate matrix multiplication. "
        "Every command that runs a model takes --device (default auto: cuda when available, "
        "else cpu), --threads N and --no-progress.",
    )
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", help="what to run (maddnet COMMAND --help lists its options)"
    )
    for module_name in COMMANDS:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a sub-command. Bad input ends with one ``maddnet <command>: error: ...`` line and
    exit code 2; set ``MADDNET_TRACEBACK=1`` to see the traceback instead."""
    return run_parsed(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
