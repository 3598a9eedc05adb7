"""Where a call's time goes, per method: draft, verify and the policy's own decisions, per step and per draft level.

The end-to-end benchmark says *that* adaptive is slower or faster than a static length; this one says
*why*, from the per-step records every run keeps (``target.adaspec_stats.steps``). Methods take turns
on every batch in a rotated order, repeat after repeat, so a drift of the machine's speed falls on
all of them alike; each figure is a mean per ``generate`` call (batch 1 unless ``--batch-size``: then
``--n-prompts`` prompts make left-padded batches of that many rows).

    python benchmarks/step_breakdown.py                       # static-5 vs adaptive, greedy
    python benchmarks/step_breakdown.py --methods static-2,adaptive --sample
    python benchmarks/step_breakdown.py --batch-size 8 --n-prompts 16 --methods static-3,adaptive
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from adaspec_hf.bench.harness import batches_of, machine_info, open_pair, pair_arguments
from adaspec_hf.bench.prompts import load_prompt_ids
from adaspec_hf.integrations.hf.generate import adaptive_generate
from adaspec_hf.machine import load_average

FIELDS = ("total_ms", "new_tokens", "steps", "draft_ms", "verify_ms", "decision_ms", "outside_steps_ms", "draft_levels",
          "verified", "accepted")
CALLS = ("max_depth", "choose", "select", "observe")  # the policy calls of a step (decision_ms split by call)


def per_call(c: str) -> str:
    """The reported key of a call's mean: choose runs once per draft level, the others once per step."""
    return f"{c}_ms_per_{'level' if c == 'choose' else 'step'}"


def one_call(target, draft, batch: tuple[torch.Tensor, torch.Tensor], policy: str, gen_kw: dict) -> dict[str, float]:
    x, mask = batch
    t0 = time.perf_counter()
    adaptive_generate(target, input_ids=x, attention_mask=mask, assistant_model=draft, draft_policy=policy, **gen_kw)
    total = time.perf_counter() - t0
    stats = target.adaspec_stats
    steps = stats.steps
    return {
        "total_ms": 1e3 * total, "new_tokens": stats.new_tokens, "steps": stats.target_forwards,
        "draft_ms": 1e3 * sum(s.draft_time for s in steps),
        "verify_ms": 1e3 * sum(s.verify_time for s in steps),
        "decision_ms": 1e3 * sum(s.decision_time for s in steps),
        # prefill, and the loop's work between steps (committing, stopping criteria, output)
        "outside_steps_ms": 1e3 * (total - sum(s.step_time for s in steps)),
        "draft_levels": sum(s.draft_levels for s in steps),
        "verified": stats.drafted_tokens,
        "accepted": stats.accepted_tokens,
        **{f"{c}_ms": 1e3 * sum((s.decision_split or {}).get(c, 0.0) for s in steps) for c in CALLS},
    }


def main() -> None:
    ap = pair_arguments(__doc__.splitlines()[0])
    ap.add_argument("--methods", default="static-5,adaptive", help="comma-separated policy names")
    ap.add_argument("--n-prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=1, help="rows per call (--n-prompts must be a multiple)")
    ap.add_argument("--sample", action="store_true", help="sample (at --temperature) instead of greedy")
    ap.add_argument("--temperature", type=float, default=0.7)
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or args.repeats < 1 or args.n_prompts < 1:
        ap.error("need at least one method, one prompt and one repeat")
    if args.batch_size < 1 or args.n_prompts % args.batch_size:
        ap.error(f"--n-prompts ({args.n_prompts}) must be a positive multiple of --batch-size ({args.batch_size})")
    load = load_average()
    target, draft, tok = open_pair(args)
    batches = batches_of(load_prompt_ids(tok, args.n_prompts), args.batch_size, tok.pad_token_id)
    gen_kw = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, pad_token_id=tok.pad_token_id)
    if args.sample:  # plain temperature sampling, as benchmarks/adaptive.py (no top-k / top-p from the model's config)
        gen_kw.update(temperature=args.temperature, top_k=0, top_p=1.0)
    for m in methods:  # warm-up: the pair's state (calibration, costs) as a session's later calls see it
        one_call(target, draft, batches[0], m, gen_kw)
    sums = {m: dict.fromkeys(FIELDS + tuple(f"{c}_ms" for c in CALLS), 0.0) for m in methods}
    calls = 0
    for r in range(args.repeats):
        for i, batch in enumerate(batches):
            shift = (r + i) % len(methods)
            for m in methods[shift:] + methods[:shift]:
                for k, v in one_call(target, draft, batch, m, gen_kw).items():
                    sums[m][k] += v
            calls += 1
    rows = {}
    for m in methods:
        mean = {k: v / calls for k, v in sums[m].items()}
        mean["draft_ms_per_level"] = mean["draft_ms"] / mean["draft_levels"] if mean["draft_levels"] else 0.0
        mean["decision_ms_per_step"] = mean["decision_ms"] / max(mean["steps"], 1e-9)
        mean["decision_share"] = mean["decision_ms"] / max(mean["total_ms"], 1e-9)
        mean["tokens_per_s"] = 1e3 * mean["new_tokens"] / max(mean["total_ms"], 1e-9)
        for c in CALLS:
            per = mean["draft_levels"] if c == "choose" else mean["steps"]
            mean[per_call(c)] = mean[f"{c}_ms"] / max(per, 1e-9)
        rows[m] = {k: round(v, 4) for k, v in mean.items()}
    cols = ("tokens_per_s", "total_ms", "steps", "draft_ms", "verify_ms", "decision_ms", "outside_steps_ms", "draft_levels",
            "accepted", "draft_ms_per_level", "decision_ms_per_step")
    print(f"per call, mean of {calls} calls each (batch {args.batch_size}, {'T=%g' % args.temperature if args.sample else 'greedy'}; "
          f"load average {load} at the start)")
    print(f"{'method':<14}" + "".join(f"{c:>20}" for c in cols))
    for m, row in rows.items():
        print(f"{m:<14}" + "".join(f"{row[c]:>20.2f}" for c in cols))
    split = [per_call(c) for c in CALLS]
    print("decision time by policy call (ms)")
    print(f"{'method':<14}" + "".join(f"{c:>24}" for c in split))
    for m, row in rows.items():
        print(f"{m:<14}" + "".join(f"{row[c]:>24.3f}" for c in split))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "step_breakdown_sampling" if args.sample else "step_breakdown_greedy"
    if args.batch_size > 1:
        name += f"_b{args.batch_size}"
    result = {"machine": machine_info(), "load_average": load, "args": vars(args), "calls_per_method": calls,
              "rows": rows}
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / name}.json")


if __name__ == "__main__":
    main()
