"""Every HF generation option given with adaptive=True is honoured with HF's meaning or refused.

One parametrised test walks every option ``GenerationConfig`` documents (and every attribute a fresh
one carries): an honoured option's output is compared with HF's own ``generate`` on the same inputs,
a refused one must raise a ValueError naming it. Options are chosen so that dropping them changes
HF's output (e.g. min_new_tokens with an EOS that HF holds back).
"""
from __future__ import annotations

import copy
import re
import string

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerFast
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation import configuration_utils as gcu

import adaspec_hf
from adaspec_hf.integrations import hf
from adaspec_hf.compat import output_cache

from conftest import VOCAB, pair, ragged_batch, char_tokenizer

MAX_NEW = 10
POLICY = "static-3"
DOCUMENTED = sorted(set(re.findall(r"^\s{8}(\w+)\s?\(`", GenerationConfig.__doc__, re.M)))
ALL_OPTIONS = sorted(set(DOCUMENTED) | set(hf.hf_generation_options()))


@pytest.fixture(scope="module")
def models():
    target, draft = pair("llama")
    return adaspec_hf.enable(copy.deepcopy(target)), draft


@pytest.fixture(scope="module")
def batch():
    return ragged_batch(3, 7, 11)


@pytest.fixture(scope="module")
def free(models, batch):
    """HF's greedy continuation without options: tokens from it make EOS / stop cases bite."""
    ids, mask = batch
    return models[0].generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False)


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def _early_token(free, p: int, row: int = 0, step: int = 2) -> int:
    return int(free[row, p + step])


