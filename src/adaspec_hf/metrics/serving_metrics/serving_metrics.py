"""Serving metrics for LLM request streams: TTFT / TPOT percentiles, SLO attainment, goodput, throughput.

Load offline with ``evaluate.load("<path to this folder>")``::

    m = evaluate.load("src/adaspec_hf/metrics/serving_metrics")
    m.compute(ttft=[...], tpot=[...], new_tokens=[...], slo_met=[...], duration=12.5)

One entry per request: ``ttft`` and ``tpot`` in seconds (NaN/None where not applicable, e.g. a
one-token answer has no TPOT, a request that never started has no TTFT), ``new_tokens`` generated,
``slo_met`` whether it met its SLO (a request without an SLO counts as met). ``duration`` is the
wall time of the run in seconds (first arrival to last completion).

Returns ``ttft_p50/p90/p99`` and ``tpot_p50/p90/p99`` (milliseconds), ``slo_attainment``
(fraction of requests meeting their SLO), ``goodput`` (tokens of SLO-meeting requests per second),
``throughput`` (all generated tokens per second), ``request_rate`` (completed requests per second)
and ``requests``. The module depends only on numpy, so it also runs without adaspec_hf.
"""
from __future__ import annotations

import math

import datasets
import evaluate
import numpy as np

_DESCRIPTION = __doc__
_CITATION = """\
@inproceedings{adaserve,
  title={AdaServe: Accelerating Multi-SLO LLM Serving with SLO-Customized Speculative Decoding},
  booktitle={EuroSys}, year={2026}
}
"""
_KWARGS_DESCRIPTION = """
Args:
    ttft (list of float): time to first token per request, seconds (NaN/None: not applicable).
    tpot (list of float): mean time per output token after the first, seconds (NaN/None: n/a).
    new_tokens (list of int): generated tokens per request.
    slo_met (list of bool): whether the request met its SLO.
    duration (float): wall time of the run in seconds (required for rates).
    percentiles (list of int, optional): which percentiles to report, default [50, 90, 99].
Returns:
    dict with ttft_pXX / tpot_pXX (ms), slo_attainment, goodput (tok/s), throughput (tok/s),
    request_rate (req/s), requests.
Examples:
    >>> m = evaluate.load("serving_metrics")
    >>> m.compute(ttft=[0.1, 0.2], tpot=[0.02, 0.03], new_tokens=[10, 20], slo_met=[True, False], duration=2.0)["goodput"]
    5.0
"""


def _clean(values) -> np.ndarray:
    arr = np.asarray([np.nan if v is None else float(v) for v in values], dtype=float)
    return arr[np.isfinite(arr)]


def compute_serving_metrics(ttft, tpot, new_tokens, slo_met, duration: float, percentiles=(50, 90, 99)) -> dict:
    """The metric as a plain function (the benchmark harness calls this directly)."""
    n = len(new_tokens)
    if not (len(ttft) == len(tpot) == len(slo_met) == n):
        raise ValueError("ttft, tpot, new_tokens and slo_met must have one entry per request")
    if duration is None or not (isinstance(duration, (int, float)) and math.isfinite(duration) and duration > 0):
        raise ValueError(f"duration must be a positive number of seconds, got {duration!r}")
    out: dict[str, float | int | None] = {"requests": n}
    for name, values in (("ttft", ttft), ("tpot", tpot)):
        arr = _clean(values)
        for p in percentiles:
            out[f"{name}_p{int(p)}"] = float(np.percentile(arr, p) * 1000.0) if arr.size else None
    tokens = np.asarray([int(t) for t in new_tokens], dtype=float)
    met = np.asarray([bool(m) for m in slo_met], dtype=bool)
    out["slo_attainment"] = float(met.mean()) if n else None
    out["goodput"] = float(tokens[met].sum() / duration)
    out["throughput"] = float(tokens.sum() / duration)
    out["request_rate"] = float(n / duration)
    return out


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ServingMetrics(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "ttft": datasets.Value("float64"),
                "tpot": datasets.Value("float64"),
                "new_tokens": datasets.Value("int64"),
                "slo_met": datasets.Value("bool"),
            }),
            reference_urls=["https://arxiv.org/abs/2501.12162"],
        )

    def _compute(self, ttft, tpot, new_tokens, slo_met, duration=None, percentiles=(50, 90, 99)):
        return compute_serving_metrics(ttft, tpot, new_tokens, slo_met, duration, percentiles)
