"""The ``maddnet`` command.

Each sub-command lives next to the code it drives and exposes
``add_parser(subparsers) -> argparse.ArgumentParser`` whose parser sets ``func``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# module path of each sub-command, in the order ``--help`` lists them
COMMANDS = [
    "maddnet.retrain.cli",
    "maddnet.analysis.single_layer_cli",
    "maddnet.analysis.amm_cli",
    "maddnet.train.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maddnet",
        description="Run neural networks on MADDness approximate matrix multiplication.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMANDS:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
