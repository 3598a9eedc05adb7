"""The Proposer seam: the step verifies whatever a proposer drafts, losslessly."""
from __future__ import annotations

import torch

from adaspec_hf.core import DecodeResult, SpeculativeDecoder
from adaspec_hf.core.tree import DraftTree
from adaspec_hf.policies import StaticChain

from conftest import pair, ragged_batch


class ChainProposer:
    """Drafts a chain of ``max_depth[b]`` tokens per row from ``next_tokens(row, length)``, no model."""

    def __init__(self, next_tokens):
        self.next_tokens = next_tokens
        self.accepted_calls = 0

    def propose(self, batch, src, policy, ctx, max_depth, process, prefix_of):
        tokens = [self.next_tokens(int(r), int(n), int(d))
                  for r, n, d in zip(batch.rid.tolist(), batch.length.tolist(), max_depth.tolist())]
        return DraftTree.from_lists(tokens, [list(range(-1, len(t) - 1)) for t in tokens], device=batch.rid.device)

    def accepted(self, batch, tree, accepted):
        self.accepted_calls += 1


def _greedy(target, ids, mask, n):
    return target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                           pad_token_id=0, eos_token_id=2)


def test_a_wrong_proposer_still_gives_greedy_output():
    target, draft = pair("llama")
    ids, mask = ragged_batch(3, 8, 5)
    prop = ChainProposer(lambda row, length, depth: [7] * depth)
    dec = SpeculativeDecoder(target, draft, StaticChain(3), eos_token_id=2, pad_token_id=0, proposer=prop)
    out = dec.generate(ids, mask, 16)
    assert torch.equal(out.sequences, _greedy(target, ids, mask, 16))
    # told the verdict on every step that verified a draft (the last, one-token step drafts nothing)
    assert prop.accepted_calls == sum(1 for s in out.stats.steps if sum(s.drafted)) > 0


def test_an_oracle_proposer_is_accepted_in_full():
    target, draft = pair("llama")
    ids, mask = ragged_batch(2, 8, 9)
    ref = _greedy(target, ids, mask, 20)
    pad = (mask == 0).sum(1).tolist()

    def oracle(row, length, depth):
        # the pending token sits at real position length - 1: the draft continues after it
        start = pad[row] + length
        return ref[row, start: start + depth].tolist()

    dec = SpeculativeDecoder(target, draft, StaticChain(4), eos_token_id=2, pad_token_id=0,
                             proposer=ChainProposer(oracle))
    out: DecodeResult = dec.generate(ids, mask, 20)
    assert torch.equal(out.sequences, ref)
    assert out.stats.drafted_tokens > 0
    assert out.stats.accepted_tokens == out.stats.drafted_tokens
