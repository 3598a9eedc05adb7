"""Planners for a target/draft pair: the pair's learnt state (profiled latency, measured costs,
acceptance calibration) is found or created here, then handed to the planner class.

Why a weak registry keyed by the model objects (never ``id(draft)``): calibration should carry over
between ``generate`` calls on the same pair, and a new draft allocated where a dead one was must
not inherit its profile. ``fresh=True`` gives a planner its own state (same profiled grid), so
systems compared in one benchmark do not learn from each other.
"""
from __future__ import annotations

import weakref

from adaspec_hf.config import AdaptiveConfig
from adaspec_hf.efficiency.latency import LatencyModel
from adaspec_hf.efficiency.state import ObservedCosts, PairState
from adaspec_hf.policies.planner import AdaptivePlanner
from adaspec_hf.policies.smartspec import SmartSpec
from adaspec_hf.policies.slo import SLOPlanner
from adaspec_hf.profiling import load_or_profile

_STATES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_TARGET_ONLY: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # target -> state without a draft
PLANNERS = {"adaptive": AdaptivePlanner, "smartspec": SmartSpec, "slo": SLOPlanner}


def pair_state(target, draft, config: AdaptiveConfig | None = None) -> PairState:
    """The shared :class:`PairState` of ``(target, draft)``, profiling the pair on first use (the
    profile itself is cached on disk, keyed by both models and this machine). ``draft=None``: the
    target alone, drafting by prompt lookup (its profile times no draft forward)."""
    if draft is None:
        state = _TARGET_ONLY.get(target)
        if state is None:
            state = _TARGET_ONLY[target] = _new_state(target, None, config)
        return state
    per_target = _STATES.get(target)
    if per_target is None:
        per_target = _STATES[target] = weakref.WeakKeyDictionary()
    state = per_target.get(draft)
    if state is None:
        state = per_target[draft] = _new_state(target, draft, config)
    return state


def _new_state(target, draft, config: AdaptiveConfig | None) -> PairState:
    cfg = config if config is not None else AdaptiveConfig()
    profile = load_or_profile(target, draft, quick=True)
    return PairState(LatencyModel(profile), ObservedCosts(ema=cfg.cost_ema, confirm=cfg.cost_confirm))


def fresh_state(target, draft, config: AdaptiveConfig | None = None) -> PairState:
    """A new :class:`PairState` on the pair's profiled grid (no corrections, no calibration)."""
    cfg = config if config is not None else AdaptiveConfig()
    shared = pair_state(target, draft, cfg)
    return PairState(LatencyModel(shared.latency.profile), ObservedCosts(ema=cfg.cost_ema, confirm=cfg.cost_confirm))


def build_planner(kind: str, target, draft, config: AdaptiveConfig, *, sampling: bool = False, tree: bool = False,
                  fresh: bool = False) -> AdaptivePlanner:
    state = fresh_state(target, draft, config) if fresh else pair_state(target, draft, config)
    cls = PLANNERS[kind]
    kw = {} if cls is SmartSpec else {"tree": tree}
    return cls(state.latency, config=config, observed=state.observed, mode=state.mode(sampling), **kw)
