"""`adaspec-hf` command line: argparse only, one module per subcommand, calling the library.

Each module under :mod:`adaspec_hf.cli` exposes ``register_cli(subparsers)``, which adds its
subcommand(s) and sets ``func`` on the parser to a callable taking the parsed ``argparse.Namespace``;
the feature packages themselves know nothing of argparse.
"""
from __future__ import annotations

import argparse
import logging
import sys

from adaspec_hf.cli import bench, demo, export, pair, profile

# Subcommands in help order.
_COMMANDS = (demo, pair, profile, bench, export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adaspec-hf", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in _COMMANDS:
        module.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
