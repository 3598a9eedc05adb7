"""Invariant 1: greedy output is token-identical to the target's own greedy generate."""
from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings, strategies as st, HealthCheck

from adaspec_hf.core import SpeculativeDecoder
from adaspec_hf.policies import StaticChain

from conftest import ARCHS, pair, ragged_batch, random_shapes

SETTINGS = dict(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def reference(target, ids, mask, n, eos=2):
    return target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                           pad_token_id=0, eos_token_id=eos)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@settings(**SETTINGS)
@given(batch=st.integers(1, 8), seed=st.integers(0, 10_000), n=st.integers(1, 40))
def test_random_shapes_match_generate(arch, attn, batch, seed, n):
    target, draft = pair(arch, attn)
    ids, mask = ragged_batch(batch, 12, seed)
    ref = reference(target, ids, mask, n)
    dec = SpeculativeDecoder(target, draft, random_shapes(seed), eos_token_id=2, pad_token_id=0)
    out = dec.generate(ids, mask, n)
    assert torch.equal(out.sequences, ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_self_draft_accepts_everything_and_matches(arch):
    target, same = pair(arch, "sdpa", same=True)
    ids, mask = ragged_batch(4, 10, 7)
    ref = reference(target, ids, mask, 30)
    dec = SpeculativeDecoder(target, same, random_shapes(3, max_depth=4), eos_token_id=2, pad_token_id=0)
    out = dec.generate(ids, mask, 30)
    assert torch.equal(out.sequences, ref)
    assert out.stats.accepted_tokens > 0
    # with the target as its own draft, every verified chain node on the greedy path is accepted
    assert out.stats.tokens_per_step > 1.5


@pytest.mark.parametrize("k", [0, 1, 4])
def test_static_chains(k):
    target, draft = pair("llama")
    ids, mask = ragged_batch(5, 9, 11)
    ref = reference(target, ids, mask, 25)
    out = SpeculativeDecoder(target, draft, StaticChain(k), eos_token_id=2, pad_token_id=0).generate(ids, mask, 25)
    assert torch.equal(out.sequences, ref)
    if k == 0:
        assert out.stats.drafted_tokens == 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_eos_midway(arch):
    target, draft = pair(arch)
    ids, mask = ragged_batch(6, 8, 5)
    full = reference(target, ids, mask, 30)
    # choose as EOS a token that the reference emits mid-way in some rows
    eos = int(full[0, ids.shape[1] + 5])
    ref = reference(target, ids, mask, 30, eos=eos)
    dec = SpeculativeDecoder(target, draft, random_shapes(1), eos_token_id=eos, pad_token_id=0)
    out = dec.generate(ids, mask, 30)
    assert torch.equal(out.sequences, ref)
    assert out.sequences.shape[1] < full.shape[1] or (out.sequences == eos).any()


def test_long_run_triggers_compaction(monkeypatch):
    from adaspec_hf.core import kv as kvstate

    target, draft = pair("mistral")  # sliding window 8 << 160 generated tokens
    ids, mask = ragged_batch(3, 10, 2)
    calls = []
    original = kvstate.KVState.compact

    def spy(self):
        calls.append(self.length)
        return original(self)

    monkeypatch.setattr(kvstate.KVState, "compact", spy)
    ref = reference(target, ids, mask, 160)
    dec = SpeculativeDecoder(target, draft, random_shapes(4, max_depth=6, max_width=3), eos_token_id=2, pad_token_id=0,
                             compaction_threshold=0.3)
    out = dec.generate(ids, mask, 160)
    assert calls, "holes never triggered a compaction"
    assert torch.equal(out.sequences, ref)
