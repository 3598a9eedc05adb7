"""The one commit rule (eos / length / min_new_tokens / stopping criteria) and the token buffer."""
from __future__ import annotations

import pytest
import torch
from transformers import MinNewTokensLengthLogitsProcessor, StopStringCriteria

from adaspec_hf.core.buffer import EOS, LENGTH, NOT_DONE, STOP, CommitRule, TokenBuffer, stop_string_criteria

from conftest import char_tokenizer, pair

EOS_ID = 2


def _cut(rule, emitted, n_gen=0, max_new=100, history=None, n_emit=None):
    e = torch.tensor([emitted])
    n = torch.tensor([len(emitted) if n_emit is None else n_emit])
    return rule.cut(e, n, torch.tensor([n_gen]), max_new, history)


def test_eos_is_kept_and_ends_the_row():
    cut = _cut(CommitRule(EOS_ID), [5, 6, EOS_ID, 7])
    assert cut.keep.tolist() == [3] and cut.done.tolist() == [True] and cut.reasons() == ["eos"]


def test_eos_past_the_real_tokens_is_ignored():
    cut = _cut(CommitRule(EOS_ID), [5, 6, EOS_ID], n_emit=2)
    assert cut.keep.tolist() == [2] and cut.reasons() == [None]


def test_several_eos_ids_and_no_eos():
    assert _cut(CommitRule([9, 7]), [5, 7, 9]).keep.tolist() == [2]
    cut = _cut(CommitRule(None), [5, EOS_ID, 9])
    assert cut.keep.tolist() == [3] and not bool(cut.done[0])


def test_length_cuts_per_row():
    rule = CommitRule(EOS_ID)
    emitted = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8]])
    cut = rule.cut(emitted, torch.tensor([4, 4, 2]), torch.tensor([0, 8, 0]), torch.tensor([10, 10, 2]))
    assert cut.keep.tolist() == [4, 2, 2]
    assert cut.reasons() == [None, "length", "length"]


def test_eos_at_the_length_bound_is_reported_as_eos():
    cut = _cut(CommitRule(EOS_ID), [5, EOS_ID, 7], n_gen=8, max_new=10)
    assert cut.keep.tolist() == [2] and cut.reason.tolist() == [EOS]


@pytest.mark.parametrize("min_new", [0, 1, 3, 5])
def test_min_new_tokens_agrees_with_hf_eos_ban(min_new):
    """The rule stops at an EOS exactly where HF's MinNewTokens processor lets EOS be emitted."""
    prompt_len, vocab = 4, 11
    hf = MinNewTokensLengthLogitsProcessor(prompt_len, min_new, eos_token_id=EOS_ID)
    rule = CommitRule(EOS_ID, min_new_tokens=min_new)
    for k in range(min_new + 3):  # the EOS would be new token k
        ids = torch.full((1, prompt_len + k), 5)
        allowed = bool(torch.isfinite(hf(ids, torch.zeros(1, vocab))[0, EOS_ID]))
        stops = bool(_cut(rule, [EOS_ID], n_gen=k).done[0])
        assert stops == allowed, k
        # the same when the EOS comes inside a multi-token commit starting earlier
        if k >= 2:
            assert bool(_cut(rule, [5, 5, EOS_ID], n_gen=k - 2).done[0]) == allowed


def test_min_new_tokens_skips_an_early_eos_for_a_later_one():
    cut = _cut(CommitRule(EOS_ID, min_new_tokens=3), [EOS_ID, 5, 6, EOS_ID, 7])
    assert cut.keep.tolist() == [4] and cut.reasons() == ["eos"]


def test_reason_precedence_stop_over_eos_over_length():
    tok = char_tokenizer()
    ids = tok.convert_tokens_to_ids(["a", "b"])
    rule = CommitRule(ids[1], stopping=stop_string_criteria(tok, "ab"))
    hist = lambda i: torch.tensor([ids[0]])  # noqa: E731
    cut = _cut(rule, [ids[1], 5], n_gen=9, max_new=10, history=hist)
    assert cut.keep.tolist() == [1] and cut.reason.tolist() == [STOP]
    assert NOT_DONE < LENGTH < EOS < STOP


