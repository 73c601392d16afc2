"""The ``maddnet`` command.

Each sub-command lives next to the code it drives and exposes
``add_parser(subparsers) -> argparse.ArgumentParser`` whose parser sets ``func``.
"""

from __future__ import annotations

import argparse
import importlib
import os
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


# what bad input raises (wrong names, shapes, values, missing files); other exceptions are
# bugs and keep their traceback
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, NotADirectoryError)


def main(argv: list[str] | None = None) -> int:
    """Run a sub-command. Bad input ends with one ``maddnet <command>: error: ...`` line and
    exit code 2; set ``MADDNET_TRACEBACK=1`` to see the traceback instead."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as error:
        if os.environ.get("MADDNET_TRACEBACK"):
            raise
        # KeyError's str() is the repr of its argument: show the message without quotes
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"maddnet {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
