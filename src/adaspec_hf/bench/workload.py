"""Seeded request workloads for serving benchmarks: arrivals, prompts, output lengths, SLO classes.

* Arrivals: ``"poisson"`` (exponential gaps, mean ``1 / rate``) or ``"gamma"`` (gamma gaps with the
  same mean and coefficient of variation ``cv``; ``cv > 1`` is bursty).
* Prompts from a `datasets` Dataset (a text column tokenized with the tokenizer, or an
  ``input_ids`` column), or from a plain list of texts / token-id lists.
* Output lengths: a fixed int, a ``(lo, hi)`` uniform range, or ``"data"`` (the token length of a
  reference column, clipped to ``[lo, hi]``).
* SLO classes: a weighted mix of :class:`SLOClass` (TPOT / TTFT objectives in ms).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from adaspec_hf.slo import SLO


@dataclass(frozen=True)
class SLOClass:
    name: str
    tpot_ms: float | None = None
    ttft_ms: float | None = None
    weight: float = 1.0

    def slo(self) -> SLO | None:
        if self.tpot_ms is None and self.ttft_ms is None:
            return None
        return SLO(tpot_ms=self.tpot_ms, ttft_ms=self.ttft_ms)


@dataclass
class WorkloadRequest:
    index: int
    arrival: float  # seconds from the start of the run
    prompt_ids: list[int]
    max_new_tokens: int
    slo_class: str
    slo: SLO | None


@dataclass
class Workload:
    requests: list[WorkloadRequest]
    rate: float
    arrival: str
    seed: int
    config: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def duration(self) -> float:
        return self.requests[-1].arrival if self.requests else 0.0

    def summary(self) -> dict:
        arr = np.asarray([r.arrival for r in self.requests])
        gaps = np.diff(arr) if len(arr) > 1 else np.zeros(0)
        return {
            "requests": len(self.requests), "rate": self.rate, "arrival": self.arrival, "seed": self.seed,
            "observed_rate": float(len(gaps) / arr[-1]) if len(arr) > 1 and arr[-1] > 0 else None,
            "gap_cv": float(gaps.std() / gaps.mean()) if len(gaps) > 1 and gaps.mean() > 0 else None,
            "mean_prompt_tokens": float(np.mean([len(r.prompt_ids) for r in self.requests])) if self.requests else 0,
            "mean_max_new_tokens": float(np.mean([r.max_new_tokens for r in self.requests])) if self.requests else 0,
            "classes": {c: sum(r.slo_class == c for r in self.requests)
                        for c in dict.fromkeys(r.slo_class for r in self.requests)},
            **self.config,
        }


def arrival_times(rate: float, *, n: int | None = None, duration: float | None = None, process: str = "poisson",
                  cv: float = 2.0, seed: int = 0) -> np.ndarray:
    """Arrival times (seconds, increasing, first after a gap) of ``n`` requests and/or within ``duration``."""
    if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate must be a finite positive number of requests per second, got {rate!r}")
    if n is None and duration is None:
        raise ValueError("give n (requests) and/or duration (seconds)")
    if process not in ("poisson", "gamma"):
        raise ValueError(f"arrival process must be 'poisson' or 'gamma', got {process!r}")
    if process == "gamma" and not (math.isfinite(cv) and cv > 0):
        raise ValueError(f"gamma arrivals need a positive cv, got {cv!r}")
    rng = np.random.default_rng(seed)
    mean_gap = 1.0 / rate
    cap = n if n is not None else int(duration * rate * 2 + 50)
    out: list[float] = []
    t = 0.0
    while len(out) < cap:
        m = max(cap - len(out), 16)
        if process == "poisson":
            gaps = rng.exponential(mean_gap, size=m)
        else:
            shape = 1.0 / (cv * cv)
            gaps = rng.gamma(shape, mean_gap / shape, size=m)
        times = t + np.cumsum(gaps)
        t = float(times[-1])
        out.extend(times.tolist())
        if duration is not None and t > duration:
            break
    arr = np.asarray(out[:cap] if n is not None else out)
    if duration is not None:
        arr = arr[arr <= duration]
    if n is not None:
        arr = arr[:n]
    return arr


def _prompt_list(prompts: Any, tokenizer, column: str | None, max_prompt_tokens: int | None
                 ) -> tuple[list[list[int]], list[Any] | None]:
    """Token-id prompts and, when present, the per-prompt output-length source (reference)."""
    refs = None
    try:
        import datasets

        is_ds = isinstance(prompts, datasets.Dataset)
    except Exception:  # pragma: no cover
        is_ds = False
    if is_ds:
        cols = prompts.column_names
        if "input_ids" in cols and (column is None or column == "input_ids"):
            items = list(prompts["input_ids"])
        else:
            col = column or ("prompt" if "prompt" in cols else "text")
            if col not in cols:
                raise ValueError(f"dataset has no column {col!r} (columns: {cols})")
            items = list(prompts[col])
        for rc in ("output_len", "max_new_tokens", "reference"):
            if rc in cols:
                refs = list(prompts[rc])
                break
    else:
        items = list(prompts)
    ids: list[list[int]] = []
    for it in items:
        if isinstance(it, str):
            if tokenizer is None:
                raise ValueError("text prompts need a tokenizer")
            it = tokenizer(it, add_special_tokens=False)["input_ids"]
        it = [int(x) for x in it]
        if max_prompt_tokens is not None:
            it = it[-max_prompt_tokens:]
        if not it:
            raise ValueError("empty prompt in the workload data")
        ids.append(it)
    if not ids:
        raise ValueError("no prompts")
    return ids, refs


def _out_len(spec, ref, tokenizer, rng: np.random.Generator, lo: int, hi: int) -> int:
    if isinstance(spec, int):
        return spec
    if spec == "data":
        if ref is None:
            n = int(rng.integers(lo, hi + 1))
        elif isinstance(ref, str):
            if tokenizer is None:
                raise ValueError("output lengths from reference text need a tokenizer")
            n = len(tokenizer(ref, add_special_tokens=False)["input_ids"])
        else:
            n = int(ref)
        return int(min(max(n, lo), hi))
    return int(rng.integers(lo, hi + 1))


def make_workload(
    prompts: Any,
    rate: float,
    *,
    n_requests: int | None = None,
    duration: float | None = None,
    arrival: str = "poisson",
    cv: float = 2.0,
    slo_classes: Sequence[SLOClass] = (SLOClass("best-effort"),),
    output_len: "int | tuple[int, int] | str" = (16, 64),
    tokenizer=None,
    column: str | None = None,
    max_prompt_tokens: int | None = None,
    seed: int = 0,
) -> Workload:
    """A seeded workload: arrivals at ``rate`` req/s, prompts drawn (with replacement, shuffled) from
    ``prompts``, output lengths per ``output_len`` and an SLO class per request by ``weight``."""
    ids, refs = _prompt_list(prompts, tokenizer, column, max_prompt_tokens)
    if isinstance(output_len, tuple):
        lo, hi = int(output_len[0]), int(output_len[1])
        spec: Any = "range"
    elif output_len == "data":
        lo, hi, spec = 16, 64, "data"
    elif isinstance(output_len, int) and output_len >= 1:
        lo = hi = output_len
        spec = output_len
    else:
        raise ValueError(f"output_len must be an int, (lo, hi) or 'data', got {output_len!r}")
    if spec == "data" or isinstance(output_len, tuple):
        if not 1 <= lo <= hi:
            raise ValueError(f"output length range must satisfy 1 <= lo <= hi, got {(lo, hi)}")
    classes = list(slo_classes)
    if not classes:
        raise ValueError("at least one SLO class")
    w = np.asarray([c.weight for c in classes], dtype=float)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError("SLO class weights must be >= 0 and not all 0")
    times = arrival_times(rate, n=n_requests, duration=duration, process=arrival, cv=cv, seed=seed)
    rng = np.random.default_rng([seed, 1])
    pick = rng.integers(0, len(ids), size=len(times))
    cls = rng.choice(len(classes), size=len(times), p=w / w.sum())
    reqs = []
    for i, (t, j, c) in enumerate(zip(times.tolist(), pick.tolist(), cls.tolist())):
        ref = refs[j] if refs is not None else None
        n_out = _out_len(spec, ref, tokenizer, rng, lo, hi)
        reqs.append(WorkloadRequest(i, float(t), ids[j], n_out, classes[c].name, classes[c].slo()))
    config = {"output_len": output_len if not isinstance(output_len, tuple) else list(output_len),
              "cv": cv if arrival == "gamma" else None, "slo_classes": [asdict(c) for c in classes]}
    return Workload(reqs, float(rate), arrival, seed, config)
