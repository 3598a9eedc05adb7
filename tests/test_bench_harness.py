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


def test_serving_run_reports_attainment_and_goodput_per_slo_class(tmp_path, monkeypatch):
    """A class whose TPOT objective cannot be met has attainment 0 and goodput 0; a class without
    objectives has every finished request counted."""
    monkeypatch.setenv("ADASPEC_HF_CACHE", str(tmp_path))
    from adaspec_hf import SLO
    from adaspec_hf.bench.serving import ServingBenchResult, run_system
    from adaspec_hf.bench.workload import Workload, WorkloadRequest
    from adaspec_hf.policies import StaticChain

    target, draft = pair("llama")
    reqs = [WorkloadRequest(i, 0.0, [5 + i, 9, 14, 3], 8, cls, SLO(tpot_ms=1e-6) if cls == "tight" else None)
            for i, cls in enumerate(["tight", "loose", "tight", "loose"])]
    out = run_system("static-2", target, draft, None, Workload(reqs, rate=1.0, arrival="poisson", seed=0),
                     warmup=1, policy=StaticChain(2))["metrics"]
    assert out["attainment_by_class"] == {"tight": 0.0, "loose": 1.0}
    assert out["goodput_by_class"]["tight"] == 0.0 and out["goodput_by_class"]["loose"] > 0
    res = ServingBenchResult("t", {}, rows=[out])
    assert "tight/loose goodput" in res.table()


def test_prompt_lookup_method_names():
    assert resolve_method("hf-prompt-lookup-k10").batch1_only
    assert not resolve_method("lookup:adaptive").batch1_only
    assert resolve_method("adaptive+lookup").name == "adaptive+lookup"
    with pytest.raises(ValueError, match="unknown draft_policy"):
        resolve_method("lookup:nonsense")
    with pytest.raises(ValueError, match="unknown draft_policy"):
        resolve_method("nonsense+lookup")


def test_lookup_methods_in_the_harness_match_vanilla(tmp_path, monkeypatch):
    monkeypatch.setenv("ADASPEC_HF_CACHE", str(tmp_path))
    target, draft = pair("llama")
    prompts = [[5, 6, 7, 5, 6, 7, 5], [9, 10, 11, 9, 10]]
    res = harness.run_benchmark("t", target, draft, prompts, ["vanilla", "lookup:static-4", "static-2+lookup",
                                "hf-prompt-lookup-k4"], repeats=1, warmup=0, max_new_tokens=8, progress=False)
    assert all(r.matches_vanilla for r in res.rows if r.method != "vanilla")
