"""The policy registry, the config objects and the per-pair planner state."""
from __future__ import annotations

import copy
import gc
import json

import pytest

from adaspec_hf import AdaptiveConfig, EngineConfig, make_policy, register_policy
from adaspec_hf.efficiency.latency import LatencyModel
from adaspec_hf.policies import Confidence, DraftPolicy, Heuristic, StaticChain, StaticTree
from adaspec_hf.policies import build as B
from adaspec_hf.policies import registry as R
from adaspec_hf.policies.planner import AdaptivePlanner
from adaspec_hf.policies.smartspec import SmartSpec
from adaspec_hf.policies.slo import SLOPlanner
from conftest import pair


def synthetic_profile():
    pts_t, pts_d = [], []
    for r in (1, 4, 16):
        for t in (1, 4, 16):
            for c in (1, 512):
                pts_t.append([r, t, c, 0.01 + 0.0005 * r * t])
                pts_d.append([r, t, c, 0.0005 + 0.00005 * r * t])
    return LatencyModel.from_points(pts_t, pts_d, overhead=0.0005, bounds=(1.0, 1.0)).profile


@pytest.fixture
def no_profiling(monkeypatch):
    """Planners without timing anything: the profile loader returns a synthetic grid."""
    monkeypatch.setattr(B, "load_or_profile", lambda t, d, quick=True: synthetic_profile())


@pytest.mark.parametrize("name,cls,attrs", [
    ("static-0", StaticChain, {"k": 0}), ("static-7", StaticChain, {"k": 7}), (" Static-3 ", StaticChain, {"k": 3}),
    ("tree-4x2", StaticTree, {"depth": 4, "width": 2}), ("heuristic", Heuristic, {}),
    ("confidence", Confidence, {"threshold": R.DEFAULT_CONFIDENCE}), ("confidence-0.7", Confidence, {"threshold": 0.7}),
])
def test_fixed_policies_by_name(name, cls, attrs):
    p = make_policy(name)
    assert type(p) is cls and not p.needs_profile
    for k, v in attrs.items():
        assert getattr(p, k) == v


@pytest.mark.parametrize("name,cls,tree", [("adaptive", AdaptivePlanner, False), ("adaptive-tree", AdaptivePlanner, True),
                                           ("adaptive-chain", AdaptivePlanner, False),
                                           ("smartspec", SmartSpec, False), ("slo", SLOPlanner, False),
                                           ("slo-tree", SLOPlanner, True)])
def test_planners_by_name_share_the_pair_state(no_profiling, name, cls, tree):
    target, draft = pair("llama")
    p = make_policy(name, target, draft)
    assert type(p) is cls and p.needs_profile and p.name == {"adaptive-chain": "adaptive"}.get(name, name)
    assert (p.max_children > 1) == tree
    state = B.pair_state(target, draft)
    assert p.latency is state.latency and p.observed is state.observed and p.mode is state.greedy
    sampled = make_policy(name, target, draft, sampling=True)
    assert sampled.mode is state.sampling and sampled.acceptance is not p.acceptance
    assert sampled.tree == (tree or name == "adaptive")  # the default grows trees when sampling
    fresh = make_policy(name, target, draft, fresh=True)
    assert fresh.latency is not state.latency and fresh.observed is not state.observed


def test_the_default_planner_grows_trees_when_sampling_and_chains_when_greedy(no_profiling):
    target, draft = pair("llama")
    assert AdaptiveConfig().policy == "adaptive"
    greedy, sampled = make_policy(None, target, draft), make_policy(None, target, draft, sampling=True)
    assert (greedy.tree, greedy.name, greedy.max_children) == (False, "adaptive", 1)
    assert (sampled.tree, sampled.name, sampled.max_children) == (True, "adaptive-tree", AdaptiveConfig().max_children)
    for sampling in (False, True):  # the explicit shapes ignore the mode
        assert not make_policy("adaptive-chain", target, draft, sampling=sampling).tree
        assert make_policy("adaptive-tree", target, draft, sampling=sampling).tree


def test_config_reaches_the_planner(no_profiling):
    target, draft = pair("llama")
    cfg = AdaptiveConfig(policy="adaptive-tree", max_depth=5, max_children=3, probe_every=0, row_prior=0.2)
    p = make_policy(cfg, target, draft)
    assert (p.cap, p.max_children, p.probe_every, p.row_prior, p.tree) == (5, 3, 0, 0.2, True)
    p2 = make_policy(None, target, draft, config=cfg)  # the config's policy when no name is given
    assert p2.tree and p2.cap == 5
    assert make_policy("static-2", config=cfg).k == 2  # a name beats the config's policy


