"""Adaptive speculation vs every baseline, on the built-in pair (or any pair given).

Sections (one run, one machine, side by side):
  A. batch 1, greedy and sampling (T=0.7): vanilla, HF assisted (defaults; heuristic schedule),
     static k = 1..8, heuristic, confidence, smartspec, static trees, adaptive (the default: chains
     when greedy, trees when sampling) and the planner's other shape (adaptive-tree greedy,
     adaptive-chain sampling).
  B. batch 1..32 greedy: vanilla, static k (best per batch size), adaptive, adaptive-tree.
  C. chain vs tree under load, sampling (T=0.7) at --sampling-batch-sizes (default 4 and 16):
     adaptive (trees) vs adaptive-chain.

    python benchmarks/adaptive.py                 # built-in pair; results in benchmarks/results/
    python benchmarks/adaptive.py --target ID --draft ID
"""
from __future__ import annotations

import json
from pathlib import Path

from adaspec_hf import enable
from adaspec_hf.bench.harness import open_pair, pair_arguments, run_benchmark, speed_ratios, write_results
from adaspec_hf.bench.methods import our_methods, planner_shapes
from adaspec_hf.bench.prompts import default_text_prompts, load_prompt_ids

STATIC = [f"static-{k}" for k in range(1, 9)]
TREES = ["tree-4x2", "tree-3x3"]


