"""Cost curves the simulator charges steps with: what a step would take on some hardware.

``ProfileCost``: this machine, from the latency profile the planners fit (so a simulated planner
is judged on the same costs it believes: any loss is a decision loss, not a model error).
``GpuShapedCost``: a GPU-like curve, verify time flat up to a token budget then linear, draft time
constant per level: the regime where trees and SLO-first selection are reported to pay.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from adaspec_hf.config import AdaptiveConfig
from adaspec_hf.efficiency.latency import LatencyModel
from adaspec_hf.policies.registry import make_policy, needs_profile


class CostCurve(Protocol):
    overhead: float

    def verify(self, rows: int, tokens: int, context: float) -> float:
        """Seconds of one target forward over ``tokens`` query tokens per row."""

    def draft(self, rows: int, tokens: float, context: float) -> float:
        """Seconds of one draft forward over ``tokens`` query tokens per row."""


class ProfileCost:
    """``level_extra``: seconds a draft level costs beyond the profile's bare forward (the drafter's
    and the policy's own work in the real loop, ~2.5 ms a level for the built-in pair on a 2-core
    CPU against a 0.9 ms forward); 0 charges the bare forwards, as the planner first believes.
    ``verify_scale``: the loop's verify time over the profile's (on the AVX2 build the loop's
    verify measured 0.8x the profile's: a profile is a separate measurement, and can be off)."""

    def __init__(self, latency, level_extra: float = 0.0, verify_scale: float = 1.0) -> None:
        if not level_extra >= 0:
            raise ValueError(f"level_extra must be >= 0 seconds, got {level_extra}")
        if not verify_scale > 0:
            raise ValueError(f"verify_scale must be > 0, got {verify_scale}")
        self.latency = latency
        self.overhead = float(latency.overhead)
        self.level_extra = float(level_extra)
        self.verify_scale = float(verify_scale)

    def verify(self, rows: int, tokens: int, context: float) -> float:
        return float(self.latency.target_time(rows, tokens, context)) * self.verify_scale

    def draft(self, rows: int, tokens: float, context: float) -> float:
        return float(self.latency.draft_time(rows, max(tokens, 1.0), context)) + self.level_extra


@dataclass
class GpuShapedCost:
    """``verify = base`` while ``rows * tokens <= budget``, then ``+ per_token`` per extra token;
    ``draft = draft_level`` per forward whatever its width (a small model is latency bound)."""

    base: float = 0.020
    budget: int = 256
    per_token: float = 0.00005
    draft_level: float = 0.002
    overhead: float = 0.0005

    def verify(self, rows: int, tokens: int, context: float) -> float:
        return self.base + self.per_token * max(0, rows * tokens - self.budget)

    def draft(self, rows: int, tokens: float, context: float) -> float:
        return self.draft_level

    def as_latency_points(self, rows=(1, 2, 4, 8, 16, 32), tokens=(1, 2, 4, 8, 16, 32), contexts=(64, 1024)):
        """Grid points for a LatencyModel that believes this curve (planners plan with it)."""
        t = [[r, q, c, self.verify(r, q, c)] for r in rows for q in tokens for c in contexts]
        d = [[r, q, c, self.draft(r, q, c)] for r in rows for q in tokens for c in contexts]
        return t, d


def policy_on(name: str, cost: CostCurve, target, draft, *, sampling: bool):
    """A fresh ``name`` policy for a simulation charged with ``cost``: a planner charged with a
    GPU-shaped curve plans with that curve (the pair's own profile is this machine's), every other
    policy as :func:`~adaspec_hf.policies.registry.make_policy` builds it."""
    if isinstance(cost, GpuShapedCost) and needs_profile(name):
        policy = make_policy(AdaptiveConfig(policy=name), target, draft, sampling=sampling, fresh=True)
        t, d = cost.as_latency_points()
        policy.latency = LatencyModel.from_points(t, d, overhead=cost.overhead, bounds=(1.0, 1.0))
        return policy
    return make_policy(name, target, draft, sampling=sampling, fresh=True)
