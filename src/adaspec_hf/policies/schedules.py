"""Schedules HF users know: the +2/-1 ``heuristic`` draft length and a draft-confidence threshold."""
from __future__ import annotations

import torch

from adaspec_hf.policies.base import DraftPolicy, LevelContext, StepContext, StepOutcome


class Heuristic(DraftPolicy):
    """HF's ``heuristic`` schedule per row: +2 after a fully accepted draft, -1 otherwise."""

    name = "heuristic"

    def __init__(self, start: int = 5, max_k: int = 32):
        self.start, self.max_k = start, max_k
        self.depth_limit = max(start, max_k)
        self.k: dict[int, int] = {}

    def reset(self) -> None:
        self.k.clear()

    def forget(self, row_id: int) -> None:
        self.k.pop(row_id, None)

    def _ids(self, n: int, row_ids: torch.Tensor | None) -> list[int]:
        return row_ids.tolist() if row_ids is not None else list(range(n))

    def max_depth(self, ctx: StepContext) -> torch.Tensor:
        ks = [self.k.get(r, self.start) for r in self._ids(ctx.rows, ctx.row_ids)]
        return torch.tensor(ks, dtype=torch.long, device=ctx.context_len.device)

    def observe(self, outcome: StepOutcome) -> None:
        drafted = outcome.tree.n_nodes.tolist() if outcome.tree.width else [0] * len(outcome.n_accepted)
        for r, n, a in zip(self._ids(len(drafted), outcome.row_ids), drafted, outcome.n_accepted.tolist()):
            if n == 0:
                continue
            k = self.k.get(r, self.start)
            self.k[r] = min(k + 2, self.max_k) if a == n else max(k - 1, 1)


class Confidence(DraftPolicy):
    """Draft while the draft's own probability stays above a threshold (HF / DISCO style)."""

    def __init__(self, threshold: float = 0.4, max_k: int = 20):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"confidence threshold must be in [0, 1], got {threshold}")
        self.threshold, self.max_k = threshold, max_k
        self.depth_limit = max_k
        self.name = f"confidence-{threshold:g}"

    def max_depth(self, ctx: StepContext) -> torch.Tensor:
        return torch.full_like(ctx.context_len, self.max_k)

    def choose(self, ctx: LevelContext) -> tuple[torch.Tensor, torch.Tensor]:
        go = ctx.max_depth >= ctx.level
        confident = ctx.cand_prob[:, 0] >= self.threshold if ctx.cand_prob.shape[1] else go
        return go.long(), (go & confident & (ctx.max_depth > ctx.level)).long()
