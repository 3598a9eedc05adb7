"""Which policy and AdaptiveConfig a generate(adaptive=True) call runs: draft_policy=, adaptive_config=,
the same saved in a GenerationConfig, and HF's draft-length settings."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import GenerationConfig

import adaspec_hf
from adaspec_hf.config import AdaptiveConfig

from conftest import pair, ragged_batch

MAX_NEW = 10


@pytest.fixture(scope="module")
def models():
    target, draft = pair("llama")
    return adaspec_hf.enable(copy.deepcopy(target)), draft


@pytest.fixture(scope="module")
def batch():
    return ragged_batch(3, 7, 21)


@pytest.fixture(scope="module")
def greedy(models, batch):
    ids, mask = batch
    return models[0].generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False)


def _run(target, draft, batch, **kw):
    ids, mask = batch
    target.adaspec_stats = target.adaspec_config = None
    return target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False,
                           assistant_model=draft, **kw)


def _max_drafted(stats) -> int:
    return max(max(s.drafted) for s in stats.steps)


@pytest.mark.parametrize("value", [AdaptiveConfig(policy="static-2", max_depth=6),
                                   {"policy": "static-2", "max_depth": 6}, "static-2"])
def test_adaptive_config_forms_are_accepted_and_recorded(models, batch, greedy, value):
    target, draft = models
    out = _run(target, draft, batch, adaptive=True, adaptive_config=value)
    assert torch.equal(out, greedy)
    assert target.adaspec_stats.policy == "static-2" and _max_drafted(target.adaspec_stats) <= 2
    assert isinstance(target.adaspec_config, AdaptiveConfig) and target.adaspec_config.policy == "static-2"
    if not isinstance(value, str):
        assert target.adaspec_config.max_depth == 6


def test_draft_policy_is_shorthand_and_conflicts_are_refused(models, batch, greedy):
    target, draft = models
    out = _run(target, draft, batch, adaptive=True, draft_policy="static-3", adaptive_config={"max_depth": 5})
    assert torch.equal(out, greedy)
    assert target.adaspec_config == AdaptiveConfig(policy="static-3", max_depth=5)
    _run(target, draft, batch, adaptive=True, draft_policy="STATIC-3", adaptive_config="static-3")  # same name
    with pytest.raises(ValueError, match="conflicts with adaptive_config"):
        _run(target, draft, batch, adaptive=True, draft_policy="static-4", adaptive_config="static-2")
    with pytest.raises(ValueError, match="unknown AdaptiveConfig field"):
        _run(target, draft, batch, adaptive=True, adaptive_config={"depth": 3})
    with pytest.raises(ValueError, match="max_depth"):
        _run(target, draft, batch, adaptive=True, adaptive_config={"max_depth": 0})
    with pytest.raises(TypeError, match="adaptive_config"):
        _run(target, draft, batch, adaptive=True, adaptive_config=3)
    with pytest.raises(ValueError, match="conflicts with HF's draft-length"):
        _run(target, draft, batch, adaptive=True, adaptive_config="static-2", num_assistant_tokens=5)


def test_a_ready_policy_is_used_as_is_and_records_no_config(models, batch, greedy):
    from adaspec_hf.policies import StaticChain

    target, draft = models
    out = _run(target, draft, batch, adaptive=True, draft_policy=StaticChain(1))
    assert torch.equal(out, greedy) and _max_drafted(target.adaspec_stats) <= 1 and target.adaspec_config is None
    with pytest.raises(ValueError, match="cannot tune"):
        _run(target, draft, batch, adaptive=True, draft_policy=StaticChain(1), adaptive_config={"max_depth": 4})


def test_adaptive_config_saved_in_generation_config_round_trips(models, batch, greedy, tmp_path):
    """adaptive=True and the AdaptiveConfig (as a plain dict) survive save_pretrained/from_pretrained."""
    target, draft = models
    saved = AdaptiveConfig(policy="static-2", compaction_threshold=0.25)
    GenerationConfig(adaptive=True, adaptive_config=saved.to_dict(), bos_token_id=1, eos_token_id=2,
                     pad_token_id=0).save_pretrained(tmp_path)
    loaded = GenerationConfig.from_pretrained(tmp_path)
    assert loaded.adaptive is True and AdaptiveConfig.from_dict(loaded.adaptive_config) == saved
    out = _run(target, draft, batch, generation_config=loaded)  # adaptive=True comes from the config
    assert torch.equal(out, greedy)
    assert target.adaspec_config == saved and target.adaspec_stats.policy == "static-2"
    assert _max_drafted(target.adaspec_stats) <= 2
    # the call's draft_policy replaces the saved policy, keeping the saved tunables
    _run(target, draft, batch, generation_config=loaded, draft_policy="static-1")
    assert target.adaspec_config == AdaptiveConfig(policy="static-1", compaction_threshold=0.25)
    assert _max_drafted(target.adaspec_stats) <= 1
    # a model whose own generation_config carries it (as from_pretrained of its folder)
    m = copy.deepcopy(target)
    m.generation_config = loaded
    ids, mask = batch
    m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, assistant_model=draft)
    assert m.adaspec_config == saved


def test_saved_draft_policy_and_adaptive_config_must_agree(models, batch):
    target, draft = models
    both = GenerationConfig(adaptive=True, draft_policy="static-4", adaptive_config={"policy": "static-2"})
    with pytest.raises(ValueError, match="generation_config: draft_policy='static-4' conflicts"):
        _run(target, draft, batch, generation_config=both)