def main() -> None:
    ap = pair_arguments(__doc__.splitlines()[0])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--n-prompts", type=int, default=4, help="prompts per batch-1 run")
    ap.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches-per-size", type=int, default=1,
                    help="section B: batches of different prompts per batch size (one batch is one set of "
                         "prompts, whose own ease decides which static k wins; needs sizes x this many prompts)")
    ap.add_argument("--sections", default="A,B,C")
    ap.add_argument("--modes", default="greedy,sampling", help="section A: greedy, sampling (T=0.7) or both")
    ap.add_argument("--sampling-batch-sizes", default="4,16", help="section C: batch sizes (one batch each)")
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - {"greedy", "sampling"}:
        ap.error(f"--modes takes greedy and/or sampling, got {args.modes!r}")
    if args.batches_per_size < 1:
        ap.error(f"--batches-per-size must be >= 1, got {args.batches_per_size}")

    target, draft, tok = open_pair(args)
    enable(target)
    n_all = max(max(int(b) for b in args.batch_sizes.split(",")) * args.batches_per_size, args.n_prompts)
    prompts = load_prompt_ids(tok, n_all) if args.target is None else default_text_prompts(tok, n_all)
    if "B" in args.sections.split(",") and len(prompts) < n_all:
        ap.error(f"section B needs {n_all} prompts (largest batch size x --batches-per-size), the pair has "
                 f"{len(prompts)}")
    common = dict(max_new_tokens=args.max_new_tokens, repeats=args.repeats, warmup=0,
                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    # one global warm-up (also takes the latency profile if none is cached yet)
    run_benchmark("warmup", target, draft, prompts[:1], ["vanilla", "adaptive"], repeats=1, progress=False,
                  max_new_tokens=16, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    sections = set(args.sections.split(","))
    summary: dict = {}

    if "A" in sections:
        for mode, sample in (("greedy", False), ("sampling", True)):
            if mode not in modes:
                continue
            methods = ["vanilla", "hf-assisted", "hf-assisted-heuristic", *STATIC, "heuristic", "confidence",
                       "smartspec", *TREES, *our_methods(sample)]
            tree_m, chain_m = planner_shapes(sample)
            res = run_benchmark(f"adaptive_batch1_{mode}", target, draft, prompts[: args.n_prompts], methods,
                                batch_sizes=[1], do_sample=sample, **common)
            print(res.table())
            write_results(res, args.out)
            by = {r.method: r for r in res.rows}
            vs_static = speed_ratios(res.rows, "adaptive", STATIC)
            vs_hf = speed_ratios(res.rows, "adaptive", ["hf-assisted"])
            summary[f"batch1_{mode}"] = {
                "ours_vs_hf_assisted": vs_hf["hindsight"],
                "ours_vs_hf_assisted_paired": vs_hf["paired"],
                "ours_vs_best_static": vs_static["hindsight"],
                "best_static": vs_static["best"],
                "ours_vs_best_static_paired": vs_static["paired"],
                "ours_vs_best_static_paired_range": [vs_static["paired_min"], vs_static["paired_max"]],
                "ours_vs_best_static_held_out": vs_static.get("held_out"),
                "ours_is": "trees" if sample else "chains",  # what the default adaptive planned
                "tree_vs_chain_accepted_per_pass": (by[tree_m].accepted_per_step or 0)
                / max(by[chain_m].accepted_per_step or 1e-9, 1e-9),
                "tree_vs_chain_speed": by[tree_m].tokens_per_s / by[chain_m].tokens_per_s,
                "tree_vs_chain_speed_paired": speed_ratios(res.rows, tree_m, [chain_m])["paired"],
            }

    if "B" in sections:
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        res = run_benchmark("adaptive_batch_sweep", target, draft, prompts, ["vanilla", *STATIC[:4], "static-6",
                            "static-8", *our_methods(False)], batch_sizes=sizes, n_batches=args.batches_per_size, **common)
        rows = {(r.method, r.batch): r for r in res.rows}
        sweep = {}
        for b in sizes:
            at = [r for r in res.rows if r.batch == b]
            statics = [r.method for r in at if r.method in STATIC]
            vs = speed_ratios(at, "adaptive", ["vanilla", *statics])
            tree = speed_ratios(at, "adaptive-tree", ["adaptive"])
            sweep[b] = {"best_static": max(statics, key=lambda m: rows[(m, b)].tokens_per_s),
                        "better_of_vanilla_and_best_static": vs["best"],
                        "ours_vs_better_of_vanilla_and_best_static": vs["hindsight"],
                        "ours_vs_better_paired": vs["paired"], "ours_vs_better_held_out": vs.get("held_out"),
                        "tree_vs_better": rows[("adaptive-tree", b)].tokens_per_s / rows[(vs["best"], b)].tokens_per_s,
                        "tree_vs_ours": tree["hindsight"], "tree_vs_ours_paired": tree["paired"],
                        "ours_mean_draft_len": rows[("adaptive", b)].mean_draft_len}
        summary["batch_sweep"] = sweep
        res.config["summary"] = sweep
        print(res.table())
        write_results(res, args.out)

    if "C" in sections:
        sizes = [int(b) for b in args.sampling_batch_sizes.split(",")]
        res = run_benchmark("adaptive_tree_vs_chain_sampling", target, draft, prompts,
                            ["vanilla", "static-1", "static-4", *TREES, *our_methods(True)], batch_sizes=sizes,
                            n_batches=1, do_sample=True, **common)
        tree_m, chain_m = planner_shapes(True)
        rows = {(r.method, r.batch): r for r in res.rows}
        section_c = {}
        for b in sizes:
            at = [r for r in res.rows if r.batch == b]
            tree = speed_ratios(at, tree_m, [chain_m])
            vs = speed_ratios(at, "adaptive", ["vanilla", "static-1", "static-4"])
            section_c[b] = {"tree_vs_chain": tree["hindsight"], "tree_vs_chain_paired": tree["paired"],
                            "tree_vs_chain_paired_range": [tree["paired_min"], tree["paired_max"]],
                            "ours_vs_best_of_vanilla_static1_static4": vs["hindsight"], "best": vs["best"],
                            "ours_vs_best_paired": vs["paired"],
                            "accepted_per_pass_tree_chain": [rows[(tree_m, b)].accepted_per_step,
                                                             rows[(chain_m, b)].accepted_per_step]}
        summary["sampling_tree_vs_chain"] = section_c
        res.config["summary"] = section_c
        print(res.table())
        write_results(res, args.out)

    out = Path(args.out) / "adaptive_summary.json"
    # sections run separately update their own keys: a run of B keeps A's recorded summary
    previous = json.loads(out.read_text()) if out.exists() else {}
    out.write_text(json.dumps({**previous, **summary}, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
