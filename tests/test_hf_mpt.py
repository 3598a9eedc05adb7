"""MPT: ALiBi by cache slot inside each attention layer, rebuilt from the cache's key positions.

MPT takes no position_ids and builds one ALiBi bias for the whole batch that each layer slices by
key slot; over a cache with holes (rejected drafts) and tree siblings, slots are not positions, so
the engine hands it the bias of explicit positions (one forward per row when rows' holes differ).
Every case is token-identical to the target's own greedy generate on a left-padded batch.
"""
from __future__ import annotations

import copy

import pytest
import torch
import transformers

import adaspec_hf
from adaspec_hf import AdaptiveCandidateGenerator
from adaspec_hf.core import kv as kv_module
from adaspec_hf.core.kv import KVState

from conftest import VOCAB, ragged_batch
from test_hf_compat import _OPTIONS

HEAD_SCALE = 4.0  # sharper random logits: stable greedy paths
DRAFT_NOISE = 0.02  # the draft is the target plus noise: some drafts accepted, some rejected (holes)
MAX_NEW = 16


def _mpt(seed: int, layers: int, width: int) -> transformers.MptForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.MptConfig(vocab_size=VOCAB, n_layers=layers, d_model=width, n_heads=4,
                                 tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.MptForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(HEAD_SCALE)
    return model


@pytest.fixture(scope="module")
def mpt():
    target = _mpt(0, 2, 64)
    draft = copy.deepcopy(target)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(DRAFT_NOISE * torch.randn_like(p))
    return adaspec_hf.enable(target), draft


@pytest.fixture
def per_row_calls(monkeypatch):
    """Counts the per-row forwards (rows whose holes differ), so a test knows it exercised them."""
    calls = []
    original = KVState._forward_by_row

    def counted(self, *args, **kwargs):
        calls.append(self.rows)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(KVState, "_forward_by_row", counted)
    return calls


@pytest.mark.parametrize("policy", ["static-4", "tree-3x2", "adaptive"])
def test_mpt_left_padded_batch_matches_greedy(mpt, policy, per_row_calls):
    target, draft = mpt
    for seed in (13, 14):
        ids, mask = ragged_batch(3, 9, seed, min_len=2)
        assert len(set(mask.sum(1).tolist())) > 1  # prompts of different lengths
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False)
        ref = target.generate(**kw)
        out = target.generate(**kw, assistant_model=draft, adaptive=True, draft_policy=policy)
        assert torch.equal(out, ref), (transformers.__version__, policy, seed)
        stats = target.adaspec_stats
        assert stats.target_forwards < MAX_NEW  # several tokens per step: drafts were accepted
    if policy != "adaptive":  # the planner may draft too little to leave holes; fixed shapes always do
        assert stats.accepted_tokens < stats.drafted_tokens and per_row_calls


def test_mpt_scores_and_a_perfect_draft_match(mpt):
    """HF's assisted-decoding checks: scores equal greedy's; a perfect draft (long accepted runs,
    no holes: one batched forward) gives the same sequences."""
    target, draft = mpt
    ids, mask = ragged_batch(3, 9, 15, min_len=2)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False,
              return_dict_in_generate=True, output_scores=True, output_logits=True)
    ref = target.generate(**kw)
    out = target.generate(**kw, assistant_model=draft, adaptive=True, draft_policy="static-3")
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores):
        assert torch.allclose(a, b, atol=1e-4)
    same = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False,
                           assistant_model=target, adaptive=True, draft_policy="static-4")
    assert torch.equal(same, ref.sequences)
    assert target.adaspec_stats.accepted_tokens == target.adaspec_stats.drafted_tokens


@pytest.mark.parametrize("option", sorted(_OPTIONS))
def test_mpt_hf_option_greedy_matches_generate(mpt, option):
    target, draft = mpt
    ids, mask = ragged_batch(3, 7, 5, min_len=2)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, **_OPTIONS[option])
    ref = target.generate(**kw)
    out = target.generate(**kw, assistant_model=draft, adaptive=True, draft_policy="static-3")
    assert torch.equal(out, ref), (transformers.__version__, option)


def test_mpt_candidate_generator_in_hfs_assisted_loop(mpt):
    target, draft = mpt
    ids = torch.tensor([[5, 9, 14, 3, 22]])
    ref = target.generate(input_ids=ids, max_new_tokens=MAX_NEW, do_sample=False)
    # MptConfig defaults to use_cache=False, which HF's assisted loop refuses; adaptive=True does not care
    hf_assisted = target.generate(input_ids=ids, max_new_tokens=MAX_NEW, do_sample=False, assistant_model=draft,
                                  use_cache=True)
    gen = AdaptiveCandidateGenerator(draft, policy="static-3")
    ours = target.generate(input_ids=ids, max_new_tokens=MAX_NEW, do_sample=False, assistant_model=draft,
                           candidate_generator=gen, use_cache=True)
    assert torch.equal(hf_assisted, ref) and torch.equal(ours, ref)


def test_slot_aligned_rows_share_one_bias():
    """No holes: each row's visible keys at slot + constant; a hole or tree siblings break it."""
    neg = torch.finfo(torch.float32).min
    pos = torch.tensor([[1, 0, 1, 2], [0, 1, 2, 3]])  # row 0 left-padded by one slot
    mask = torch.zeros(2, 1, 1, 4)
    mask[0, 0, 0, 0] = neg
    assert kv_module._slot_aligned(pos, mask)
    hole = torch.tensor([[0, 1, 1, 2], [0, 1, 2, 3]])  # row 0's slot 1 a rejected draft, masked out
    masked_hole = torch.zeros(2, 1, 1, 4)
    masked_hole[0, 0, 0, 1] = neg
    assert not kv_module._slot_aligned(hole, masked_hole)  # later slots sit one position back
    siblings = torch.tensor([[0, 1, 2, 2], [0, 1, 2, 3]])  # row 0's last two slots: one tree level
    assert not kv_module._slot_aligned(siblings, torch.zeros(2, 1, 1, 4))
    assert kv_module._slot_aligned(siblings[:, :3], torch.zeros(2, 1, 1, 3))
