"""``adaspec-hf pair build | info``: build or inspect the built-in offline target/draft pair."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from adaspec_hf.pair import WeakPairError, build_pair, default_pair_dir, read_report, summarize
from adaspec_hf.pair.gates import check_gates


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """``adaspec-hf pair build | info``."""
    p = subparsers.add_parser("pair", help="build or inspect the built-in offline target/draft pair")
    sub = p.add_subparsers(dest="pair_command")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    b = sub.add_parser("build", help="train the pair from local text (default: Python stdlib sources)")
    b.add_argument("--out", default=None, help="pair directory (default: $ADASPEC_HF_CACHE/pair...)")
    b.add_argument("--corpus", nargs="+", default=None, metavar="PATH", help="text files/folders instead of the stdlib")
    b.add_argument("--quick", action="store_true", help="tiny pair in ~1 min (tests)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--force", action="store_true", help="rebuild even if a complete pair exists")
    b.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="training precision (default: time both here and keep the faster)")
    b.set_defaults(func=_cli_build)

    i = sub.add_parser("info", help="print a built pair's report")
    i.add_argument("--dir", default=None, help="pair directory (default: the built-in full pair)")
    i.add_argument("--quick", action="store_true", help="the default quick pair")
    i.add_argument("--json", action="store_true", help="the whole report.json")
    i.set_defaults(func=_cli_info)


def _cli_build(args: argparse.Namespace) -> int:
    d = build_pair(args.out, corpus=args.corpus, quick=args.quick, seed=args.seed, force=args.force,
                   precision=args.precision)
    rep = read_report(d)
    print(summarize(rep))
    print(d)
    try:
        check_gates(rep, str(d))
    except WeakPairError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _cli_info(args: argparse.Namespace) -> int:
    d = Path(args.dir).expanduser() if args.dir else default_pair_dir(quick=args.quick)
    rep = read_report(d)
    if rep is None:
        print(f"no built pair in {d} (run `adaspec-hf pair build`)", file=sys.stderr)
        return 1
    print(json.dumps(rep, indent=2) if args.json else summarize(rep))
    print(d)
    return 0
