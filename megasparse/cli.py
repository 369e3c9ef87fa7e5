"""`megasparse <command>`: one entry point; each command lives in its own module.

A command module exposes ``register(subparsers)``, which adds its parser and sets
``func`` to a handler taking the parsed args. Handlers import heavy libraries lazily so that
`megasparse --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from megasparse.errors import MegasparseError

# (module, purpose) in the order `--help` lists them. A module that is missing is a packaging bug.
COMMAND_MODULES = [
    "megasparse.train.command",
    "megasparse.data.commands",
    "megasparse.train.convert",
    "megasparse.export.command",
    "megasparse.sparsity.report_command",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megasparse", description="Pretrain sparse transformer LMs.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except MegasparseError as err:
        print(f"megasparse: error: {err}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
