"""SmartSpec-like baseline: one batch-uniform draft length from goodput with one running acceptance
rate (no per-token confidence, no per-row differences)."""
from __future__ import annotations

import numpy as np
import torch

from adaspec_hf.config import AdaptiveConfig
from adaspec_hf.core.tree import DraftTree
from adaspec_hf.efficiency.acceptance import AcceptanceModel
from adaspec_hf.efficiency.latency import LatencyModel
from adaspec_hf.efficiency.state import ModeState, ObservedCosts
from adaspec_hf.policies.base import DraftPolicy, LevelContext, StepContext, StepOutcome
from adaspec_hf.policies.planner import AdaptivePlanner, PlanStep

SMARTSPEC_EMA = 0.2  # weight of a step in its one batch-wide acceptance rate (its paper's smoothing)


class SmartSpec(AdaptivePlanner):
    """Batch-uniform draft length from goodput with one running acceptance rate (SmartSpec-like).

    Unlike :class:`AdaptivePlanner` it ignores the draft's per-token confidence and per-row
    differences: every row drafts the same ``k`` each step.
    """

    SMARTSPEC_DEPTH = 8  # its longest chain (the planners' default depth cap is for per-token decisions)
    trims = False  # it verifies its uniform k as drafted

    def __init__(self, latency: LatencyModel, acceptance: AcceptanceModel | None = None, *,
                 config: AdaptiveConfig | None = None, observed: ObservedCosts | None = None,
                 mode: ModeState | None = None, **overrides):
        overrides.setdefault("max_depth", self.SMARTSPEC_DEPTH)
        super().__init__(latency, acceptance, tree=False, config=config, observed=observed, mode=mode, **overrides)
        self.name = "smartspec"

    def max_depth(self, ctx: StepContext) -> torch.Tensor:
        rows = ctx.rows
        context = float(ctx.context_len.float().mean())
        verify = self._costs(rows, context, 1 + self.cap)
        rate = self.alpha.get(0, self.row_prior)
        best_k, best_t = 0, self.latency.overhead + verify[0]
        best_g = rows / best_t
        for k in range(1, self.cap + 1):
            t = self.latency.overhead + k * self._draft_cost(rows, 1, context) + verify[k]
            g = rows * (1 + sum(rate ** i for i in range(1, k + 1))) / t
            if g > best_g:
                best_k, best_g, best_t = k, g, t
        self._step = PlanStep(rows=rows, context=context, verify=verify, alpha=np.full(rows, rate))
        self.predicted_time = float(best_t)
        self.chosen.append(float(best_k))
        return torch.full((rows,), best_k, dtype=torch.long, device=ctx.context_len.device)

    def choose(self, ctx: LevelContext) -> tuple[torch.Tensor, torch.Tensor]:
        return DraftPolicy.choose(self, ctx)

    def select(self, tree: DraftTree, ctx: StepContext) -> torch.Tensor:
        return tree.valid  # uniform k: verify everything drafted

    def forget(self, row_id: int) -> None:
        pass  # its one rate is batch-wide (key 0), not a request's

    def observe(self, outcome: StepOutcome) -> None:
        tree = outcome.tree
        if tree.width:  # one batch-wide rate, kept under a single key
            tested = int((outcome.tested & tree.valid).sum())
            if tested:
                rate = int((outcome.accepted & tree.valid).sum()) / tested
                self.alpha[0] = (1 - SMARTSPEC_EMA) * self.alpha.get(0, self.row_prior) + SMARTSPEC_EMA * rate
