"""Acceptance-model calibration on the built-in pair (or any pair): ECE after a warm-up of verified nodes.

Runs k=6 chains over held-out prompts and records every tried node's draft probability, depth and
outcome (greedy: accepted or not), step by step. Three figures:

* prequential ECE: the model learns step by step as the planner's does, and each step's nodes are
  predicted *before* it learns from them; reported over the nodes after the first ``--warmup``;
* frozen ECE: the model fitted on the first ``--warmup`` nodes, judged on all the rest;
* the noise floor: the ECE a perfectly calibrated predictor would show on as many nodes (outcomes
  drawn from its own predictions), since a binned ECE over a few hundred 0/1 outcomes is never 0.

    python benchmarks/calibration.py        # writes benchmarks/results/calibration.json
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from adaspec_hf import enable
from adaspec_hf.efficiency.acceptance import AcceptanceModel, expected_calibration_error
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


def noise_floor(pred: torch.Tensor, draws: int = 200, seed: int = 0) -> float:
    """Mean ECE of ``pred`` against outcomes drawn from ``pred`` itself (a calibrated predictor)."""
    g = torch.Generator().manual_seed(seed)
    return sum(expected_calibration_error(pred, torch.bernoulli(pred.double(), generator=g))
               for _ in range(draws)) / draws


def main() -> None:
    ap = pair_arguments(__doc__.splitlines()[0])
    ap.add_argument("--n-prompts", type=int, default=48)
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=300, help="verified nodes before the ECE is judged")
    args = ap.parse_args()
    target, draft, tok = open_pair(args, what=None)
    enable(target)
    rec = Recorder(args.k)
    for p in load_prompt_ids(tok, args.n_prompts):
        ids = torch.tensor([p])
        target.generate(input_ids=ids, max_new_tokens=48, do_sample=False, assistant_model=draft,
                        adaptive=True, draft_policy=rec)
    p = torch.cat([r[0] for r in rec.records]).float()
    d = torch.cat([r[1] for r in rec.records])
    y = torch.cat([r[2] for r in rec.records])
    n_warm = min(args.warmup, len(p) // 2)
    # prequential: predict each step's nodes, then learn from them
    online, preds, seen = AcceptanceModel(), [], 0
    for rp, rd, ry in rec.records:
        if seen >= n_warm:
            preds.append(online.predict(rp.float(), rd))
        if len(rp):
            online.update(rp.float(), rd, ry)
        seen += len(rp)
    pre = torch.cat(preds)
    y_pre = y[len(p) - len(pre):]
    frozen = AcceptanceModel()
    raw = frozen.ece(p[n_warm:], d[n_warm:], y[n_warm:])
    frozen.update(p[:n_warm], d[:n_warm], y[:n_warm])
    frozen_pred = frozen.predict(p[n_warm:], d[n_warm:])
    result = {
        "nodes": len(p), "acceptance_rate": float(y.mean()), "warmup_nodes": n_warm, "judged_nodes": len(pre),
        "ece_raw_draft_prob": raw,
        "ece_prequential_after_warmup": expected_calibration_error(pre, y_pre),
        "ece_frozen_after_warmup": expected_calibration_error(frozen_pred, y[n_warm:]),
        "ece_noise_floor": noise_floor(pre),
        "mean_predicted": float(pre.mean()), "mean_outcome": float(y_pre.mean()),
        "k": args.k, "n_prompts": args.n_prompts,
    }
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
