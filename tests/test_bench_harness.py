"""Benchmark harness: the greedy-equality guard, token counting and batching."""
from __future__ import annotations

import statistics
import time

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


@pytest.mark.parametrize("engine_thread", [False, True])
def test_serving_run_reports_attainment_and_goodput_per_slo_class(tmp_path, monkeypatch, engine_thread):
    """A class whose TPOT objective cannot be met has attainment 0 and goodput 0; a class without
    objectives has every finished request counted; the same whichever thread steps the engine."""
    monkeypatch.setenv("ADASPEC_HF_CACHE", str(tmp_path))
    from adaspec_hf import SLO
    from adaspec_hf.bench.serving import run_system
    from adaspec_hf.bench.serving_results import ServingBenchResult
    from adaspec_hf.bench.workload import Workload, WorkloadRequest
    from adaspec_hf.policies import StaticChain

    target, draft = pair("llama")
    reqs = [WorkloadRequest(i, 0.0, [5 + i, 9, 14, 3], 8, cls, SLO(tpot_ms=1e-6) if cls == "tight" else None)
            for i, cls in enumerate(["tight", "loose", "tight", "loose"])]
    out = run_system("static-2", target, draft, None, Workload(reqs, rate=1.0, arrival="poisson", seed=0),
                     warmup=1, policy=StaticChain(2), engine_thread=engine_thread)["metrics"]
    assert out["finished"] == 4
    assert out["attainment_by_class"] == {"tight": 0.0, "loose": 1.0}
    assert out["goodput_by_class"]["tight"] == 0.0 and out["goodput_by_class"]["loose"] > 0
    res = ServingBenchResult("t", {}, rows=[out])
    assert "tight/loose goodput" in res.table()


def test_serving_run_samples_at_the_given_temperature(tmp_path, monkeypatch):
    """``temperature``: every request, the warm-up's too, samples at it, and planners take the
    sampling calibration (``"adaptive"`` then plans token trees, as ``generate`` does)."""
    monkeypatch.setenv("ADASPEC_HF_CACHE", str(tmp_path))
    from adaspec_hf.bench.serving import make_system_policy, run_system
    from adaspec_hf.bench.workload import Workload, WorkloadRequest
    from adaspec_hf.policies import build as B
    from adaspec_hf.serving.engine import Engine
    from test_policies_registry import synthetic_profile

    target, draft = pair("llama")
    seen, submit = [], Engine.submit

    def spy(self, prompt, max_new_tokens=64, **kw):
        seen.append((kw.get("do_sample"), kw.get("temperature")))
        return submit(self, prompt, max_new_tokens, **kw)

    monkeypatch.setattr(Engine, "submit", spy)
    reqs = [WorkloadRequest(i, 0.0, [5 + i, 9, 14, 3], 8, "loose", None) for i in range(3)]
    out = run_system("static-2", target, draft, None, Workload(reqs, rate=1.0, arrival="poisson", seed=0),
                     warmup=1, temperature=0.9)["metrics"]
    assert out["finished"] == 3 and seen == [(True, 0.9)] * 4
    seen.clear()
    run_system("static-2", target, draft, None, Workload(reqs, rate=1.0, arrival="poisson", seed=0), warmup=1)
    assert seen == [(None, None)] * 4  # greedy: nothing passed, the engine's default
    monkeypatch.setattr(B, "load_or_profile", lambda t, d, quick=True: synthetic_profile())
    sampled, greedy = (make_system_policy("adaptive", target, draft, sampling=s) for s in (True, False))
    assert sampled.tree and not greedy.tree  # the sampling flag reached the registry


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


def test_methods_take_turns_on_every_batch(models, monkeypatch):
    """Drift of the machine's speed must fall on every method alike: each batch is run by every
    method before the next batch, and the order rotates so no method always follows the same one."""
    calls = []

    def recording(name: str) -> Method:
        def run(target, draft, ids, mask, gen_kw):
            calls.append((name, ids.shape[1]))
            return resolve_method("vanilla").fn(target, draft, ids, mask, gen_kw)
        return Method(name, run)

    monkeypatch.setattr(harness, "resolve_method", recording)
    target, draft = models
    res = harness.run_benchmark("t", target, draft, PROMPTS[:2], ["a", "b", "c"], max_new_tokens=2, repeats=2,
                                warmup=0, progress=False)
    widths = [w for _, w in calls]
    assert widths == [4] * 3 + [3] * 3 + [4] * 3 + [3] * 3  # per batch, all methods, then the next batch
    firsts = [calls[i][0] for i in range(0, len(calls), 3)]
    assert firsts == ["a", "b", "c", "a"]  # the order rotates per batch and repeat
    assert all(len(r.times) == 2 for r in res.rows)