# option -> (kind, kwargs or a function (free, p, tokenizer) -> kwargs)
# kinds: "greedy" (sequences + every row's scores equal HF greedy), "sample" (first-step scores of every row
# equal HF's and each sampled token survives the warper), "policy" (greedy equal + the draft policy it maps
# to), "refused".
CASES: dict[str, tuple[str, object]] = {
    "max_length": ("greedy", lambda f, p, t: dict(max_new_tokens=None, max_length=p + 9)),
    "max_new_tokens": ("greedy", dict(max_new_tokens=7)),
    "min_length": ("greedy", lambda f, p, t: dict(min_length=p + 8, eos_token_id=_early_token(f, p))),
    "min_new_tokens": ("greedy", lambda f, p, t: dict(min_new_tokens=8, eos_token_id=_early_token(f, p))),
    "early_stopping": ("greedy", dict(early_stopping=True)),
    "max_time": ("greedy", dict(max_time=0.0)),  # HF and adaptive stop after the first token
    "stop_strings": ("greedy", lambda f, p, t: dict(stop_strings=[t.decode(f[0, p + 3: p + 5])], tokenizer=t)),
    "do_sample": ("sample", dict()),
    "num_beams": ("refused", dict(num_beams=2)),
    "use_mtp": ("refused", dict(use_mtp=True)),
    "use_cache": ("greedy", dict(use_cache=False)),
    "cache_implementation": ("refused", dict(cache_implementation="static")),
    "cache_config": ("refused", dict(cache_config={"nbits": 4})),
    "max_cache_len": ("refused", dict(max_cache_len=64)),
    "temperature": ("sample", dict(temperature=0.5)),
    "top_k": ("sample", dict(top_k=5)),
    "top_p": ("sample", dict(top_p=0.5)),
    "min_p": ("sample", dict(min_p=0.2)),
    "top_h": ("sample", dict(top_h=0.4)),
    "typical_p": ("sample", dict(typical_p=0.5)),
    "epsilon_cutoff": ("sample", dict(epsilon_cutoff=0.02)),
    "eta_cutoff": ("sample", dict(eta_cutoff=0.02)),
    "repetition_penalty": ("greedy", dict(repetition_penalty=1.5)),
    "encoder_repetition_penalty": ("greedy", dict(encoder_repetition_penalty=1.5)),
    "length_penalty": ("greedy", dict(length_penalty=2.0)),
    "no_repeat_ngram_size": ("greedy", dict(no_repeat_ngram_size=2)),
    "bad_words_ids": ("greedy", lambda f, p, t: dict(bad_words_ids=[[_early_token(f, p, 0, 1)], [7, 8]])),
    "renormalize_logits": ("greedy", dict(renormalize_logits=True, repetition_penalty=1.3)),
    "forced_bos_token_id": ("greedy", dict(forced_bos_token_id=5)),
    "forced_eos_token_id": ("greedy", dict(forced_eos_token_id=2)),
    "remove_invalid_values": ("greedy", dict(remove_invalid_values=True)),
    "exponential_decay_length_penalty": ("greedy", dict(exponential_decay_length_penalty=(3, 1.8))),
    "suppress_tokens": ("greedy", lambda f, p, t: dict(suppress_tokens=[_early_token(f, p, 1, 3), 9])),
    "begin_suppress_tokens": ("greedy", lambda f, p, t: dict(begin_suppress_tokens=[int(f[0, p])])),
    "sequence_bias": ("greedy", dict(sequence_bias={(7,): 6.0, (11, 12): -3.0})),
    "token_healing": ("refused", dict(token_healing=True)),
    "guidance_scale": ("refused", dict(guidance_scale=1.5)),
    "watermarking_config": ("greedy", dict(watermarking_config=gcu.WatermarkingConfig(bias=4.0))),
    "num_return_sequences": ("refused", dict(num_return_sequences=2, do_sample=True)),
    "output_attentions": ("refused", dict(output_attentions=True)),
    "output_hidden_states": ("refused", dict(output_hidden_states=True)),
    "output_scores": ("greedy", dict(output_scores=True)),
    "output_logits": ("greedy", dict(output_logits=True)),
    "return_dict_in_generate": ("greedy", dict(return_dict_in_generate=True)),
    "pad_token_id": ("greedy", lambda f, p, t: dict(pad_token_id=5, eos_token_id=_early_token(f, p))),
    "bos_token_id": ("greedy", dict(bos_token_id=3)),
    "eos_token_id": ("greedy", lambda f, p, t: dict(eos_token_id=[_early_token(f, p, 0, 3), _early_token(f, p, 1, 5)])),
    "encoder_no_repeat_ngram_size": ("greedy", dict(encoder_no_repeat_ngram_size=1)),
    "decoder_start_token_id": ("greedy", dict(decoder_start_token_id=5)),
    "is_assistant": ("refused", dict(is_assistant=True)),
    "num_assistant_tokens": ("policy", (dict(num_assistant_tokens=4), "static-4")),
    "num_assistant_tokens_schedule": ("policy", (dict(num_assistant_tokens_schedule="heuristic"), "heuristic")),
    "assistant_confidence_threshold": ("policy", (dict(assistant_confidence_threshold=0.2), "confidence-0.2")),
    "prompt_lookup_num_tokens": ("lookup", (dict(prompt_lookup_num_tokens=3), "static-3")),
    "max_matching_ngram_size": ("lookup", (dict(prompt_lookup_num_tokens=3, max_matching_ngram_size=2), "static-3")),
    "assistant_early_exit": ("refused", dict(assistant_early_exit=1)),
    "assistant_lookbehind": ("refused", dict(assistant_lookbehind=4)),
    "target_lookbehind": ("refused", dict(target_lookbehind=4)),
    "assistant_ensemble_weight": ("refused", dict(assistant_ensemble_weight=0.5)),
    "speculation_type": ("refused", dict(speculation_type="dflash")),
    "disable_compile": ("greedy", dict(disable_compile=True)),
    "compile_config": ("refused", dict(compile_config=gcu.CompileConfig())),
    "continuous_batching_config": ("refused", dict(continuous_batching_config=gcu.ContinuousBatchingConfig())),
    "low_memory": ("refused", dict(low_memory=True)),
    "penalty_alpha": ("refused", dict(penalty_alpha=0.6, top_k=4)),
    "dola_layers": ("refused", dict(dola_layers="low")),
    "diversity_penalty": ("refused", dict(diversity_penalty=0.5)),
    "num_beam_groups": ("refused", dict(num_beam_groups=2)),
    "constraints": ("refused", dict(constraints=["not-a-constraint"])),
    "force_words_ids": ("refused", dict(force_words_ids=[[5]])),
    "prefill_chunk_size": ("refused", dict(prefill_chunk_size=4)),
}


