"""What a decoding run reports: per-step records, per-call totals, and ``generate``'s result."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StepRecord:
    rows: int
    drafted: list[int]  # nodes verified per row
    accepted: list[int]  # draft tokens accepted per row
    draft_time: float
    verify_time: float
    step_time: float  # draft + verify + the policy's learning from the outcome
    predicted_time: float | None = None
    decision_time: float = 0.0  # seconds inside the policy's calls (part of step_time)
    draft_levels: int = 0  # draft levels offered to the policy (the catch-up forward's and each expansion's)
    kept_depth: int = 0  # depth of the deepest verified node (levels beyond it were drafted for nothing)
    decision_split: dict[str, float] | None = None  # decision_time per policy call (max_depth, choose, ...)


@dataclass
class GenerationStats:
    """Per-call statistics (exposed as ``model.adaspec_stats`` after ``generate(adaptive=True)``)."""

    policy: str = ""
    steps: list[StepRecord] = field(default_factory=list)
    prefill_time: float = 0.0
    total_time: float = 0.0
    new_tokens: int = 0
    history: int | None = None  # keep only the last ``history`` records (long-running engines)
    config: dict | None = None  # the AdaptiveConfig (or EngineConfig) that ran, as a plain dict
    # totals of the records dropped from ``steps``: forwards, row-steps, drafted, accepted
    folded: list[int] = field(default_factory=lambda: [0, 0, 0, 0], repr=False)

    def record(self, step: StepRecord) -> None:
        """Append a step record; beyond ``history`` the oldest are folded into the totals."""
        self.steps.append(step)
        if self.history is not None and len(self.steps) > self.history:
            cut = len(self.steps) - self.history
            old = self.steps[:cut]
            del self.steps[:cut]
            f = self.folded
            f[0] += len(old)
            f[1] += sum(s.rows for s in old)
            f[2] += sum(sum(s.drafted) for s in old)
            f[3] += sum(sum(s.accepted) for s in old)

    @property
    def target_forwards(self) -> int:
        return self.folded[0] + len(self.steps)

    @property
    def row_steps(self) -> int:
        return self.folded[1] + sum(s.rows for s in self.steps)

    @property
    def drafted_tokens(self) -> int:
        return self.folded[2] + sum(sum(s.drafted) for s in self.steps)

    @property
    def accepted_tokens(self) -> int:
        return self.folded[3] + sum(sum(s.accepted) for s in self.steps)

    @property
    def accepted_per_step(self) -> float:
        """Mean accepted draft tokens per row per target pass."""
        return self.accepted_tokens / max(self.row_steps, 1)

    @property
    def tokens_per_step(self) -> float:
        """Mean emitted tokens per row per target pass (1 + accepted)."""
        return 1.0 + self.accepted_per_step

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / max(self.drafted_tokens, 1)

    @property
    def mean_draft_len(self) -> float:
        return self.drafted_tokens / max(self.row_steps, 1)

    @property
    def decision_share(self) -> float:
        """Share of step time spent in the policy's own calls (over the records kept)."""
        return sum(s.decision_time for s in self.steps) / max(sum(s.step_time for s in self.steps), 1e-12)

    @property
    def idle_levels_per_step(self) -> float:
        """Draft levels per step past the deepest verified node (drafted, then not used; records kept)."""
        return sum(max(s.draft_levels - s.kept_depth, 0) for s in self.steps) / max(len(self.steps), 1)

    def summary(self) -> dict:
        return {
            "policy": self.policy, "target_forwards": self.target_forwards,
            "new_tokens": self.new_tokens, "accepted_per_step": round(self.accepted_per_step, 3),
            "tokens_per_step": round(self.tokens_per_step, 3),
            "acceptance_rate": round(self.acceptance_rate, 3),
            "mean_draft_len": round(self.mean_draft_len, 3), "total_time": round(self.total_time, 4),
            "decision_share": round(self.decision_share, 4), "idle_levels_per_step": round(self.idle_levels_per_step, 3),
            "config": self.config,
        }


@dataclass
class DecodeResult:
    sequences: torch.Tensor  # (B, P + T): prompts as given, then generated tokens, pad-filled
    scores: tuple[torch.Tensor, ...] | None
    logits: tuple[torch.Tensor, ...] | None
    stats: GenerationStats
    new_tokens: list[list[int]]
