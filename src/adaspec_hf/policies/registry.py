"""The one way to build a draft policy from a name: a registry of name patterns -> factories.

Every owner of a step (``generate(adaptive=True)``, the serving engine, benchmarks, the Space)
calls :func:`make_policy`; a new policy is one :func:`register_policy` call, like PEFT's tuner
registry. Names: ``"adaptive"`` (default; the fitted efficiency-model planner: token trees when
sampling, chains when greedy), ``"adaptive-chain"`` / ``"adaptive-tree"`` (that planner, one shape always),
``"static-K"`` (K = 0..64), ``"tree-DxW"`` (static tree: W nodes per level, D levels),
``"heuristic"`` (HF's +2/-1 schedule), ``"confidence"`` / ``"confidence-T"`` (stop below draft
probability T), ``"smartspec"`` (batch-uniform goodput with a running acceptance rate), ``"slo"`` /
``"slo-tree"`` (per-request TPOT objectives first, then goodput).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from adaspec_hf.config import AdaptiveConfig
from adaspec_hf.policies.base import DraftPolicy
from adaspec_hf.policies.build import build_planner
from adaspec_hf.policies.schedules import Confidence, Heuristic
from adaspec_hf.policies.static import StaticChain, StaticTree

MAX_STATIC_DEPTH = 64  # longest fixed chain a name may ask for (a longer draft never pays)
DEFAULT_CONFIDENCE = 0.4  # HF's assistant_confidence_threshold default

# factory(match, target, draft, config, sampling, fresh) -> policy
Factory = Callable[[re.Match, object, object, AdaptiveConfig, bool, bool], DraftPolicy]


@dataclass(frozen=True)
class PolicyEntry:
    pattern: str  # full-match regular expression over the lower-cased name
    display: str  # how the name is written in help and errors
    factory: Factory
    needs_profile: bool  # the factory needs both models (it fits their latency profile)


_REGISTRY: list[PolicyEntry] = []


def register_policy(pattern: str, factory: Factory, *, display: str | None = None, needs_profile: bool = False) -> None:
    """Add a policy name (a regular expression, matched in full) to the registry; later
    registrations of the same pattern replace earlier ones."""
    re.compile(pattern)
    entry = PolicyEntry(pattern, display or pattern, factory, needs_profile)
    _REGISTRY[:] = [e for e in _REGISTRY if e.pattern != pattern] + [entry]


def policy_names() -> tuple[str, ...]:
    return tuple(e.display for e in _REGISTRY)


def lookup(name: str) -> tuple[PolicyEntry, re.Match]:
    """The registry entry for ``name``; ValueError naming every known policy if there is none."""
    key = name.strip().lower()
    for entry in reversed(_REGISTRY):
        if m := re.fullmatch(entry.pattern, key):
            return entry, m
    raise ValueError(f"unknown draft_policy {name!r}; choose one of {', '.join(policy_names())}")


def make_policy(spec: "str | DraftPolicy | AdaptiveConfig | None" = None, target=None, draft=None, *,
                sampling: bool = False, config: AdaptiveConfig | None = None, fresh: bool = False) -> DraftPolicy:
    """A policy from a name, an :class:`AdaptiveConfig` or a ready :class:`DraftPolicy` (returned as
    is). ``config`` tunes planners (its ``policy`` is used when ``spec`` is None); ``sampling``
    picks the sampling acceptance calibration (greedy and sampling acceptance differ); ``fresh``:
    a planner with its own learnt state instead of the pair's shared one (fair comparisons)."""
    if isinstance(spec, DraftPolicy):
        return spec
    if isinstance(spec, AdaptiveConfig):
        config, spec = spec, spec.policy
    config = config if config is not None else AdaptiveConfig()
    if spec is None:
        spec = config.policy
    if not isinstance(spec, str):
        raise TypeError(f"draft_policy must be a name, an AdaptiveConfig or a DraftPolicy, got {type(spec).__name__}")
    entry, match = lookup(spec)
    if entry.needs_profile and target is None:
        raise ValueError(f"draft_policy={spec!r} needs the target model (it profiles its latency)")
    if entry.needs_profile and draft is None and not config.prompt_lookup:
        raise ValueError(f"draft_policy={spec!r} needs a draft model (it profiles the pair's latency), "
                         "or prompt_lookup=True to draft by prompt lookup alone")
    return entry.factory(match, target, draft, config, bool(sampling), bool(fresh))


def needs_profile(spec: "str | DraftPolicy | AdaptiveConfig | None") -> bool:
    if isinstance(spec, DraftPolicy):
        return spec.needs_profile
    name = spec.policy if isinstance(spec, AdaptiveConfig) else (spec or AdaptiveConfig().policy)
    return lookup(name)[0].needs_profile


# ------------------------------------------------------------------------------- built-in entries
def _static(m, *_):
    k = int(m.group(1))
    if k > MAX_STATIC_DEPTH:
        raise ValueError(f"static-K needs K <= {MAX_STATIC_DEPTH}, got {k}")
    return StaticChain(k)


def _planner(kind: str, tree: bool) -> Factory:
    def build(m, target, draft, config, sampling, fresh):
        return build_planner(kind, target, draft, config, sampling=sampling, tree=tree, fresh=fresh)
    return build


def _adaptive(m, target, draft, config, sampling, fresh):
    """The default planner grows token trees when sampling and chains when greedy. Sampled, one
    draft token is accepted at ~0.44 on the built-in pair whatever its draft probability, so chains
    earn little (the best fixed length 1.02-1.06x plain decoding at batch 1) while sampled siblings
    raise the acceptance of a level (trees 1.17-1.28x; docs/design.md, "Trees by default when sampling").
    Greedy, the draft's argmax is right 3 times in 4 and trees measured 0.97-1.04x chains at batch 1,
    at a higher decision cost."""
    return build_planner("adaptive", target, draft, config, sampling=sampling, tree=sampling, fresh=fresh)


register_policy(r"static-(\d+)", _static, display="static-K")
register_policy(r"tree-(\d+)x(\d+)", lambda m, *a: StaticTree(int(m.group(1)), int(m.group(2))), display="tree-DxW")
register_policy(r"heuristic", lambda m, *a: Heuristic())
register_policy(r"confidence(?:-([0-9.]+))?",
                lambda m, *a: Confidence(float(m.group(1)) if m.group(1) else DEFAULT_CONFIDENCE),
                display="confidence[-T]")
register_policy(r"adaptive", _adaptive, needs_profile=True)
register_policy(r"adaptive-chain", _planner("adaptive", False), needs_profile=True)
register_policy(r"adaptive-tree", _planner("adaptive", True), needs_profile=True)
register_policy(r"smartspec", _planner("smartspec", False), needs_profile=True)
register_policy(r"slo", _planner("slo", False), needs_profile=True)
register_policy(r"slo-tree", _planner("slo", True), needs_profile=True)

POLICY_NAMES = policy_names()
