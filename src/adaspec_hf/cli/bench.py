"""``adaspec-hf bench`` (decoding methods side by side) and ``adaspec-hf bench serve`` (SLO serving)."""
from __future__ import annotations

import argparse
import logging
import sys

import torch

from adaspec_hf.bench.harness import RESULTS_DIR, run_benchmark, write_results
from adaspec_hf.bench.prompts import default_text_prompts, load_prompt_ids
from adaspec_hf.bench.serving import DEFAULT_SYSTEMS, run_serving_benchmark
from adaspec_hf.bench.serving_results import write_serving_results
from adaspec_hf.pair import load_models, load_pair, load_prompts

SERVE_DESCRIPTION = "Serving benchmark: replay seeded workloads against the engine, systems side by side, one run."


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """``adaspec-hf bench [serve]``."""
    p = subparsers.add_parser("bench", help="compare decoding methods side by side (tokens/s, speed-up)")
    p.add_argument("--target", help="HF id/path of the target (default: the built-in pair)")
    p.add_argument("--draft", help="HF id/path of the draft (default: the built-in pair)")
    p.add_argument("--methods", default="vanilla,hf-assisted,hf-assisted-heuristic,static-4,adaptive",
                   help="comma-separated method names")
    p.add_argument("--batch-sizes", default="1", help="comma-separated batch sizes")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--n-prompts", type=int, default=8)
    p.add_argument("--sample", action="store_true", help="sampling instead of greedy")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--name", default="bench")
    p.add_argument("--out", default=str(RESULTS_DIR))
    p.add_argument("--allow-weak-pair", action="store_true",
                   help="run on a built-in pair that missed its quality gates (its figures mean little)")
    p.set_defaults(func=_cli)
    register_serve_cli(p.add_subparsers(dest="bench_command", title="sub-benchmarks"))


def _cli(args: argparse.Namespace) -> int:
    dtype = getattr(torch, args.dtype)
    target, draft, tok = load_models(args.target, args.draft, dtype=dtype, device=args.device,
                                     allow_weak_pair=args.allow_weak_pair)
    prompts = load_prompt_ids(tok, args.n_prompts) if args.target is None else default_text_prompts(tok, args.n_prompts)
    res = run_benchmark(
        args.name, target, draft, prompts, [m.strip() for m in args.methods.split(",") if m.strip()],
        batch_sizes=[int(b) for b in args.batch_sizes.split(",")], max_new_tokens=args.max_new_tokens,
        do_sample=args.sample, temperature=args.temperature, repeats=args.repeats,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    print(res.table())
    for kind, path in write_results(res, args.out).items():
        print(f"{kind}: {path}")
    return 0


def _parse_output_len(s: str):
    if s == "data":
        return "data"
    if "-" in s:
        lo, hi = s.split("-", 1)
        return (int(lo), int(hi))
    return int(s)


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", help="HF id/path of the target (default: the built-in pair)")
    p.add_argument("--draft", help="HF id/path of the draft (default: the built-in pair)")
    p.add_argument("--pair-dir", help="a built pair's directory (default: the built-in full pair)")
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS), help="comma-separated systems")
    p.add_argument("--rates", default="auto", help="comma-separated requests/s, or 'auto' (multiples of the "
                   "rate a vanilla one-request-at-a-time server sustains)")
    p.add_argument("--rate-multipliers", default="1,2,3", help="for --rates auto")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per rate and system")
    p.add_argument("--max-requests", type=int, default=None, help="cap on requests per rate")
    p.add_argument("--arrival", choices=["poisson", "gamma"], default="poisson")
    p.add_argument("--cv", type=float, default=2.0, help="gap coefficient of variation for gamma arrivals")
    p.add_argument("--output-len", default="data", help="'data' (reference length, clipped 16-64), 'LO-HI' or N")
    p.add_argument("--tight", type=float, default=1.2, help="tight TPOT SLO, x vanilla per-token latency")
    p.add_argument("--loose", type=float, default=3.0, help="loose TPOT SLO, x vanilla per-token latency")
    p.add_argument("--tight-fraction", type=float, default=0.5)
    p.add_argument("--ttft-scale", type=float, default=10.0, help="TTFT SLO, x vanilla single-request TTFT")
    p.add_argument("--max-rows", type=int, default=8)
    p.add_argument("--n-prompts", type=int, default=None)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--drain-timeout", type=float, default=10.0,
                   help="seconds after the last arrival before unfinished requests are cancelled (missed)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", default=None,
                   help="comma-separated workload seeds (overrides --seed): each rate replays one workload per "
                        "seed, systems by turns, and the table and JSON pool the runs (one run's spread is "
                        "larger than the gaps between systems)")
    p.add_argument("--engine-thread", action="store_true",
                   help="step the engine on its own background thread (default: in the main thread, Engine.run, "
                        "with arrivals replayed from a client thread; on a CPU the background loop runs slower)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="every request samples at this temperature (0: greedy); planners take the sampling "
                        "calibration, and 'adaptive' plans token trees, as generate() does when sampling")
    p.add_argument("--name", default="serving")
    p.add_argument("--out", default=str(RESULTS_DIR))


