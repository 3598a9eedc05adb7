"""`enable(model)` + `generate(adaptive=True)`: HF's types, options and errors."""
from __future__ import annotations

import copy

import pytest
import torch

from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.streamers import BaseStreamer
from transformers.generation.utils import GenerateDecoderOnlyOutput

import adaspec_hf
from adaspec_hf import AdaptiveCandidateGenerator

from conftest import VOCAB, pair, ragged_batch, char_tokenizer


@pytest.fixture(scope="module")
def models():
    target, draft = pair("llama")
    target = copy.deepcopy(target)  # enable() patches the instance; keep the shared one clean
    adaspec_hf.enable(target)
    return target, draft


@pytest.fixture(scope="module")
def tokenizer():
    """A character-level tokenizer over the tiny vocabulary (so stop strings have real text)."""
    return char_tokenizer()


def test_import_changes_nothing():
    target, _ = pair("llama")
    assert "generate" not in target.__dict__


def test_without_adaptive_is_plain_hf(models):
    target, draft = models
    ids, mask = ragged_batch(2, 6, 0)
    a = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    b = target._adaspec_original_generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("policy", ["static-3", "heuristic", "confidence"])
def test_adaptive_batch_matches_generate(models, policy):
    target, draft = models
    ids, mask = ragged_batch(4, 9, 1)
    ref = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    out = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                          assistant_model=draft, adaptive=True, draft_policy=policy)
    assert torch.equal(out, ref)
    assert isinstance(target.adaspec_stats, adaspec_hf.GenerationStats)
    assert target.adaspec_stats.target_forwards >= 1


def test_stats_count_decision_time_and_idle_levels(models):
    """Each step records its policy's own seconds (a part of the step; split by policy call) and how
    many draft levels it was offered: at least as many as the deepest verified node, exactly that many for a chain."""
    target, draft = models
    ids, mask = ragged_batch(2, 8, 3)
    for policy in ("static-3", "adaptive"):
        target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                        assistant_model=draft, adaptive=True, draft_policy=policy)
        st = target.adaspec_stats
        drafted = [s for s in st.steps if max(s.drafted)]
        assert drafted
        for s in st.steps:
            assert 0.0 < s.decision_time < s.step_time
            # the split by policy call adds up to the total, and every step plans and learns
            assert s.decision_split and abs(sum(s.decision_split.values()) - s.decision_time) < 1e-9
            assert {"max_depth", "observe"} <= set(s.decision_split)
            assert ("choose" in s.decision_split) == (s.draft_levels > 0)
            assert s.draft_levels >= s.kept_depth and (s.kept_depth > 0) == (max(s.drafted) > 0)
        if policy == "static-3":  # a fixed chain asks for exactly the levels it keeps (the tail is cut by the budget)
            assert all(s.draft_levels == s.kept_depth for s in drafted)
        assert 0.0 < st.decision_share < 1.0 and st.idle_levels_per_step >= 0.0
        assert {"decision_share", "idle_levels_per_step"} <= set(st.summary())


def test_return_dict_scores_and_logits(models):
    target, draft = models
    ids, mask = ragged_batch(3, 7, 2)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
              return_dict_in_generate=True, output_scores=True, output_logits=True, repetition_penalty=1.3)
    ref = target.generate(**kw)
    out = target.generate(**kw, assistant_model=draft, adaptive=True, draft_policy="static-4")
    assert isinstance(out, GenerateDecoderOnlyOutput)
    assert torch.equal(out.sequences, ref.sequences)  # repetition penalty applied per node prefix
    assert len(out.scores) == len(ref.scores) == out.sequences.shape[1] - ids.shape[1]
    for s_ours, s_ref in zip(out.scores, ref.scores):
        assert s_ours.shape == s_ref.shape
        assert torch.allclose(s_ours[0], s_ref[0], atol=1e-4)  # row 0 runs to the end
    assert torch.allclose(out.logits[0][0], ref.logits[0][0], atol=1e-4)


def test_streamer_batch_one(models):
    target, draft = models

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    ids = torch.tensor([[5, 9, 14, 3]])
    s = Collect()
    out = target.generate(input_ids=ids, max_new_tokens=15, do_sample=False, assistant_model=draft,
                          adaptive=True, draft_policy="static-3", streamer=s)
    assert s.ended and s.chunks[0] == ids[0].tolist()
    assert sum(s.chunks[1:], []) == out[0, ids.shape[1]:].tolist()
    with pytest.raises(ValueError, match="batch size 1"):
        target.generate(input_ids=ids.repeat(2, 1), max_new_tokens=3, assistant_model=draft,
                        adaptive=True, draft_policy="static-1", streamer=Collect())


