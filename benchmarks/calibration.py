"""Acceptance-model calibration on the built-in pair (or any pair): ECE before and after a warm-up.

Runs k=6 chains over held-out prompts, records every tried node's draft probability, depth and
outcome (greedy: accepted or not), warms an AcceptanceModel up on the first half and reports the
expected calibration error on the second half (and of the raw draft probability, for reference).

    python benchmarks/calibration.py        # writes benchmarks/results/calibration.json
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from adaspec_hf import enable
from adaspec_hf.efficiency.acceptance import AcceptanceModel
from adaspec_hf.bench.prompts import load_prompt_ids
from adaspec_hf.bench.harness import open_pair, pair_arguments
from adaspec_hf.policies import StaticChain


class Recorder(StaticChain):
    def __init__(self, k: int):
        super().__init__(k)
        self.records: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def observe(self, outcome) -> None:
        tried = outcome.tested & outcome.tree.valid
        self.records.append((outcome.tree.draft_prob[tried], outcome.tree.depth[tried], outcome.accepted[tried].float()))


def main() -> None:
    ap = pair_arguments(__doc__.splitlines()[0])
    ap.add_argument("--n-prompts", type=int, default=16)
    ap.add_argument("--k", type=int, default=6)
    args = ap.parse_args()
    target, draft, tok = open_pair(args, what=None)
    enable(target)
    rec = Recorder(args.k)
    for p in load_prompt_ids(tok, args.n_prompts):
        ids = torch.tensor([p])
        target.generate(input_ids=ids, max_new_tokens=48, do_sample=False, assistant_model=draft,
                        adaptive=True, draft_policy=rec)
    p = torch.cat([r[0] for r in rec.records])
    d = torch.cat([r[1] for r in rec.records])
    y = torch.cat([r[2] for r in rec.records])
    half = len(p) // 2
    model = AcceptanceModel()
    raw = model.ece(p[half:], d[half:], y[half:])
    model.update(p[:half], d[:half], y[:half])
    warmed = model.ece(p[half:], d[half:], y[half:])
    result = {"nodes": len(p), "acceptance_rate": float(y.mean()), "warmup_nodes": half,
              "ece_raw_draft_prob": raw, "ece_after_warmup": warmed, "k": args.k, "n_prompts": args.n_prompts}
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
