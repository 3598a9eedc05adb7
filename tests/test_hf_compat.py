"""hf_compat: the one module that touches transformers internals, on whichever release is installed.

CI runs this file on the lowest supported transformers (5.17) and on the newest one the registry serves.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers
from transformers.generation.utils import GenerateDecoderOnlyOutput

import adaspec_hf
from adaspec_hf import compat as C
from adaspec_hf.core.architecture import check_cache_support
from adaspec_hf.core.kv import KVState

from conftest import ARCHS, pair, ragged_batch


class _Old(torch.nn.Module):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
        return past_key_values


class _New(torch.nn.Module):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, use_cache=None):
        return cache


class _NoCache(torch.nn.Module):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None):
        return input_ids


def test_cache_argument_is_detected_from_the_signature():
    assert C.cache_arg_name(_Old()) == "past_key_values"
    assert C.cache_arg_name(_New()) == "cache"
    assert C.cache_arg_name(_NoCache()) is None
    assert C.cache_kwargs(_New(), "c") == {"cache": "c", "use_cache": True}
    assert _Old()(**C.cache_kwargs(_Old(), "c")) == "c"
    with pytest.raises(ValueError, match="no KV cache argument"):
        C.cache_kwargs(_NoCache(), "c")


def test_installed_release_cache_name_and_output_field():
    target, _ = pair("llama")
    name = C.cache_arg_name(target)
    assert name in C.CACHE_ARG_NAMES
    ids = torch.randint(3, 50, (1, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation shim may fire for our own calls
        out = target(input_ids=ids, **C.cache_kwargs(target, C.new_cache()))
        cache = C.output_cache(out)
        assert cache is not None and cache.get_seq_length() == 5
        step = target(input_ids=ids[:, -1:], **C.cache_kwargs(target, cache))
    full = target(input_ids=torch.cat([ids, ids[:, -1:]], 1)).logits[:, -1]
    assert torch.allclose(step.logits[:, -1], full, atol=1e-5)
    assert len(C.cache_layers(cache)) == target.config.num_hidden_layers


def test_decoder_only_output_is_hfs_type():
    out = C.decoder_only_output(torch.zeros(1, 3, dtype=torch.long))
    assert isinstance(out, GenerateDecoderOnlyOutput)
    assert out.sequences.shape == (1, 3) and out.scores is None
    assert C.output_cache(out) is None


def test_check_cache_support_refuses_a_forward_without_cache():
    class Cfg:
        is_encoder_decoder = False

    m = _NoCache()
    m.config = Cfg()
    with pytest.raises(ValueError, match="no KV cache support"):
        check_cache_support(m)


def test_logits_processors_have_special_token_tensors():
    """min_new_tokens and friends read ``_eos_token_tensor``, which only ``generate`` used to set."""
    target, _ = pair("llama")
    ids = torch.randint(3, 50, (2, 4))
    gc, kw = C.prepare_generation_config(target, None, {"min_new_tokens": 3, "max_new_tokens": 5,
                                                         "bad_words_ids": [[7]]})
    procs = C.logits_processors(target, gc, ids, None, kw)
    assert len(procs) >= 2
    scores = procs(ids, torch.zeros(2, target.config.vocab_size))
    assert torch.isinf(scores[:, 2]).all() and torch.isinf(scores[:, 7]).all()  # eos=2 and a bad word


def test_no_future_warning_from_adaptive_generate():
    target, draft = pair("llama")
    target = adaspec_hf.enable(copy.deepcopy(target))
    ids, mask = ragged_batch(2, 6, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                        assistant_model=draft, adaptive=True, draft_policy="static-2")
        kv = KVState(draft)
        kv.prefill(ids, mask)


# HF options whose processors need the special-token tensors or per-row prompt state; each checked
# token-identical to the target's own greedy generate, on every architecture (as HF's assisted tests).
_OPTIONS = {
    "min_new_tokens": dict(min_new_tokens=10),
    "min_length": dict(min_length=14),
    "bad_words_ids": dict(bad_words_ids=[[5], [9, 10]]),
    "suppress_tokens": dict(suppress_tokens=[4, 6, 8]),
    "begin_suppress_tokens": dict(begin_suppress_tokens=[3, 4]),
    "forced_eos_token_id": dict(forced_eos_token_id=2),
    "sequence_bias": dict(sequence_bias={(7,): 5.0, (11, 12): -3.0}),
    "no_repeat_ngram_size": dict(no_repeat_ngram_size=2),
    "repetition_penalty": dict(repetition_penalty=1.4),
    "exponential_decay_length_penalty": dict(exponential_decay_length_penalty=(4, 1.5)),
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("option", sorted(_OPTIONS))
def test_hf_option_greedy_matches_generate(arch, option):
    target, draft = pair(arch)
    target = adaspec_hf.enable(copy.deepcopy(target))
    ids, mask = ragged_batch(3, 7, 5)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, **_OPTIONS[option])
    ref = target.generate(**kw)
    out = target.generate(**kw, assistant_model=draft, adaptive=True, draft_policy="static-3")
    assert torch.equal(out, ref), (transformers.__version__, arch, option)