def test_stop_string_is_hfs_meaning_checked_token_by_token():
    tok = char_tokenizer()
    enc = lambda s: tok.convert_tokens_to_ids(list(s))  # noqa: E731
    prior = enc("xyz")
    rule = CommitRule(None, stopping=stop_string_criteria(tok, ["cd", "zq"]))
    hf = StopStringCriteria(tok, ["cd", "zq"])
    emitted = enc("qabcdef")
    cut = _cut(rule, emitted, history=lambda i: torch.tensor(prior))
    # HF's criterion on the same token sequences: the first prefix it fires on
    first = next(k + 1 for k in range(len(emitted)) if bool(hf(torch.tensor([prior + emitted[: k + 1]]), None)[0]))
    assert first == 1  # "zq" completes across the committed text and the first emitted token
    assert cut.keep.tolist() == [first] and cut.reasons() == ["stop"]
    cut = _cut(rule, enc("abcdef"), history=lambda i: torch.tensor(prior))
    assert cut.keep.tolist() == [4]  # "...abcd"


def test_stopping_needs_history_and_bad_arguments_are_refused():
    tok = char_tokenizer()
    with pytest.raises(ValueError, match="history"):
        _cut(CommitRule(stopping=stop_string_criteria(tok, "a")), [5])
    for bad in ("", [], [""], [3]):
        with pytest.raises(ValueError):
            stop_string_criteria(tok, bad)
    with pytest.raises(ValueError, match="tokenizer"):
        stop_string_criteria(None, "a")
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="min_new_tokens"):
            CommitRule(EOS_ID, min_new_tokens=bad)
    with pytest.raises(ValueError, match="eos_token_id"):
        CommitRule([-1])


def test_buffer_grows_and_keeps_every_row():
    ids = torch.tensor([[0, 7, 8], [9, 10, 11]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    buf = TokenBuffer(ids, mask, max_new_tokens=40, pad_token_id=0, initial_capacity=2)
    rule = CommitRule(EOS_ID)
    both = torch.tensor([0, 1])
    for step in range(6):
        emitted = torch.tensor([[20 + step] * 5, [30 + step] * 5])
        buf.commit(rule, both, emitted, torch.tensor([5, 3]))
    assert buf.out.shape[1] <= 3 + 40 + 1
    assert buf.generated(0) == [t for s in range(6) for t in [20 + s] * 5]
    assert buf.generated(1) == [t for s in range(6) for t in [30 + s] * 3]
    assert buf.sequences().shape == (2, 3 + 30)
    assert buf.committed(both, torch.tensor([0, 0]), 3).tolist() == [[7, 8, 20], [9, 10, 11]]
    # the last commit that would exceed max_new is cut to it
    cut = buf.commit(rule, both, torch.tensor([[5] * 12, [6] * 12]), torch.tensor([12, 12]))
    assert cut.keep.tolist() == [10, 12] and cut.reasons() == ["length", None]


def test_buffer_stop_string_matches_hf_generate_on_a_tiny_model():
    """Committing HF's own greedy tokens in chunks stops exactly where HF generate(stop_strings=) stops."""
    tok = char_tokenizer()
    target, _ = pair("llama")
    ids = torch.tensor([tok.convert_tokens_to_ids(list("hello"))])
    free = target.generate(input_ids=ids, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    gen = free[0, ids.shape[1]:].tolist()
    text = [tok.convert_ids_to_tokens(t) for t in gen]
    k = next(i for i in range(3, len(gen)) if all(len(c) == 1 for c in text[i - 1: i + 1]))
    stop = text[k - 1] + text[k]
    hf = target.generate(input_ids=ids, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0,
                         stop_strings=stop, tokenizer=tok)
    rule = CommitRule(None, stopping=stop_string_criteria(tok, stop))
    for chunk in (1, 3, 7):
        buf = TokenBuffer(ids, None, 24, pad_token_id=0)
        done = False
        for s in range(0, len(gen), chunk):
            piece = torch.tensor([gen[s: s + chunk]])
            done = bool(buf.commit(rule, torch.tensor([0]), piece, torch.tensor([piece.shape[1]])).done[0])
            if done:
                break
        assert done and torch.equal(buf.sequences(), hf), chunk
