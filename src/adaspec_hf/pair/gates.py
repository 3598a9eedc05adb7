"""Quality gates of the built-in pair: is it a real language model with an informative draft?

Every speed-up this project reports stands on the built-in pair, so a pair that loops, sits near the
unigram loss, or whose draft confidence says nothing about agreement would make every figure
meaningless. The gates are measured on held-out files (never trained on) and written to
``report.json``; a build that misses one fails loudly (see :func:`check_gates`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Gates:
    """Thresholds a full pair must meet (the quick test pair is exempt)."""

    max_target_loss: float = 5.0     # nats/token on held-out blocks (unigram is ~6.2 on this corpus)
    min_agreement: float = 0.60      # teacher-forced argmax(draft) == argmax(target)
    min_distinct4: float = 0.40      # distinct 4-grams of 64-token greedy continuations (loops score ~0.03)
    min_auc: float = 0.75            # ROC AUC of the draft's top-1 prob for agreeing with the target
    min_ratio: float = 8.0           # target / draft forward cost at a 256-token context

    def to_dict(self) -> dict:
        return asdict(self)


def distinct_ngrams(seqs: Sequence[Sequence[int]], n: int = 4) -> float:
    """Mean over sequences of (distinct n-grams / n-grams): 1.0 never repeats, a short loop ~0."""
    fracs = []
    for s in seqs:
        s = list(s)
        grams = [tuple(s[i:i + n]) for i in range(len(s) - n + 1)]
        if grams:
            fracs.append(len(set(grams)) / len(grams))
    if not fracs:
        raise ValueError(f"no sequence is longer than {n} tokens")
    return sum(fracs) / len(fracs)


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U; tied scores count one half).

    The probability that a random positive scores higher than a random negative: 0.5 is an
    uninformative score, below 0.5 points the wrong way.
    """
    scores, labels = scores.flatten().double(), labels.flatten().bool()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC AUC needs both positive and negative examples")
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.double)
    # average the ranks of tied scores
    uniq, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks[order] = mean_rank[inverse]
    u = float(ranks[labels].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


@torch.inference_mode()
def teacher_forced_stats(target, draft, blocks: torch.Tensor, batch_size: int = 8) -> dict:
    """On held-out token blocks: both models' next-token loss, greedy agreement, and the ROC AUC of
    the draft's top-1 probability as a predictor of that agreement (what the planner relies on)."""
    agree = n = 0
    tl = dl = 0.0
    conf, hit = [], []
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i:i + batch_size]
        t = target(input_ids=ids).logits.float()
        d = draft(input_ids=ids).logits.float()
        same = t.argmax(-1) == d.argmax(-1)
        agree += int(same.sum())
        n += ids.numel()
        conf.append(d.softmax(-1).amax(-1).flatten())
        hit.append(same.flatten())
        tgt = ids[:, 1:].flatten()
        tl += F.cross_entropy(t[:, :-1].flatten(0, 1), tgt, reduction="sum").item()
        dl += F.cross_entropy(d[:, :-1].flatten(0, 1), tgt, reduction="sum").item()
    m = len(blocks) * (blocks.shape[1] - 1)
    conf_t, hit_t = torch.cat(conf), torch.cat(hit)
    auc = roc_auc(conf_t, hit_t) if 0 < int(hit_t.sum()) < len(hit_t) else float("nan")
    return {"agreement": agree / n, "tokens": n, "target_loss": tl / m, "draft_loss": dl / m, "draft_conf_auc": auc}


@torch.inference_mode()
def greedy_continuations(model, prompts: Sequence[Sequence[int]], pad_token_id: int, max_new_tokens: int = 64,
                         batch_size: int = 16) -> list[list[int]]:
    """The model's own greedy continuations of ``prompts`` (left-padded batches, HF ``generate``)."""
    out: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[i:i + batch_size]]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(chunk):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, min_new_tokens=
                             max_new_tokens, do_sample=False, pad_token_id=pad_token_id)
        out.extend(gen[:, width:].tolist())
    return out


def evaluate_gates(stats: dict, distinct4: float, ratio: float, gates: Gates) -> dict:
    """One entry per gate: the measured value, the threshold, and whether it passed."""
    rows = {
        "target_heldout_loss": (stats["target_loss"], gates.max_target_loss, stats["target_loss"] <= gates.max_target_loss),
        "draft_agreement": (stats["agreement"], gates.min_agreement, stats["agreement"] >= gates.min_agreement),
        "distinct_4grams": (distinct4, gates.min_distinct4, distinct4 >= gates.min_distinct4),
        "draft_confidence_auc": (stats["draft_conf_auc"], gates.min_auc, stats["draft_conf_auc"] >= gates.min_auc),
        "cost_ratio": (ratio, gates.min_ratio, ratio >= gates.min_ratio),
    }
    return {k: {"value": round(float(v), 4), "threshold": t, "kind": "max" if k == "target_heldout_loss" else "min",
                "passed": bool(ok)} for k, (v, t, ok) in rows.items()}


def failed_gates(gates: dict) -> list[str]:
    return [k for k, g in gates.items() if not g["passed"]]


class WeakPairError(RuntimeError):
    """The pair misses a quality gate: figures measured on it would not mean anything."""


GATE_ADVICE = (
    "rebuild it on an idle machine with `adaspec-hf pair build --force` (the build trains a fixed token "
    "budget; a busy machine only makes it slower, but timing noise can still lower the cost ratio), or pass "
    "--allow-weak-pair / allow_weak_pair=True to use it anyway"
)

COST_ONLY_ADVICE = (
    "only the cost ratio missed, which depends on how busy the machine was when it was timed: run "
    "`adaspec-hf pair build` again on an idle machine (it re-times the pair without retraining), or pass "
    "--allow-weak-pair / allow_weak_pair=True to use it anyway"
)


def check_gates(report: dict, where: str) -> None:
    """Raise :class:`WeakPairError` naming every missed gate of a full pair's report."""
    gates = report.get("gates")
    if not gates or report.get("recipe", {}).get("name") != "full":
        return
    missed = failed_gates(gates)
    if missed:
        desc = ", ".join(f"{k} {gates[k]['value']:.3g} ({'<=' if gates[k]['kind'] == 'max' else '>='} "
                         f"{gates[k]['threshold']})" for k in missed)
        advice = COST_ONLY_ADVICE if missed == ["cost_ratio"] else GATE_ADVICE
        raise WeakPairError(f"the pair in {where} misses its quality gates: {desc}; {advice}")
