"""Forward cost of a target/draft pair: the quantity speculation trades on.

Speculative decoding only pays when a target forward costs many draft forwards; the pair build
measures that ratio to decide whether the target must be grown (:mod:`adaspec_hf.pair.growth`) and
records it as a quality gate.
"""
from __future__ import annotations

import statistics
import time

import torch

from adaspec_hf.compat import cache_kwargs, output_cache

MIN_REPEATS = 10   # repeats always taken, even past ``max_seconds``: a median of fewer is noise
LOW_PERCENTILE = 10  # also reported: closer to the uncontended cost when other processes share the CPU


@torch.inference_mode()
def measure_cost(target, draft, context_ids: torch.Tensor, repeats: int = 40, warmup: int = 5,
                 max_seconds: float = 20.0) -> dict:
    """Median forward time (ms) of each model for 1 new token on top of a KV cache of
    ``context_ids`` (batch 1); target and draft calls are interleaved so that machine-speed drift
    affects both alike. Stops early (after at least 10 repeats) when ``max_seconds`` are spent."""
    ctx = context_ids.shape[-1]
    state = {}
    for name, m in (("target", target), ("draft", draft)):
        m.eval()
        out = m(input_ids=context_ids, use_cache=True)
        state[name] = (m, output_cache(out))
    nxt = context_ids[:, -1:]
    times = {"target": [], "draft": []}
    t_end = time.perf_counter() + max_seconds
    for r in range(warmup + repeats):
        if r >= warmup + MIN_REPEATS and time.perf_counter() > t_end:
            break
        for name in ("target", "draft"):
            m, cache = state[name]
            t0 = time.perf_counter()
            m(input_ids=nxt, **cache_kwargs(m, cache))
            dt = time.perf_counter() - t0
            cache.crop(-1)  # back to the context length (negative: tokens to remove)
            if r >= warmup:
                times[name].append(dt * 1e3)
    t_ms, d_ms = statistics.median(times["target"]), statistics.median(times["draft"])
    t10, d10 = (sorted(times[k])[len(times[k]) * LOW_PERCENTILE // 100] for k in ("target", "draft"))
    return {"context": ctx, "repeats": len(times["target"]), "target_ms": round(t_ms, 4), "draft_ms": round(d_ms, 4),
            "ratio": round(t_ms / d_ms, 3), "target_ms_p10": round(t10, 4), "draft_ms_p10": round(d10, 4),
            "ratio_p10": round(t10 / d10, 3)}