def test_every_option_has_a_verdict_and_a_case():
    assert len(DOCUMENTED) > 40  # the docstring parse found the documented arguments
    missing_verdict = [n for n in ALL_OPTIONS if n not in hf.GENERATION_OPTIONS]
    missing_case = [n for n in ALL_OPTIONS if n not in CASES]
    assert not missing_verdict and not missing_case, (missing_verdict, missing_case)
    for name in ALL_OPTIONS:
        verdict = hf.GENERATION_OPTIONS[name][0]
        kind = CASES[name][0]
        assert (verdict == hf.REFUSED) == (kind == "refused"), name


def _kwargs(case, free, p, tokenizer) -> dict:
    return dict(case(free, p, tokenizer)) if callable(case) else dict(case)


def _run_pair(target, draft, ids, mask, kw, seed=None):
    base = dict(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False,
                return_dict_in_generate=True, output_scores=True)
    base.update(kw)
    policy = base.pop("draft_policy", POLICY)
    if seed is not None:
        torch.manual_seed(seed)
    ref = target.generate(**base)
    if seed is not None:
        torch.manual_seed(seed)
    ours = target.generate(**base, assistant_model=draft, adaptive=True, draft_policy=policy)
    return ref, ours


def _assert_same(ref, ours):
    assert torch.equal(ours.sequences, ref.sequences)
    assert len(ours.scores) == len(ref.scores)
    for a, b in zip(ours.scores, ref.scores):  # every row, finished ones included (HF's values)
        finite = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), finite)
        assert torch.allclose(a[finite], b[finite], atol=1e-4)


@pytest.mark.parametrize("name", ALL_OPTIONS)
def test_option_honoured_or_refused(models, batch, free, tokenizer, name):
    target, draft = models
    ids, mask = batch
    p = ids.shape[1]
    kind, case = CASES[name]
    if kind in ("policy", "lookup"):
        case, expected_policy = case
    kw = _kwargs(case, free, p, tokenizer)
    if kind == "refused":
        with pytest.raises(ValueError, match=re.escape(f"`{name}")):
            target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, assistant_model=draft,
                            adaptive=True, **kw)
        return
    if kind == "sample":
        kw = dict(do_sample=True, **kw)
        ref, ours = _run_pair(target, draft, ids, mask, kw, seed=0)
        assert torch.allclose(ours.scores[0], ref.scores[0], atol=1e-4)  # the warper, with HF's meaning
        gen = ours.sequences[:, p:]
        running = torch.ones(gen.shape[0], dtype=torch.bool)
        for t, sc in enumerate(ours.scores):  # every emitted token survived the warper at its step
            tok = gen[:, t]
            assert torch.isfinite(sc.gather(1, tok[:, None]))[running].all(), (name, t)
            running &= tok != 2  # rows after their EOS only carry padding
        return
    if kind == "policy":
        kw = dict(kw, draft_policy=None)
        ref, ours = _run_pair(target, draft, ids, mask, kw)
        _assert_same(ref, ours)
        assert target.adaspec_stats.policy == expected_policy
        return
    if kind == "lookup":  # HF's prompt lookup is batch 1 only: the reference is plain greedy generate
        ref, _ = _run_pair(target, draft, ids, mask, {})
        ours = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False,
                               return_dict_in_generate=True, output_scores=True, assistant_model=draft,
                               adaptive=True, **kw)
        _assert_same(ref, ours)
        assert target.adaspec_stats.policy == expected_policy and target.adaspec_config.prompt_lookup
        return
    ref, ours = _run_pair(target, draft, ids, mask, kw)
    _assert_same(ref, ours)


