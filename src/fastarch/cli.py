"""The ``fastarch`` command line.

Each sub-command lives with its technique: an entry below names a module and a function
``add_parser(subparsers)`` that registers the sub-command (its ``func`` default runs it). Modules
are imported only when their command runs, so ``fastarch --help`` is fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> "module:function" that adds its parser
COMMANDS = {
    "info": "fastarch.cli:_add_info",
    "sparsify": "fastarch.sparsity.cli:add_parser",
    "index": "fastarch.retrieval.cli:add_index_parser",
    "retrieve": "fastarch.retrieval.cli:add_retrieve_parser",
    "compress": "fastarch.retrieval.cli:add_compress_parser",
    "bench": "fastarch.benchmark.cli:add_parser",
    "prune": "fastarch.pruning.cli:add_parser",
}


def _add_info(subparsers):
    p = subparsers.add_parser("info", help="what is built and usable here")
    p.set_defaults(func=lambda args: (importlib.import_module("fastarch.info").info(), 0)[1])


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastarch", description="Make existing PyTorch architectures faster and smaller."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, target in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=f"see `fastarch {name} --help`", add_help=False)
            continue
        module, func = target.split(":")
        getattr(importlib.import_module(module), func)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if command is None else 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
