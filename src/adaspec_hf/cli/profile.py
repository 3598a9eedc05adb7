"""``adaspec-hf profile``: measure and cache a pair's latency profile."""
from __future__ import annotations

import argparse
from typing import Any

import torch

from adaspec_hf.pair import load_models
from adaspec_hf.profiling import format_table, holdout_report, plot_profile, profile, save_profile


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """``adaspec-hf profile``: measure and cache a pair's latency profile."""
    p = subparsers.add_parser(
        "profile", help="measure a target/draft pair's forward latency and cache it",
        description="Measure the forward latency of a target/draft pair over rows x tokens x context on "
                    "this device and dtype, print it, and cache it (JSON) for the adaptive planner.")
    p.add_argument("--target", default=None, help="target model id or path (default: the built-in pair)")
    p.add_argument("--draft", default=None, help="draft model id or path (default: the built-in pair)")
    p.add_argument("--fine", action="store_true", help="denser grid (slower)")
    p.add_argument("--plot", default=None, metavar="PNG", help="write measured vs predicted latency to this PNG")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per point (median; default 3)")
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="stop measuring after S seconds and extrapolate the rest")
    p.set_defaults(func=_cli_profile)


def _cli_profile(args: argparse.Namespace) -> int:
    dtype = getattr(torch, args.dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    target, draft, _ = load_models(target=args.target, draft=args.draft, dtype=dtype, device=device)
    target.eval()
    draft.eval()
    kwargs: dict[str, Any] = {"fine": args.fine, "time_budget_s": args.time_budget}
    if args.repeats is not None:
        kwargs["repeats"] = args.repeats
    prof = profile(target, draft, **kwargs)
    path = save_profile(prof)
    print(format_table(prof))
    rep = holdout_report(prof)
    for which, d in rep.items():
        print(f"{which} held-out MAPE: " + ", ".join(f"{k} {v * 100:.1f}%" for k, v in d.items()))
    print(f"sweep took {prof.meta['duration_s']:.1f} s; saved {path}")
    if args.plot:
        print(f"plot: {plot_profile(prof, args.plot)}")
    return 0
