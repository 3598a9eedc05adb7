"""``adaspec-hf export-generate DIR``: write adaspec's ``custom_generate`` method into a folder."""
from __future__ import annotations

import argparse
from pathlib import Path

from adaspec_hf._version import __version__
from adaspec_hf.integrations.hf.custom_generate import export_generate


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """``adaspec-hf export-generate DIR``."""
    p = subparsers.add_parser(
        "export-generate", help="write adaspec's custom_generate/generate.py into a model folder",
        description="Write custom_generate/generate.py (+ requirements.txt) into DIR, so that "
                    "model.generate(..., custom_generate=DIR, assistant_model=draft, trust_remote_code=True) "
                    "runs adaspec-hf's engine on a model that was never enable()d. DIR may be a saved model "
                    "folder or a repo to push to the Hub.")
    p.add_argument("directory", metavar="DIR", help="folder to write into (created if missing)")
    p.add_argument("--force", action="store_true", help="replace existing files with other contents")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    folder = export_generate(args.directory, force=args.force)
    print(f"wrote {folder}/generate.py and requirements.txt (adaspec-hf {__version__}); use it with:\n"
          f"  model.generate(**inputs, custom_generate={str(Path(args.directory))!r}, assistant_model=draft, "
          "trust_remote_code=True)")
    return 0