# ------------------------------------------------------------------------------ lengths and defaults
def test_no_length_set_means_twenty_new_tokens(models):
    """HF 5.x: with no max_new_tokens / max_length anywhere, 20 *new* tokens (not a total of 20)."""
    target, draft = models
    ids, mask = ragged_batch(2, 26, 3, min_len=22)
    ref = target.generate(input_ids=ids, attention_mask=mask, do_sample=False)
    out = target.generate(input_ids=ids, attention_mask=mask, do_sample=False, assistant_model=draft,
                          adaptive=True, draft_policy=POLICY)
    assert ref.shape[1] == ids.shape[1] + 20
    assert torch.equal(out, ref)


def test_min_new_tokens_holds_back_eos(models, batch, free):
    target, draft = models
    ids, mask = batch
    p = ids.shape[1]
    eos = _early_token(free, p)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos)
    stopped = target.generate(**kw, assistant_model=draft, adaptive=True, draft_policy=POLICY)
    held = target.generate(**kw, min_new_tokens=8, assistant_model=draft, adaptive=True, draft_policy=POLICY)
    assert bool((stopped[0, p:] == eos).any())  # without the option row 0 stops at this EOS
    assert not bool((held[:, p: p + 8] == eos).any())  # held back for 8 new tokens, as HF does
    assert torch.equal(held, target.generate(**kw, min_new_tokens=8))


# ------------------------------------------------------------------ generate arguments and model kwargs
def test_generate_arguments_table_is_enforced(models, batch):
    target, draft = models
    ids, mask = batch
    base = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, assistant_model=draft, adaptive=True)
    refused = {
        "inputs_embeds": torch.zeros(3, ids.shape[1], 8), "position_ids": torch.zeros_like(ids),
        "cache_position": torch.arange(ids.shape[1]), "negative_prompt_ids": ids, "synced_gpus": True,
        "negative_prompt_attention_mask": mask,
    }
    for name, value in refused.items():
        assert hf.GENERATE_ARGUMENTS[name][0] == hf.REFUSED
        with pytest.raises(ValueError, match=re.escape(f"`{name}`")):
            target.generate(**base, **{name: value})
    with pytest.raises(ValueError, match="logits_to_keep"):
        target.generate(**base, logits_to_keep="all")


def test_prefix_allowed_tokens_fn_logits_processor_stopping_criteria(models, batch):
    target, draft = models
    ids, mask = batch

    def allowed(batch_id: int, sent: torch.Tensor) -> list[int]:
        return list(range(3, 40)) if batch_id % 2 == 0 else list(range(30, 90))

    class Odd(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores - 3.0 * (torch.arange(scores.shape[1]) % 2 == 1).float() * (input_ids.shape[1] % 3 == 0)

    class StopAt(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return (input_ids[:, -1] % 7 == 0)

    for extra in (dict(prefix_allowed_tokens_fn=allowed), dict(logits_processor=LogitsProcessorList([Odd()])),
                  dict(stopping_criteria=StoppingCriteriaList([StopAt()]))):
        ref, ours = _run_pair(target, draft, ids, mask, extra)
        _assert_same(ref, ours)


def test_logits_to_keep_is_accepted(models, batch):
    target, draft = models
    ids, mask = batch
    ref, ours = _run_pair(target, draft, ids, mask, dict(logits_to_keep=1))
    _assert_same(ref, ours)


def test_token_type_ids_honoured():
    target, draft = pair("gpt2")
    target = adaspec_hf.enable(copy.deepcopy(target))
    ids, mask = ragged_batch(3, 7, 4)
    g = torch.Generator().manual_seed(0)
    tti = torch.randint(0, 2, ids.shape, generator=g) * 17 + 3  # GPT-2 embeds types with its token table
    ref, ours = _run_pair(target, draft, ids, mask, dict(token_type_ids=tti))
    plain = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False)
    assert not torch.equal(ref.sequences, plain)  # the types matter for this model
    _assert_same(ref, ours)
    llama, _ = pair("llama")
    llama = adaspec_hf.enable(copy.deepcopy(llama))
    with pytest.raises(ValueError, match="token_type_ids"):
        llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, token_type_ids=tti,
                       assistant_model=pair("llama")[1], adaptive=True)


