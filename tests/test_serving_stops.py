"""A stop string means in the engine what it means in HF ``generate(stop_strings=..., tokenizer=...)``:
the request stops at the token that completes it (checked token by token over the prompt and the
tokens so far), also when a step commits several tokens at once. Likewise EOS with min_new_tokens."""
from __future__ import annotations

import pytest
import torch

from adaspec_hf import Engine
from adaspec_hf.policies import StaticChain

from conftest import char_tokenizer, pair

PROMPT = "hello"
FREE_RUN = 24  # greedy tokens generated to pick stop strings from


def hf_generate(target, ids: list[int], n: int, **kw) -> list[int]:
    x = torch.tensor([ids])
    out = target.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                          pad_token_id=0, **kw)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def setup():
    tok = char_tokenizer()
    target, draft = pair("llama", same=True)  # the draft is the target: every drafted token is accepted
    ids = tok(PROMPT)["input_ids"]
    free = hf_generate(target, ids, FREE_RUN, eos_token_id=None)
    return tok, target, draft, ids, free


def stop_strings(tok, ids: list[int], free: list[int]) -> list[str]:
    """Stop strings whose HF meaning and "a substring of the generated text" differ or agree: one
    spanning the prompt's end and the first token, one mid-text across two tokens, one the first
    generated character (which may also occur earlier, in the prompt)."""
    text = tok.decode(free)
    k = FREE_RUN // 2
    return [tok.decode(ids[-1:]) + text[0], text[k - 1: k + 1], text[0], text[k: k + 3]]


@pytest.mark.parametrize("depth", [0, 3])
def test_stop_strings_stop_at_the_token_hf_generate_stops_at(setup, depth):
    tok, target, draft, ids, free = setup
    with Engine(target, draft, tok, policy=StaticChain(depth), max_rows=2, seed=0) as engine:
        stopped = 0
        for stop in stop_strings(tok, ids, free):
            want = hf_generate(target, ids, FREE_RUN, eos_token_id=None, stop_strings=[stop], tokenizer=tok)
            h = engine.submit(PROMPT, max_new_tokens=FREE_RUN, eos_token_id=[], stop=[stop, "\x7fnever"])
            streamed = "".join(h.text())
            res = h.result()
            # also where the text contains the string but no token completes it (ids the tokenizer
            # does not cover decode to nothing): then neither HF nor the engine stops
            assert res.token_ids == want, stop
            assert res.finish_reason == ("stop" if len(want) < FREE_RUN else "length")
            assert streamed == res.text == tok.decode(want)
            stopped += len(want) < FREE_RUN
        assert stopped >= 2  # the strings did stop somewhere
        if depth:
            assert engine.stats.accepted_tokens > 0  # several tokens per commit: cut inside one


def test_a_stop_string_completed_by_the_prompt_end_stops_at_the_first_token(setup):
    tok, target, draft, ids, free = setup
    stop = tok.decode(ids[-1:]) + tok.decode(free[:1])  # not in the generated text alone
    assert stop not in tok.decode(free[:1])
    with Engine(target, draft, tok, policy=StaticChain(2), seed=0) as engine:
        res = engine.submit(ids, max_new_tokens=FREE_RUN, eos_token_id=[], stop=stop).result()
    assert res.token_ids == free[:1] and res.finish_reason == "stop"


def test_eos_with_min_new_tokens_matches_hf_generate(setup):
    tok, target, draft, ids, free = setup
    eos = free[2]  # the model's third token, banned as EOS until min_new_tokens
    for min_new in (0, 6):
        want = hf_generate(target, ids, FREE_RUN, eos_token_id=eos, min_new_tokens=min_new)
        with Engine(target, draft, tok, policy=StaticChain(3), seed=0) as engine:
            res = engine.submit(ids, max_new_tokens=FREE_RUN, eos_token_id=eos, min_new_tokens=min_new).result()
        assert res.token_ids == want
        assert res.finish_reason == ("eos" if want[-1] == eos else "length")
        assert len(want) >= min_new + 1 if min_new else len(want) == 3
