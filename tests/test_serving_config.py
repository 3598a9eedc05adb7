"""Engine settings: an EngineConfig, the keyword shorthands folded into it, conflicts refused, and
the settings that ran recorded (engine.config, engine.summary())."""
from __future__ import annotations

import dataclasses

import pytest

from adaspec_hf import Engine
from adaspec_hf.config import AdaptiveConfig, EngineConfig
from adaspec_hf.policies import StaticChain, registry

from conftest import pair
from test_serving import reference


def test_engine_config_is_used_and_recorded():
    target, draft = pair("llama")
    cfg = EngineConfig(adaptive=AdaptiveConfig(policy="static-2", compaction_threshold=0.25), max_rows=3, seed=0,
                       max_cached_tokens=400, best_effort_wait_s=0.5)
    with Engine(target, draft, config=cfg) as engine:
        assert engine.policy.name == "static-2" and engine.max_rows == 3 and engine.max_cached_tokens == 400
        assert engine._batch.compaction_threshold == 0.25 and engine._admission.best_effort_wait_s == 0.5
        assert engine.generate([5, 6, 7], max_new_tokens=6).token_ids == reference([5, 6, 7], 6)
        assert engine.config == cfg
        summary = engine.summary()
    assert summary["config"] == cfg.to_dict() and summary["new_tokens"] == 6
    assert EngineConfig.from_dict(summary["config"]) == cfg  # JSON-ready and round-trips
    with pytest.raises(ValueError, match="max_new_tokens"):  # the engine's bound is enforced
        Engine(target, draft, config=cfg, start=False).submit([5] * 390, max_new_tokens=20)


def test_keyword_shorthands_build_the_config():
    target, draft = pair("llama")
    engine = Engine(target, draft, None, "Static-1", max_rows=2, compaction_threshold=0.75, seed=3,
                    best_effort_wait_s=0.0, start=False)
    want = EngineConfig(adaptive=AdaptiveConfig(policy="static-1", compaction_threshold=0.75), max_rows=2, seed=3,
                        best_effort_wait_s=0.0)
    assert engine.config == want and engine.policy.name == "static-1"
    engine.close()
    assert Engine(target, draft, start=False).config == EngineConfig()  # defaults: the "slo" policy, 8 rows
    assert EngineConfig().policy == "slo"


def test_a_setting_given_both_ways_must_agree():
    target, draft = pair("llama")
    cfg = EngineConfig(adaptive=AdaptiveConfig(policy="static-2"), max_rows=3)
    for kw, name in ((dict(max_rows=4), "max_rows"), (dict(seed=1), "seed"), (dict(policy="static-3"), "policy"),
                     (dict(compaction_threshold=0.1), "compaction_threshold"),
                     (dict(best_effort_wait_s=9.0), "best_effort_wait_s"),
                     (dict(max_cached_tokens=100), "max_cached_tokens")):
        with pytest.raises(ValueError, match=f"{name}.*conflicts"):
            Engine(target, draft, config=cfg, start=False, **kw)
    same = Engine(target, draft, policy="static-2", config=cfg, max_rows=3, start=False)  # agreeing: fine
    assert same.config == cfg
    with pytest.raises(ValueError, match="conflicts"):  # a ready policy against a named one
        Engine(target, draft, policy=StaticChain(1), config=cfg, start=False)


def test_a_ready_policy_object_is_recorded_by_name():
    target, draft = pair("llama")
    policy = StaticChain(1)
    engine = Engine(target, draft, policy=policy, config=EngineConfig(max_rows=2), start=False)
    assert engine.policy is policy and engine.config.policy == "static-1" and engine.config.max_rows == 2
    assert not [k for k in vars(policy) if "engine" in k]  # the engine claim is not stored on the policy
    engine.close()


def test_bad_settings_are_refused_clearly():
    target, draft = pair("llama")
    for kw, name in ((dict(max_rows=0), "max_rows"), (dict(max_rows=2.5), "max_rows"),
                     (dict(max_cached_tokens=1), "max_cached_tokens"), (dict(best_effort_wait_s=-1), "best_effort"),
                     (dict(seed=-1), "seed"), (dict(compaction_threshold=1.5), "compaction_threshold"),
                     (dict(policy="no-such-policy"), "policy")):
        with pytest.raises(ValueError, match=name):
            Engine(target, draft, start=False, **kw)
    with pytest.raises(TypeError, match="EngineConfig"):
        Engine(target, draft, config={"max_rows": 2}, start=False)
    with pytest.raises(TypeError, match="policy"):
        Engine(target, draft, policy=3, start=False)


def test_the_adaptive_config_reaches_the_policy_factory(monkeypatch):
    target, draft = pair("llama")
    seen = []

    def factory(match, t, d, config, sampling, fresh):
        seen.append(config)
        return StaticChain(int(match.group(1)))

    monkeypatch.setattr(registry, "_REGISTRY", list(registry._REGISTRY))  # registration undone after the test
    registry.register_policy(r"probe-(\d+)", factory)
    adaptive = AdaptiveConfig(policy="probe-2", max_depth=5, row_prior=0.3)
    engine = Engine(target, draft, config=EngineConfig(adaptive=adaptive), start=False)
    assert seen == [adaptive] and engine.policy.name == "static-2"
    assert engine.config.adaptive == dataclasses.replace(adaptive, policy="static-2")  # what ran
    engine.close()