def test_unknown_and_incomplete_specs_are_refused():
    with pytest.raises(ValueError, match="unknown draft_policy 'statik-4'.*static-K"):
        make_policy("statik-4")
    with pytest.raises(ValueError, match="needs the target model"):
        make_policy("adaptive")
    target, _ = pair("llama")
    with pytest.raises(ValueError, match="needs a draft model.*prompt_lookup=True"):
        make_policy("adaptive", target)
    with pytest.raises(ValueError, match="K <= 64"):
        make_policy("static-65")
    with pytest.raises(ValueError, match="tree depth and width"):
        make_policy("tree-0x3")
    with pytest.raises(TypeError, match="draft_policy must be"):
        make_policy(4)
    ready = StaticChain(3)
    assert make_policy(ready) is ready


def test_register_policy_adds_a_name_and_replaces_by_pattern():
    class Every(DraftPolicy):
        def __init__(self, k):
            self.k, self.name = k, f"every-{k}"

    try:
        register_policy(r"every-(\d+)", lambda m, *a: Every(int(m.group(1))), display="every-K")
        assert make_policy("every-3").k == 3 and "every-K" in R.policy_names()
        register_policy(r"every-(\d+)", lambda m, *a: Every(2 * int(m.group(1))), display="every-K")
        assert make_policy("every-3").k == 6 and R.policy_names().count("every-K") == 1
    finally:
        R._REGISTRY[:] = [e for e in R._REGISTRY if e.pattern != r"every-(\d+)"]
    with pytest.raises(ValueError):
        make_policy("every-3")


def test_pair_state_is_per_draft_object_not_per_id(no_profiling):
    target, _ = pair("llama")
    drafts = [copy.deepcopy(pair("llama")[1]) for _ in range(2)]
    s0, s1 = B.pair_state(target, drafts[0]), B.pair_state(target, drafts[1])
    assert s0 is not s1 and B.pair_state(target, drafts[0]) is s0
    n = len(B._STATES[target])
    del drafts[0]
    gc.collect()
    assert len(B._STATES[target]) < n  # a dead draft's profile cannot be handed to a new one


# ------------------------------------------------------------------------------------------- config
def test_adaptive_config_round_trips_and_coerces():
    cfg = AdaptiveConfig(policy="Static-4", max_depth=6)
    assert cfg.policy == "static-4"
    assert AdaptiveConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert AdaptiveConfig.coerce("tree-2x2").policy == "tree-2x2"
    assert AdaptiveConfig.coerce({"max_depth": 3}).max_depth == 3
    assert AdaptiveConfig.coerce(cfg, policy="heuristic") == AdaptiveConfig(policy="heuristic", max_depth=6)
    assert AdaptiveConfig.coerce(None) == AdaptiveConfig()
    with pytest.raises(TypeError):
        AdaptiveConfig.coerce(3.5)


@pytest.mark.parametrize("field,value", [("max_depth", 0), ("max_depth", 65), ("max_depth", 2.5), ("max_depth", True),
                                         ("max_children", 0), ("row_prior", 1.5), ("row_prior", float("nan")),
                                         ("row_ema", 0.0), ("cost_confirm", 0), ("compaction_threshold", -0.1),
                                         ("token_budget", -1), ("policy", ""), ("policy", None)])
def test_adaptive_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field if field != "policy" else "policy"):
        AdaptiveConfig(**{field: value})


def test_unknown_fields_are_named():
    with pytest.raises(ValueError, match="unknown AdaptiveConfig field.*max_dept"):
        AdaptiveConfig.from_dict({"max_dept": 3})


def test_engine_config():
    cfg = EngineConfig(max_rows=4, adaptive="adaptive")
    assert cfg.adaptive == AdaptiveConfig(policy="adaptive") and cfg.policy == "adaptive"
    assert EngineConfig().policy == "slo"
    assert EngineConfig.from_dict(json.loads(cfg.to_json())) == cfg
    for bad in ({"max_rows": 0}, {"max_cached_tokens": 1}, {"seed": -1}, {"best_effort_wait_s": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            EngineConfig(**bad)
