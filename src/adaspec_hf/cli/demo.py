"""`adaspec-hf demo`: the main job — a short side-by-side run on held-out prompts.

Plain generation, HF assisted generation and ``adaptive=True`` on the same prompts, with tokens/s,
speed-up, accepted tokens per step and a sample of the text. With no arguments it builds (first
time, ~15 min on 2 CPU cores) or loads the built-in pair; ``--target/--draft`` take any HF ids/paths.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from adaspec_hf import enable
from adaspec_hf.bench.harness import RESULTS_DIR, run_benchmark, write_results
from adaspec_hf.bench.prompts import default_text_prompts, load_prompt_ids
from adaspec_hf.machine import is_busy, load_average
from adaspec_hf.pair import WeakPairError, load_models

SAMPLE_TEMPERATURE = 0.7  # --sample: a usual chat temperature, far enough from greedy to exercise sampling


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """``adaspec-hf demo``."""
    p = subparsers.add_parser("demo", help="side-by-side run: plain vs HF assisted vs adaptive (main job)")
    p.add_argument("--target", help="HF id/path of the target (default: the built-in pair)")
    p.add_argument("--draft", help="HF id/path of the draft (default: the built-in pair)")
    p.add_argument("--n-prompts", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--sample", action="store_true", help=f"sample (temperature {SAMPLE_TEMPERATURE:g}) instead of greedy")
    p.add_argument("--policy", default="adaptive", help="draft_policy for adaptive=True")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--save", action="store_true", help=f"also write JSON/markdown to {RESULTS_DIR}")
    p.add_argument("--allow-weak-pair", action="store_true",
                   help="run on a built-in pair that missed its quality gates (its figures mean little)")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    load = load_average()
    if is_busy(load):
        print(f"warning: the machine is busy (load average {load:.2f} on {os.cpu_count()} CPUs): timings below "
              "are disturbed; re-run on an idle machine for figures worth writing down", file=sys.stderr)

    try:
        target, draft, tok = load_models(args.target, args.draft, dtype=getattr(torch, args.dtype),
                                         device=args.device, allow_weak_pair=args.allow_weak_pair)
    except WeakPairError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    enable(target)
    if args.target is None:
        prompts = load_prompt_ids(tok, args.n_prompts)
    else:
        prompts = default_text_prompts(tok, args.n_prompts)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    methods = ["vanilla", "hf-assisted", args.policy]
    if args.batch_size > 1:
        methods = ["vanilla", args.policy]  # HF assisted generation supports batch size 1 only
    res = run_benchmark(
        "demo", target, draft, prompts, methods, batch_sizes=[args.batch_size],
        max_new_tokens=args.max_new_tokens, do_sample=args.sample, repeats=1, warmup=1,
        pad_token_id=pad, eos_token_id=tok.eos_token_id,
    )
    print()
    print(res.table())
    load_end = load_average()
    if load is not None and load_end is not None:
        print(f"(machine load average {load:.2f} before, {load_end:.2f} after, {os.cpu_count()} CPUs)")
    by = {r.method: r for r in res.rows}
    ours = by[args.policy]
    print(f"\nadaptive speculation: {ours.tokens_per_s:.1f} tokens/s, {ours.speedup:.2f}x plain generation"
          + (f", {ours.tokens_per_s / by['hf-assisted'].tokens_per_s:.2f}x HF assisted" if "hf-assisted" in by else "")
          + f"; {ours.accepted_per_step:.2f} draft tokens accepted per target pass")
    # a sample of the text, generated with adaptive speculation
    ids = torch.tensor([prompts[0]], device=target.device)
    out = target.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                          do_sample=args.sample, temperature=SAMPLE_TEMPERATURE if args.sample else None,
                          assistant_model=draft, adaptive=True, draft_policy=args.policy, pad_token_id=pad)
    print("\n--- sample (prompt | continuation) ---")
    print(tok.decode(ids[0]) + " | " + tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    if args.save:
        for kind, path in write_results(res).items():
            print(f"{kind}: {path}")
    return 0
