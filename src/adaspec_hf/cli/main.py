"""`adaspec-hf` command line: each subcommand lives in the module that owns the feature.

A feature module exposes ``register_cli(subparsers)``, which adds its subcommand(s) and sets
``func`` on the parser to a callable taking the parsed ``argparse.Namespace``.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules that contribute subcommands, in help order.
_CLI_MODULES = ("adaspec_hf.cli.demo", "adaspec_hf.pair.build", "adaspec_hf.profiling.profiler",
                "adaspec_hf.bench.harness", "adaspec_hf.integrations.hf.custom_generate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adaspec-hf", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _CLI_MODULES:
        module = importlib.import_module(name)
        module.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