def test_stop_strings(models, tokenizer):
    target, draft = models
    ids = torch.tensor([[5, 9, 14, 3]])
    free = target.generate(input_ids=ids, max_new_tokens=20, do_sample=False)
    gen = free[0, ids.shape[1]:].tolist()
    # a two-character stop string that first completes mid-way
    i = next(i for i in range(4, len(gen) - 1) if all(3 <= t < 98 for t in gen[i:i + 2]))
    stop = tokenizer.decode(gen[i:i + 2])
    assert len(stop) == 2
    kw = dict(input_ids=ids, max_new_tokens=20, do_sample=False, stop_strings=[stop], tokenizer=tokenizer)
    ref = target.generate(**kw)
    out = target.generate(**kw, assistant_model=draft, adaptive=True, draft_policy="static-4")
    assert torch.equal(out, ref)
    assert out.shape[1] < free.shape[1]
    with pytest.raises(ValueError, match="tokenizer"):
        target.generate(input_ids=ids, max_new_tokens=5, stop_strings=["x"], assistant_model=draft,
                        adaptive=True, draft_policy="static-1")


def test_eos_list_and_max_length(models):
    target, draft = models
    ids, mask = ragged_batch(3, 6, 3)
    free = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=15, do_sample=False)
    eos = [int(free[0, ids.shape[1] + 3]), int(free[1, ids.shape[1] + 5])]
    kw = dict(input_ids=ids, attention_mask=mask, max_length=ids.shape[1] + 15, do_sample=False, eos_token_id=eos)
    assert torch.equal(target.generate(**kw, assistant_model=draft, adaptive=True, draft_policy="static-2"),
                       target.generate(**kw))


def test_sampling_runs_and_is_seeded(models):
    target, draft = models
    ids, mask = ragged_batch(2, 5, 4)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=True, temperature=0.7,
              top_k=20, top_p=0.9, assistant_model=draft, adaptive=True, draft_policy="static-3")
    torch.manual_seed(0)
    a = target.generate(**kw)
    torch.manual_seed(0)
    b = target.generate(**kw)
    assert torch.equal(a, b) and a.shape[1] > ids.shape[1]


def test_hf_candidate_generator_matches(models):
    target, draft = models
    ids = torch.tensor([[5, 9, 14, 3, 22]])
    ref = target.generate(input_ids=ids, max_new_tokens=25, do_sample=False)
    gen = AdaptiveCandidateGenerator(draft, policy="heuristic")
    out = target.generate(input_ids=ids, max_new_tokens=25, do_sample=False, assistant_model=draft,
                          candidate_generator=gen)
    assert torch.equal(out, ref)
    assert gen.step > 0


def test_hf_candidate_generator_declares_its_draft_bound(models, monkeypatch):
    """transformers >= 5.25 asks a candidate generator how many tokens an iteration drafts (to keep
    that many steps of a recurrent layer's state); the answer is the policy's depth limit, and a
    policy without one is clamped to DEFAULT_MAX_DRAFT, so the answer always holds."""
    from adaspec_hf.integrations.hf import candidate
    from adaspec_hf.policies import ShapeFunction

    _, draft = models
    assert AdaptiveCandidateGenerator(draft, policy="static-3").num_drafting_tokens == 3
    assert AdaptiveCandidateGenerator(draft, policy="heuristic").num_drafting_tokens == 32
    monkeypatch.setattr(candidate, "DEFAULT_MAX_DRAFT", 5)
    gen = AdaptiveCandidateGenerator(draft, policy=ShapeFunction(lambda step, row: 9))  # no fixed bound
    assert gen.num_drafting_tokens == 5
    ids = torch.tensor([[5, 9, 14]])
    cand, _ = gen.get_candidates(ids)
    assert cand.shape[1] - ids.shape[1] == 5