def register_serve_cli(subparsers) -> None:
    """``adaspec-hf bench serve ...``."""
    p = subparsers.add_parser("serve", help="SLO serving benchmark (attainment and goodput vs request rate)")
    add_serve_arguments(p)
    p.set_defaults(func=serve_cli)


def serve_cli(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.pair_dir:
        target, draft, tok = load_pair(args.pair_dir, build=False, dtype=dtype, device=args.device)
        prompts = load_prompts(args.pair_dir, n=args.n_prompts)
    else:
        target, draft, tok = load_models(args.target, args.draft, dtype=dtype, device=args.device)
        if args.target is None:
            prompts = load_prompts(None, n=args.n_prompts)
        else:
            prompts = [tok.decode(p) for p in default_text_prompts(tok, args.n_prompts or 8)]
    for m in (target, draft):
        if getattr(m.config, "use_cache", True) is False:  # a training-time setting saved with the weights
            m.config.use_cache = True
    rates = "auto" if args.rates == "auto" else [float(x) for x in args.rates.split(",")]
    res = run_serving_benchmark(
        target, draft, tok, prompts, systems=[s.strip() for s in args.systems.split(",") if s.strip()],
        rates=rates, rate_multipliers=[float(x) for x in args.rate_multipliers.split(",")],
        duration=args.duration, max_requests=args.max_requests, arrival=args.arrival, cv=args.cv,
        output_len=_parse_output_len(args.output_len), tight=args.tight, loose=args.loose,
        tight_fraction=args.tight_fraction, ttft_scale=args.ttft_scale, max_rows=args.max_rows,
        warmup=args.warmup, drain_timeout=args.drain_timeout, seed=args.seed,
        seeds=[int(x) for x in args.seeds.split(",") if x.strip()] if args.seeds else None, name=args.name,
        engine_thread=args.engine_thread, temperature=args.temperature,
        extra_config={"command": " ".join(["adaspec-hf bench serve"] + sys.argv[3:]) if sys.argv[1:2] == ["bench"]
                      else " ".join(sys.argv), "threads": torch.get_num_threads(),
                      "pair_dir": args.pair_dir, "target": args.target, "draft": args.draft},
    )
    print(res.table())
    for kind, path in write_serving_results(res, args.out).items():
        print(f"{kind}: {path}")
    return 0


def serve_main(argv: list[str] | None = None) -> int:
    """`benchmarks/serving.py`: the serve benchmark without the `adaspec-hf bench` prefix."""
    parser = argparse.ArgumentParser(prog="benchmarks/serving.py", description=SERVE_DESCRIPTION)
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return serve_cli(args)
