"""KVState: a batched cache with holes whose every forward equals the model's own forward over each
row's committed tokens (reference: one unpadded forward per row, no cache)."""
from __future__ import annotations

import pytest
import torch

from adaspec_hf.core.kv import KVState

from conftest import pair

ATOL = 1e-4


@pytest.fixture(scope="module", params=["llama", "gpt2", "mpt"])
def model(request):
    if request.param == "mpt":  # ALiBi by cache slot: rebuilt from positions, per row once holes differ
        from test_hf_mpt import _mpt

        return _mpt(0, 2, 64)
    return pair(request.param)[0]


def _reference(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0, -1]


def _prefilled(model, prompts: list[list[int]]) -> tuple[KVState, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    kv = KVState(model)
    return kv, kv.prefill(ids, mask)


def _step(kv: KVState, tokens: list[int], positions: list[int]) -> torch.Tensor:
    """One new token per row at ``positions``; returns its logits (B, V); the slot is uncommitted."""
    ids = torch.tensor(tokens)[:, None]
    pos = torch.tensor(positions)[:, None]
    return kv.forward(ids, pos, torch.ones(len(tokens), 1, 1, dtype=torch.bool))[:, 0]


def _commit_last(kv: KVState, keep: list[bool]) -> None:
    slots = torch.full((kv.rows, 1), kv.length - 1)
    kv.commit(slots, torch.tensor(keep)[:, None])


PROMPTS = [[5, 9, 14, 3, 22], [7, 8], [30, 31, 32]]


def test_prefill_matches_the_model_and_records_positions(model):
    kv, last = _prefilled(model, PROMPTS)
    for r, p in enumerate(PROMPTS):
        assert torch.allclose(last[r], _reference(model, p), atol=ATOL)
    assert kv.valid.sum(1).tolist() == [len(p) for p in PROMPTS]
    assert kv.pos[1, -2:].tolist() == [0, 1] and kv.pos[0].tolist() == [0, 1, 2, 3, 4]


def test_commit_with_holes_keeps_later_tokens_exact(model):
    kv, _ = _prefilled(model, PROMPTS)
    lens = [len(p) for p in PROMPTS]
    _step(kv, [40, 41, 42], lens)
    _commit_last(kv, [False, True, False])  # rows 0 and 2 reject: their slot stays as a hole
    assert kv.hole_fraction > 0
    seqs = [PROMPTS[0] + [50], PROMPTS[1] + [41, 51], PROMPTS[2] + [52]]
    got = _step(kv, [50, 51, 52], [lens[0], lens[1] + 1, lens[2]])
    for r, s in enumerate(seqs):
        assert torch.allclose(got[r], _reference(model, s), atol=ATOL), r
    rejected = _step(kv, [60, 61, 62], [lens[0] + 1, lens[1] + 2, lens[2] + 1])  # row 0: 50 uncommitted
    assert not torch.allclose(rejected[0], _reference(model, seqs[0] + [60]), atol=ATOL)


def test_compact_preserves_outputs(model):
    kv, _ = _prefilled(model, PROMPTS)
    lens = [len(p) for p in PROMPTS]
    for t in range(3):  # alternate rejected / accepted tokens: holes in every row
        _step(kv, [40 + t] * 3, [n + t // 2 for n in lens])
        _commit_last(kv, [t % 2 == 1] * 3)
    before = kv.length
    kv.compact()
    assert kv.length < before and kv.hole_fraction < 1.0
    assert kv.valid.sum(1).tolist() == [n + 1 for n in lens]
    got = _step(kv, [70, 71, 72], [n + 1 for n in lens])
    for r, p in enumerate(PROMPTS):
        assert torch.allclose(got[r], _reference(model, p + [41, 70 + r]), atol=ATOL), r


def test_select_rows_and_append_rows(model):
    kv, _ = _prefilled(model, PROMPTS)
    kv.select_rows(torch.tensor([2, 0]))
    other, _ = _prefilled(model, [[11, 12, 13, 14, 15, 16, 17]])  # longer: both sides re-padded
    kv.append_rows(other)
    assert kv.rows == 3
    rows = [PROMPTS[2], PROMPTS[0], [11, 12, 13, 14, 15, 16, 17]]
    got = _step(kv, [80, 81, 82], [len(p) for p in rows])
    for r, p in enumerate(rows):
        assert torch.allclose(got[r], _reference(model, p + [80 + r]), atol=ATOL), r


def test_checkpoint_restore_undoes_forwards_and_row_surgery(model):
    kv, _ = _prefilled(model, PROMPTS)
    saved = kv.checkpoint()
    length, valid = kv.length, kv.valid.clone()
    _step(kv, [40, 41, 42], [len(p) for p in PROMPTS])
    kv.select_rows(torch.tensor([1]))
    kv.restore(saved)
    assert kv.rows == 3 and kv.length == length and torch.equal(kv.valid, valid)
    got = _step(kv, [90, 91, 92], [len(p) for p in PROMPTS])
    for r, p in enumerate(PROMPTS):
        assert torch.allclose(got[r], _reference(model, p + [90 + r]), atol=ATOL), r
