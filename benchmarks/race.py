"""How often a draft proposal is the target's sampled token, per drafting rule (no timing).

At every position of the target's own sampled continuations of held-out prompts (temperature T,
the engine's seeded race), with the draft's distribution q and the target's p at that position:

* ``top1 (p of argmax q)``: a draft that ignores the sampling noise proposes its argmax, accepted
  with p(x) (the rule before the race was shared);
* ``race top1``: the draft's own race winner under the target's noise (what the drafter proposes),
  measured as a 0/1 agreement with the token the target actually drew;
* ``1 - TV``: speculative sampling's acceptance of a child sampled from q, for reference;
* ``sampled (E_q p)``: a child drawn from q independently of the noise, accepted with p(x);
* two and three siblings: the union of the first w candidates under each rule (a tree level).

    python benchmarks/race.py                  # writes benchmarks/results/race.{json,md}
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from adaspec_hf.bench.harness import open_pair, pair_arguments
from adaspec_hf.bench.prompts import load_prompt_ids
from adaspec_hf.core.race import RaceNoise, race_sample, race_scores


def agreement(target, draft, prompts: list[list[int]], temperature: float, max_new: int, seed: int) -> dict:
    sums: dict[str, float] = {}
    n_pos = 0
    for i, prompt in enumerate(prompts):
        race = RaceNoise()  # per prompt: the sample and the draft's ranking read the same vectors
        ids = list(prompt)
        key = seed + i
        with torch.no_grad():
            for _ in range(max_new):  # the target's seeded sample, token by token (its own race)
                p = torch.softmax(target(torch.tensor([ids])).logits[0, -1].double() / temperature, -1)
                ids.append(int(race_sample(p[None], torch.tensor([key]), torch.tensor([len(ids)]), race)[0]))
            full = torch.tensor([ids])
            start = len(prompt) - 1
            p = torch.softmax(target(full).logits[0, start:-1].double() / temperature, -1)
            q = torch.softmax(draft(full).logits[0, start:-1].double() / temperature, -1)
        n, v = p.shape
        y = torch.tensor(ids[len(prompt):])
        noise = race(torch.full((n,), key), torch.arange(len(prompt), len(prompt) + n), v)
        ranked = race_scores(q, noise).topk(3, -1).indices
        top = q.topk(3, -1).indices
        rows = {
            "top1 (p of argmax q)": p.gather(1, top[:, :1]).sum(1),
            "race top1": (ranked[:, 0] == y).double(),
            "1 - TV": torch.minimum(p, q).sum(1),
            "sampled (E_q p)": (p * q).sum(1),
            "top2 siblings (p)": p.gather(1, top[:, :2]).sum(1),
            "race top2 siblings": (ranked[:, :2] == y[:, None]).any(1).double(),
            "top3 siblings (p)": p.gather(1, top).sum(1),
            "race top3 siblings": (ranked == y[:, None]).any(1).double(),
        }
        for k, val in rows.items():
            sums[k] = sums.get(k, 0.0) + float(val.sum())
        n_pos += n
    return {"positions": n_pos, **{k: s / n_pos for k, s in sums.items()}}


def main() -> None:
    ap = pair_arguments(__doc__.splitlines()[0])
    ap.add_argument("--n-prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperatures", default="0.7,1.0")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    target, draft, tok = open_pair(args, what=None)
    prompts = load_prompt_ids(tok, args.n_prompts) if args.target is None else None
    if prompts is None:
        from adaspec_hf.bench.prompts import default_text_prompts
        prompts = default_text_prompts(tok, args.n_prompts)
    result = {"n_prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "seed": args.seed, "by_temperature": {}}
    for t in (float(x) for x in args.temperatures.split(",")):
        result["by_temperature"][str(t)] = agreement(target, draft, prompts, t, args.max_new_tokens, args.seed)
    temps = list(result["by_temperature"])
    keys = [k for k in result["by_temperature"][temps[0]] if k != "positions"]
    lines = ["| proposal accepted | " + " | ".join(f"T={t}" for t in temps) + " |",
             "|---|" + "---|" * len(temps)]
    lines += [f"| {k} | " + " | ".join(f"{result['by_temperature'][t][k]:.3f}" for t in temps) + " |" for k in keys]
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "race.json").write_text(json.dumps(result, indent=2))
    (out / "race.md").write_text(f"# race\n\n{table}\n")


if __name__ == "__main__":
    main()
