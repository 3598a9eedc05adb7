"""Workload generator (seeded, right mean rate, bursty gamma, SLO mix, lengths) and the evaluate metric."""
from __future__ import annotations

import math

import numpy as np
import pytest

from adaspec_hf.metrics import SERVING_METRICS_PATH, compute_serving_metrics
from adaspec_hf.slo import SLO
from adaspec_hf.bench.workload import SLOClass, arrival_times, make_workload

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]


def test_seeded_and_reproducible():
    a = make_workload(PROMPTS, 3.0, n_requests=50, seed=7)
    b = make_workload(PROMPTS, 3.0, n_requests=50, seed=7)
    c = make_workload(PROMPTS, 3.0, n_requests=50, seed=8)
    key = lambda w: [(r.arrival, tuple(r.prompt_ids), r.max_new_tokens, r.slo_class) for r in w.requests]  # noqa: E731
    assert key(a) == key(b)
    assert key(a) != key(c)


@pytest.mark.parametrize("process,cv", [("poisson", 1.0), ("gamma", 0.5), ("gamma", 3.0)])
def test_mean_rate_and_burstiness(process, cv):
    rate = 4.0
    t = arrival_times(rate, n=40_000, process=process, cv=cv, seed=1)
    gaps = np.diff(np.concatenate([[0.0], t]))
    assert (gaps >= 0).all()  # very bursty gamma gaps can be 0 (simultaneous arrivals)
    assert len(t) / t[-1] == pytest.approx(rate, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.08)


def test_duration_bound_and_counts():
    t = arrival_times(2.0, duration=100.0, seed=3)
    assert t[-1] <= 100.0 and len(t) == pytest.approx(200, rel=0.25)
    t = arrival_times(2.0, n=30, duration=1000.0, seed=3)
    assert len(t) == 30
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            arrival_times(bad, n=5)
    with pytest.raises(ValueError):
        arrival_times(1.0, n=5, process="uniform")


def test_slo_mix_and_output_lengths():
    classes = [SLOClass("tight", tpot_ms=10.0, ttft_ms=100.0, weight=1), SLOClass("loose", tpot_ms=30.0, weight=3),
               SLOClass("best-effort", weight=0)]
    w = make_workload(PROMPTS, 5.0, n_requests=4000, slo_classes=classes, output_len=(8, 12), seed=0)
    counts = w.summary()["classes"]
    assert counts.get("best-effort", 0) == 0
    assert counts["tight"] / len(w) == pytest.approx(0.25, abs=0.03)
    for r in w.requests:
        assert 8 <= r.max_new_tokens <= 12
        assert r.prompt_ids in PROMPTS
        assert r.slo == (SLO(10.0, 100.0) if r.slo_class == "tight" else SLO(tpot_ms=30.0))
    fixed = make_workload(PROMPTS, 5.0, n_requests=10, output_len=7, max_prompt_tokens=2)
    assert all(r.max_new_tokens == 7 and len(r.prompt_ids) <= 2 for r in fixed.requests)


def test_prompts_and_lengths_from_a_dataset():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"input_ids": PROMPTS, "output_len": [3, 100, 20, 40]})
    w = make_workload(ds, 2.0, n_requests=200, output_len="data", seed=1)
    for r in w.requests:
        expected = {0: 16, 1: 64, 2: 20, 3: 40}[PROMPTS.index(r.prompt_ids)]  # clipped to [16, 64]
        assert r.max_new_tokens == expected
    with pytest.raises(ValueError):
        make_workload(datasets.Dataset.from_dict({"prompt": ["a b"]}), 1.0, n_requests=3)  # text, no tokenizer


def test_metric_function():
    out = compute_serving_metrics(ttft=[0.1, 0.2, None, 0.4], tpot=[0.01, None, float("nan"), 0.03],
                                  new_tokens=[10, 1, 0, 30], slo_met=[True, True, False, False], duration=2.0)
    assert out["requests"] == 4
    assert out["slo_attainment"] == 0.5
    assert out["goodput"] == pytest.approx(11 / 2.0)
    assert out["throughput"] == pytest.approx(41 / 2.0)
    assert out["ttft_p50"] == pytest.approx(200.0)
    assert out["tpot_p50"] == pytest.approx(20.0)
    with pytest.raises(ValueError):
        compute_serving_metrics([0.1], [0.1], [1, 2], [True], 1.0)
    with pytest.raises(ValueError):
        compute_serving_metrics([0.1], [0.1], [1], [True], 0.0)


def test_evaluate_metric_loads_offline_and_computes(monkeypatch):
    evaluate = pytest.importorskip("evaluate")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    metric = evaluate.load(str(SERVING_METRICS_PATH))
    args = dict(ttft=[0.1, 0.3], tpot=[0.02, 0.05], new_tokens=[20, 40], slo_met=[True, False])
    out = metric.compute(**args, duration=4.0)
    assert out == compute_serving_metrics(**args, duration=4.0)
    assert out["goodput"] == pytest.approx(5.0) and out["throughput"] == pytest.approx(15.0)
    # incremental use, as with any evaluate metric
    metric.add_batch(ttft=[0.1], tpot=[0.02], new_tokens=[20], slo_met=[True])
    metric.add(ttft=0.3, tpot=0.05, new_tokens=40, slo_met=False)
    assert metric.compute(duration=4.0)["slo_attainment"] == 0.5
    assert math.isclose(metric.compute(**args, duration=2.0, percentiles=[50])["ttft_p50"], 200.0)