def test_returned_cache_is_the_targets(models, batch, free):
    target, draft = models
    ids, mask = batch
    p = ids.shape[1]
    ref, ours = _run_pair(target, draft, ids, mask, dict(eos_token_id=_early_token(free, p)))
    _assert_same(ref, ours)
    c_ref, c_ours = output_cache(ref), output_cache(ours)
    assert c_ours is not None and c_ours.get_seq_length() == c_ref.get_seq_length() == ours.sequences.shape[1] - 1
    valid = torch.cat([mask, torch.ones(3, ours.sequences.shape[1] - 1 - p, dtype=torch.long)], 1).bool()
    for a, b in zip(c_ours.layers, c_ref.layers):
        assert torch.allclose(a.keys.transpose(1, 2)[valid], b.keys.transpose(1, 2)[valid], atol=1e-4)
        assert torch.allclose(a.values.transpose(1, 2)[valid], b.values.transpose(1, 2)[valid], atol=1e-4)


# ------------------------------------------------------------------------- assistant settings / config
def test_draft_policy_conflicts_with_hf_draft_length(models, batch):
    target, draft = models
    ids, mask = batch
    with pytest.raises(ValueError, match="num_assistant_tokens"):
        target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, assistant_model=draft,
                        adaptive=True, draft_policy="static-2", num_assistant_tokens=5)
    d2 = copy.deepcopy(draft)
    d2.generation_config.num_assistant_tokens = 2  # where HF's assisted decoding reads it
    target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, assistant_model=d2, adaptive=True)
    assert target.adaspec_stats.policy == "static-2"


def test_adaptive_settings_in_generation_config_survive_save_load(models, batch, tmp_path):
    target, draft = models
    ids, mask = batch
    GenerationConfig(adaptive=True, draft_policy="static-2", max_new_tokens=8,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(tmp_path)
    loaded = GenerationConfig.from_pretrained(tmp_path)
    assert loaded.adaptive is True and loaded.draft_policy == "static-2"
    ref = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    target.adaspec_stats = None
    out = target.generate(input_ids=ids, attention_mask=mask, generation_config=loaded, assistant_model=draft)
    assert torch.equal(out, ref)
    assert target.adaspec_stats is not None and target.adaspec_stats.policy == "static-2"
    target.adaspec_stats = None
    out = target.generate(input_ids=ids[:1], generation_config=loaded, assistant_model=draft,
                          adaptive=False)  # the call wins: HF's own assisted decoding (batch 1 only)
    assert torch.equal(out, ref[:1]) and target.adaspec_stats is None
    m = copy.deepcopy(target)
    m.generation_config = loaded  # as from_pretrained of a folder saved with it
    m.generate(input_ids=ids, attention_mask=mask, assistant_model=draft)
    assert m.adaspec_stats.policy == "static-2"


def test_deepcopy_of_enabled_model_calls_the_copy(models, batch):
    target, draft = models
    ids, mask = batch
    twin = copy.deepcopy(target)
    with torch.no_grad():
        twin.get_output_embeddings().weight.mul_(-1.0)  # the copy now decodes differently
    assert twin.generate.__self__ is twin
    mine = twin.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    hf_own = type(twin).generate(twin, input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(mine, hf_own)
    assert not torch.equal(mine, target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                                                 do_sample=False))
    target.adaspec_stats = None
    out = twin.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                        assistant_model=draft, adaptive=True, draft_policy=POLICY)
    assert torch.equal(out, hf_own) and target.adaspec_stats is None and twin.adaspec_stats is not None
