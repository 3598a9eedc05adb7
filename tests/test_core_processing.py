"""Processing: HF processors applied to many tree nodes at once, as HF generate would per node."""
from __future__ import annotations

import torch
from transformers import (
    LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
    TopKLogitsWarper,
)

from adaspec_hf.core.processing import Processing, identity_process

V = 13


def _never():
    raise AssertionError("input-free processors must not ask for prefixes")


def test_no_processors_is_falsy_and_returns_the_scores():
    s = torch.randn(3, V)
    proc = Processing(None)
    assert not proc and proc(s, _never) is s
    assert identity_process(s, _never) is s


def test_input_free_warpers_run_once_without_prefixes():
    torch.manual_seed(0)
    s = torch.randn(5, V)
    procs = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(4)])
    proc = Processing(procs, batch_size=2)
    assert proc and proc.input_free
    want = procs(torch.zeros(5, 1, dtype=torch.long), s.clone())
    assert torch.equal(proc(s, _never), want)


def test_input_dependent_processors_see_each_nodes_own_prefix():
    torch.manual_seed(1)
    procs = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.8), NoRepeatNGramLogitsProcessor(2)])
    proc = Processing(procs, batch_size=2)
    assert not proc.input_free
    # rows 0 and 1, prefixes of different lengths, two nodes of row 0 at the same length
    items = [(0, torch.tensor([3, 4, 5, 3])), (0, torch.tensor([3, 4, 5, 6])), (1, torch.tensor([7, 8, 7])),
             (1, torch.tensor([7, 8, 7, 9, 1]))]
    s = torch.randn(len(items), V)
    got = proc(s, lambda: items)
    for i, (_, seq) in enumerate(items):
        want = procs(seq[None], s[i: i + 1].clone())[0]
        assert torch.allclose(got[i], want), i
    # the n-gram ban really bit: after "... 3" with the bigram (3, 4) seen, 4 is banned
    assert got[0, 4] == float("-inf") and s[0, 4] != float("-inf")


def test_empty_scores_pass_through():
    proc = Processing(LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.5)]))
    s = torch.zeros(0, V)
    assert proc(s, _never).shape == (0, V)