# ---------------------------------------------------------------------------------- errors
def test_errors(models):
    target, draft = models
    ids = torch.tensor([[5, 9, 14]])
    base = dict(input_ids=ids, max_new_tokens=4, adaptive=True)
    with pytest.raises(ValueError, match="assistant_model"):
        target.generate(**base)
    cfg = LlamaConfig(vocab_size=VOCAB + 7, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    other = LlamaForCausalLM(cfg).eval()
    with pytest.raises(ValueError, match="assistant_tokenizer"):
        target.generate(**base, assistant_model=other)
    with pytest.raises(ValueError, match="beam"):
        target.generate(**base, assistant_model=draft, num_beams=2)
    with pytest.raises(ValueError, match="num_return_sequences"):
        target.generate(**base, assistant_model=draft, num_return_sequences=2, do_sample=True)
    with pytest.raises(ValueError, match="empty"):
        target.generate(input_ids=ids[:, :0], max_new_tokens=4, adaptive=True, assistant_model=draft)
    with pytest.raises(ValueError, match="empty"):
        target.generate(input_ids=ids, attention_mask=torch.zeros_like(ids), max_new_tokens=4,
                        adaptive=True, assistant_model=draft, draft_policy="static-1")
    with pytest.raises(ValueError, match="unknown draft_policy"):
        target.generate(**base, assistant_model=draft, draft_policy="bogus")
    nocache = copy.deepcopy(draft)
    nocache.forward = lambda input_ids, attention_mask=None: None  # a forward that takes no cache
    with pytest.raises(ValueError, match="KV cache"):
        target.generate(**base, assistant_model=nocache)
    defaults_off = copy.deepcopy(draft)  # use_cache=False is only a config default: still works
    defaults_off.config.use_cache = False
    out = target.generate(input_ids=ids, max_new_tokens=4, adaptive=True, assistant_model=defaults_off,
                          draft_policy="static-2")
    assert torch.equal(out, target.generate(input_ids=ids, max_new_tokens=4))
    flash = copy.deepcopy(draft)
    flash.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="sdpa"):
        target.generate(**base, assistant_model=flash)


# ------------------------------------------------------------------- architectures refused, saying why
def _tiny(cls_name: str, cfg_name: str, **kw):
    import transformers

    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_name)(vocab_size=VOCAB, **kw)
    return getattr(transformers, cls_name)(cfg).eval()


@pytest.mark.parametrize("build, reason", [
    (lambda: _tiny("MambaForCausalLM", "MambaConfig", hidden_size=32, num_hidden_layers=1), "recurrent/state-space"),
    (lambda: _tiny("GPTNeoForCausalLM", "GPTNeoConfig", num_layers=2, attention_types=[[["global", "local"], 1]],
                   hidden_size=32, num_heads=4, window_size=4, max_position_embeddings=64), "window_size=4"),
])
def test_unsupported_architectures_say_why(build, reason):
    from adaspec_hf.core.architecture import check_cache_support

    model = build()
    with pytest.raises(ValueError, match=reason) as err:
        check_cache_support(model)
    assert "without adaptive=True" in str(err.value)  # and what to use instead


def test_layer_type_refusals_name_the_layers():
    import types

    from transformers import Llama4TextConfig, Qwen3NextConfig

    from adaspec_hf.core.architecture import mask_spec_for

    qwen = types.SimpleNamespace(config=Qwen3NextConfig(num_hidden_layers=4))
    with pytest.raises(ValueError, match=r"\['linear_attention'\].*running state"):
        mask_spec_for(qwen)
    llama4 = types.SimpleNamespace(config=Llama4TextConfig(num_hidden_layers=4, attention_chunk_size=8))
    llama4.config._attn_implementation = "sdpa"
    with pytest.raises(ValueError, match="chunked_attention"):
        mask_spec_for(llama4)


def test_gpt_neo_without_a_binding_window_matches_generate():
    target = _tiny("GPTNeoForCausalLM", "GPTNeoConfig", num_layers=2, attention_types=[[["global", "local"], 1]],
                   hidden_size=32, num_heads=4, window_size=64, max_position_embeddings=64)
    target.config._attn_implementation = "eager"
    adaspec_hf.enable(target)
    ids, mask = ragged_batch(2, 6, 9)
    ref = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    out = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                          assistant_model=target, adaptive=True, draft_policy="static-3")
    assert torch.equal(out, ref)


def test_disable_restores_hf_generate():
    target, _ = pair("llama")
    model = adaspec_hf.enable(copy.deepcopy(target))
    assert "generate" in vars(model)
    adaspec_hf.disable(model)
    assert "generate" not in vars(model) and model.generate.__func__ is type(model).generate


@pytest.mark.parametrize("policy", ["static-3", "tree-3x2"])
def test_bloom_alibi_matches_generate(policy):
    """BLOOM takes no position_ids: its ALiBi bias is rebuilt from the cache's explicit key positions."""
    target = _tiny("BloomForCausalLM", "BloomConfig", n_layer=2, hidden_size=64, n_head=4,
                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    draft = _tiny("BloomForCausalLM", "BloomConfig", n_layer=1, hidden_size=32, n_head=4,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.no_grad():
        target.lm_head.weight.mul_(4.0)  # sharper logits: stable greedy paths
    adaspec_hf.enable(target)
    ids, mask = ragged_batch(3, 9, 13)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
              return_dict_in_generate=True, output_scores=True)
    ref = target.generate(**kw)
    out = target.generate(**kw, assistant_model=draft, adaptive=True, draft_policy=policy)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores):
        assert torch.allclose(a, b, atol=1e-4)
    same = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                           assistant_model=target, adaptive=True, draft_policy="static-4")  # long accepted runs
    assert torch.equal(same, ref.sequences)
