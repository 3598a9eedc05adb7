"""Metrics as `evaluate` modules: ``evaluate.load(str(SERVING_METRICS_PATH))`` works offline.

:func:`compute_serving_metrics` is the same computation as a plain function (loaded from the
module script, so there is one copy).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

SERVING_METRICS_PATH = Path(__file__).parent / "serving_metrics"


def _load():
    spec = importlib.util.spec_from_file_location("adaspec_hf_serving_metrics", SERVING_METRICS_PATH / "serving_metrics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compute_serving_metrics(ttft, tpot, new_tokens, slo_met, duration, percentiles=(50, 90, 99)) -> dict:
    return _load_cached().compute_serving_metrics(ttft, tpot, new_tokens, slo_met, duration, percentiles)


_MODULE = None


def _load_cached():
    global _MODULE
    if _MODULE is None:
        _MODULE = _load()
    return _MODULE


__all__ = ["SERVING_METRICS_PATH", "compute_serving_metrics"]
