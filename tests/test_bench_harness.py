"""Benchmark harness: the greedy-equality guard, token counting and batching."""
from __future__ import annotations

import pytest
import torch

from adaspec_hf.bench import harness
from adaspec_hf.bench.methods import Method, RunOutput, resolve_method
from conftest import pair

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [17, 18]]


def _corrupting(name: str) -> Method:
    """A 'speculative' method that changes the last generated token: what the guard must catch."""
    vanilla = resolve_method("vanilla")

    def run(target, draft, ids, mask, gen_kw) -> RunOutput:
        out = vanilla.fn(target, draft, ids, mask, gen_kw)
        seq = out.sequences.clone()
        seq[:, -1] = (seq[:, -1] + 1) % target.config.vocab_size
        return RunOutput(seq, 0)

    return Method(name, run)


def _faithful(name: str) -> Method:
    return Method(name, resolve_method("vanilla").fn)


@pytest.fixture(scope="module")
def models():
    return pair("llama")


def _run(models, monkeypatch, factory, **kw):
    monkeypatch.setattr(harness, "resolve_method", lambda n: resolve_method(n) if n == "vanilla" else factory(n))
    target, draft = models
    return harness.run_benchmark("t", target, draft, PROMPTS, ["vanilla", "other"], max_new_tokens=4, repeats=1,
                                 warmup=0, progress=False, **kw)


def test_mismatch_with_vanilla_greedy_raises(models, monkeypatch):
    with pytest.raises(harness.BenchmarkMismatch, match="other at batch 1"):
        _run(models, monkeypatch, _corrupting)


def test_mismatch_is_recorded_when_unchecked(models, monkeypatch):
    res = _run(models, monkeypatch, _corrupting, check=False)
    row = {r.method: r for r in res.rows}["other"]
    assert row.matches_vanilla is False and "| NO |" in res.table()


def test_equal_output_passes_and_is_marked(models, monkeypatch):
    res = _run(models, monkeypatch, _faithful, batch_sizes=(1, 2))
    rows = [r for r in res.rows if r.method == "other"]
    assert [r.batch for r in rows] == [1, 2] and all(r.matches_vanilla for r in rows)
    assert all(r.speedup is not None for r in rows)


def test_sampling_is_not_compared(models, monkeypatch):
    res = _run(models, monkeypatch, _corrupting, do_sample=True)
    assert {r.method: r for r in res.rows}["other"].matches_vanilla is None


def test_count_new_stops_at_first_eos():
    seq = torch.tensor([[1, 2, 3, 9, 0, 0], [1, 2, 4, 5, 6, 7]])
    assert harness._count_new(seq, 2, 9) == 2 + 4
    assert harness._count_new(seq, 2, None) == 8


def test_batches_are_left_padded():
    (ids, mask), = harness.batches_of([[3, 4, 5], [6]], 2, pad_id=0)
    assert ids.tolist() == [[3, 4, 5], [0, 0, 6]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_too_few_prompts_for_the_batch_size(models):
    target, draft = models
    with pytest.raises(ValueError, match="not enough prompts"):
        harness.run_benchmark("t", target, draft, PROMPTS[:1], ["vanilla"], batch_sizes=(2,), progress=False)
