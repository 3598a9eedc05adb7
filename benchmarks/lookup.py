"""Prompt lookup vs the draft model vs the planner choosing per row, on text that repeats its prompt
and text that does not (built-in pair, or any pair given).

Workloads. Candidates: the pair's held-out prompts, and each as a "rewrite this code with one change"
prompt (the snippet = prompt + reference, a comment asking for the same code again, the snippet's
first line). Whether a continuation repeats its text is a property of the *target's* output, not of
the prompt (a tiny LM may not copy what it was shown), so every candidate is first decoded with plain
greedy generate and scored by its lookup hit rate (the share of generated tokens that a 1-token prompt
lookup over the text so far predicts exactly); the scores are in the summary.
  repeat  the candidates with the highest hit rate;
  novel   those with the lowest;
  mix     the two interleaved (batch 1: one after another; batch 4: two of each per batch).

Methods, side by side in one run: vanilla generate, HF's prompt lookup (prompt_lookup_num_tokens=10,
batch 1 only), our prompt lookup alone under the planner (lookup:adaptive) and at HF's fixed length
(lookup:static-10), the draft model alone (adaptive), and both merged, the planner verifying what
pays per row and step (adaptive+lookup). Greedy outputs are checked against vanilla.

    python benchmarks/lookup.py              # results in benchmarks/results/lookup*.json|md
    python benchmarks/lookup.py --target ID --draft ID
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from adaspec_hf import enable
from adaspec_hf.core.lookup import lookup_tree
from adaspec_hf.machine import load_average
from adaspec_hf.bench.harness import open_pair, pair_arguments, run_benchmark, write_results
from adaspec_hf.bench.prompts import FALLBACK_TEXTS
from adaspec_hf.pair import load_prompts

HF = "hf-prompt-lookup-k10"
LOOKUP = "lookup:adaptive"
DRAFT = "adaptive"
CHOICE = "adaptive+lookup"
METHODS_B1 = ["vanilla", HF, LOOKUP, "lookup:static-10", DRAFT, CHOICE]
METHODS_BN = ["vanilla", LOOKUP, DRAFT, CHOICE]
REWRITE = "\n\n# The same code again, with one change:\n"


def candidates(n: int, from_pair: bool) -> list[str]:
    """Held-out prompts and their "rewrite" variants, as text."""
    if from_pair:
        ds = load_prompts(None, n=n)
        pairs = list(zip(ds["prompt"], ds["reference"]))
    else:
        pairs = [(t, "") for t in (list(FALLBACK_TEXTS) * n)[:n]]
    return [p for p, _ in pairs] + [p + r + REWRITE + p.splitlines()[0] + "\n" for p, r in pairs]


def hit_rate(target, ids: list[int], max_new: int, pad: int, eos) -> float:
    """Share of the greedy continuation's tokens that a 1-token prompt lookup predicts exactly."""
    x = torch.tensor([ids])
    out = target.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                          do_sample=False, pad_token_id=pad, eos_token_id=eos)[0]
    hits = 0
    for t in range(len(ids), len(out)):
        tree = lookup_tree(out[None, :t], torch.tensor([t]), torch.tensor([1]))
        hits += int(tree.width > 0 and int(tree.tokens[0, 0]) == int(out[t]))
    return hits / max(1, len(out) - len(ids))


def main() -> None:
    ap = pair_arguments(__doc__.splitlines()[0])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--n-prompts", type=int, default=4, help="prompts per workload")
    ap.add_argument("--n-candidates", type=int, default=16, help="held-out prompts scored (each also as a rewrite)")
    ap.add_argument("--batch", type=int, default=4, help="batch size of the batched mix run (0: skip it)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    load = load_average()
    target, draft, tok = open_pair(args)
    enable(target)
    cands = [tok(t, add_special_tokens=False)["input_ids"] for t in candidates(args.n_candidates, args.target is None)]
    scores = [hit_rate(target, c, args.max_new_tokens, tok.pad_token_id, tok.eos_token_id)
              for c in tqdm(cands, desc="scoring candidates by lookup hit rate")]
    order = sorted(range(len(cands)), key=lambda i: -scores[i])
    k = min(args.n_prompts, len(cands) // 2)
    repeat, novel = [cands[i] for i in order[:k]], [cands[i] for i in order[-k:]]
    mixed = [p for pair in zip(repeat, novel) for p in pair]
    common = dict(max_new_tokens=args.max_new_tokens, repeats=args.repeats, warmup=0,
                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    # one warm-up of every method (takes the latency profiles of the pair and of the target alone)
    run_benchmark("warmup", target, draft, repeat[:1], METHODS_B1, repeats=1, progress=False,
                  max_new_tokens=16, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    summary: dict = {"max_new_tokens": args.max_new_tokens, "n_prompts": k, "load_average_at_start": load,
                     "hit_rate": {"repeat": [round(scores[i], 3) for i in order[:k]],
                                  "novel": [round(scores[i], 3) for i in order[-k:]],
                                  "all_candidates_mean": round(sum(scores) / len(scores), 3)}}
    runs = [("repeat", repeat, 1, METHODS_B1), ("novel", novel, 1, METHODS_B1), ("mix", mixed, 1, METHODS_B1)]
    if args.batch > 1:
        runs.append((f"mix_batch{args.batch}", mixed, args.batch, METHODS_BN))
    for name, prompts, bs, methods in runs:
        res = run_benchmark(f"lookup_{name}", target, draft, prompts, methods, batch_sizes=[bs], **common)
        print(res.table())
        write_results(res, args.out, plot=False)
        by = {r.method: r for r in res.rows}
        better = max(by[LOOKUP].tokens_per_s, by[DRAFT].tokens_per_s)
        entry = {
            "batch": bs,
            "tokens_per_s": {m: round(by[m].tokens_per_s, 2) for m in by},
            "speedup_vs_vanilla": {m: round(by[m].speedup, 3) for m in by if by[m].speedup},
            "accepted_per_step": {m: by[m].accepted_per_step for m in by if by[m].accepted_per_step is not None},
            "mean_draft_len": {m: by[m].mean_draft_len for m in by if by[m].mean_draft_len is not None},
            "choice_vs_better_of_lookup_and_draft": by[CHOICE].tokens_per_s / better,
            "choice_vs_lookup": by[CHOICE].tokens_per_s / by[LOOKUP].tokens_per_s,
            "choice_vs_draft": by[CHOICE].tokens_per_s / by[DRAFT].tokens_per_s,
            "load_average_after": load_average(),
        }
        if HF in by:
            entry["lookup_vs_hf_prompt_lookup"] = by[LOOKUP].tokens_per_s / by[HF].tokens_per_s
        summary[name] = entry
    path = Path(args.out) / "lookup_summary.json"
    path.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if isinstance(v, dict)}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