def _row(method: str, times: list[float]) -> harness.Row:
    return harness.Row(method, 1, 100 / sorted(times)[len(times) // 2], times, 100)


def test_speed_ratios_pair_repeats_and_hold_out_the_choice():
    # repeat 2 ran on a machine twice as slow for everyone: paired ratios cancel it
    rows = [_row("ours", [1.0, 2.0, 1.0]), _row("k1", [1.1, 2.2, 1.1]), _row("k2", [0.9, 2.4, 1.2])]
    out = harness.speed_ratios(rows, "ours", ["k1", "k2"])
    assert out["best"] == "k1"  # median 1.1 against k2's 1.2
    assert out["hindsight"] == pytest.approx(1.1)
    assert out["paired"] == pytest.approx(1.1) and out["paired_min"] == pytest.approx(1.1)
    # held out (in tokens/s): repeat 1 is judged against the best of repeats 2-3 (k1: 68 vs 62),
    # repeat 2 against the best of 1 and 3 (k2: 97 vs 91), repeat 3 against the best of 1-2 (k2: 76
    # vs 68); k2 is slower than ours by 1.2x in repeats 2 and 3
    assert out["held_out"] == pytest.approx(statistics.median([1.1, 1.2, 1.2]))
    assert out["repeats"] == 3


def test_speed_ratios_of_one_repeat_have_no_held_out_figure():
    out = harness.speed_ratios([_row("ours", [1.0]), _row("k", [2.0])], "ours", ["k"])
    assert out["hindsight"] == pytest.approx(2.0) and "held_out" not in out


def test_rates_count_each_repeats_own_tokens(models, monkeypatch):
    """Sampled texts differ from repeat to repeat and end at EOS at different lengths: a repeat's
    rate is its own new tokens over its own time (the last repeat's count over the median time
    misstated sampled rates by the ratio of the two texts' lengths)."""
    calls = []

    def ending(name: str) -> Method:
        def run(target, draft, ids, mask, gen_kw):
            calls.append(name)
            time.sleep(0.002)
            n = len(calls)  # one call per repeat: EOS (9) after n - 1 tokens, so n tokens counted
            new = torch.tensor([[4] * (n - 1) + [9] + [0] * (4 - n)])
            return RunOutput(torch.cat([ids.cpu(), new], 1), 0)
        return Method(name, run)

    monkeypatch.setattr(harness, "resolve_method", ending)
    target, draft = models
    res = harness.run_benchmark("t", target, draft, PROMPTS[:1], ["a"], max_new_tokens=4, repeats=3, warmup=0,
                                eos_token_id=9, do_sample=True, progress=False)
    row, = res.rows
    assert row.tokens == [1, 2, 3] and row.new_tokens == 3
    assert row.rates() == [n / t for n, t in zip([1, 2, 3], row.times)] and min(row.times) > 0
    assert row.tokens_per_s == pytest.approx(statistics.median(row.rates()))
    # rows built without per-repeat counts fall back to new_tokens for every repeat
    assert _row("x", [1.0, 2.0]).rates() == [100.0, 50.0]


def _serving_row(system: str, seed: int, tight: float, loose: float, n_tight: int, n_loose: int,
                 goodput: float) -> dict:
    n = n_tight + n_loose
    return {"rate": 1.0, "system": system, "seed": seed, "requests": n, "finished": n,
            "slo_attainment": (tight * n_tight + loose * n_loose) / n,
            "attainment_by_class": {"tight": tight, "loose": loose},
            "requests_by_class": {"tight": n_tight, "loose": n_loose},
            "goodput": goodput, "goodput_by_class": {"tight": goodput / 2, "loose": goodput / 2},
            "throughput": goodput + 1, "accepted_per_step": 1.0, "ttft_p50": 1.0, "ttft_p99": 2.0,
            "tpot_p50": 1.0, "tpot_p99": 2.0}


def test_serving_results_note_the_machine_load_in_the_markdown(tmp_path):
    """The run's load averages (what decides whether its timings mean anything) reach the .md too."""
    from adaspec_hf.bench.serving_results import ServingBenchResult, write_serving_results

    res = ServingBenchResult("t", {"load_before": [0.1, 0.2, 0.3], "load_after": [1.9, 1.5, 0.9]},
                             rows=[_serving_row("a", 0, 1.0, 1.0, 1, 1, 5.0)])
    md = write_serving_results(res, tmp_path, plot=False)["md"].read_text()
    assert "- load_before: [0.1, 0.2, 0.3]" in md and "- load_after: [1.9, 1.5, 0.9]" in md


def test_serving_runs_pool_over_workload_seeds():
    """Attainment pools met requests over all requests (a run with more tight requests weighs more),
    goodput is the runs' mean, and each run's figures stay visible."""
    from adaspec_hf.bench.serving_results import ServingBenchResult, pool_runs

    rows = [_serving_row("a", 0, 1.0, 1.0, 2, 2, 10.0), _serving_row("b", 0, 0.5, 1.0, 2, 2, 8.0),
            _serving_row("b", 1, 0.0, 1.0, 6, 2, 4.0), _serving_row("a", 1, 0.5, 0.5, 6, 2, 6.0)]
    pooled = {p["system"]: p for p in pool_runs(rows)}
    assert list(pooled) == ["a", "b"]
    a, b = pooled["a"], pooled["b"]
    assert a["runs"] == 2 and a["seeds"] == [0, 1] and a["requests"] == 12
    assert a["attainment_by_class"]["tight"] == pytest.approx((2 * 1.0 + 6 * 0.5) / 8)
    assert b["attainment_by_class"]["tight"] == pytest.approx(1 / 8)
    assert a["slo_attainment"] == pytest.approx((4 + 4) / 12)
    assert a["goodput"] == pytest.approx(8.0) and b["goodput_by_run"] == [8.0, 4.0]
    assert b["tight_by_run"] == [0.5, 0.0]
    res = ServingBenchResult("t", {}, rows=rows)
    assert res.n_seeds == 2 and "pooled" in res.to_json()
    assert "Pooled over 2 workload seeds" in res.table()
    one = ServingBenchResult("t", {}, rows=rows[:2])
    assert one.n_seeds == 1 and "pooled" not in one.to_json() and "Pooled" not in one.table()


def test_serving_benchmark_replays_every_seed_with_systems_by_turns(monkeypatch):
    """Each seed is its own workload, every system runs it, and the order rotates from seed to seed."""
    from adaspec_hf.bench import serving as S

    calls = []

    def fake_run(system, target, draft, tok, wl, **kw):
        calls.append((system, wl.seed, kw["seed"]))
        return {"metrics": _serving_row(system, -1, 1.0, 1.0, 1, 1, 5.0), "requests": []}

    cal = S.Calibration(per_token_s=0.03, ttft_s=0.05, request_s=1.0, prompt_tokens=4, output_tokens=8)
    monkeypatch.setattr(S, "calibrate", lambda *a, **k: cal)
    monkeypatch.setattr(S, "run_system", fake_run)
    monkeypatch.setattr(S, "load_averages", lambda: (0.0, 0.0, 0.0))
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    target = draft = torch.nn.Linear(2, 2)  # only counted (parameters); the runs are faked
    res = S.run_serving_benchmark(target, draft, None, prompts, systems=["x", "y", "z"], rates=[1.0], duration=2.0,
                                  output_len=4, seeds=[3, 4, 5], progress=False)
    assert [c[0] for c in calls] == ["x", "y", "z", "y", "z", "x", "z", "x", "y"]
    assert [c[1] for c in calls] == [3] * 3 + [4] * 3 + [5] * 3 and all(c[1] == c[2] for c in calls)
    assert [r["seed"] for r in res.rows] == [3] * 3 + [4] * 3 + [5] * 3
    assert res.config["seeds"] == [3, 4, 5] and len(res.pooled) == 3
    with pytest.raises(ValueError, match="seeds must differ"):
        S.run_serving_benchmark(None, None, None, prompts, systems=["x"], rates=[1.0], seeds=[1, 1], progress=False)
