"""The `adaspec-hf` command line."""
from adaspec_hf.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
