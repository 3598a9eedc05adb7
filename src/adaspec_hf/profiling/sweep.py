"""The latency sweep: which grid points of a pair are measured, in which order, and when to stop.

Why a grid and not a formula: the efficiency model (docs/design.md, "The efficiency model") needs the
forward time of each model as a function of rows in the batch x query tokens per row x context length,
plus the fixed per-step overhead. These costs are hardware-specific and not smooth (on CPU a 2-token
verify can cost more than an 8-token one), so we measure a grid once, cache it
(:mod:`adaspec_hf.profiling.store`), and let :class:`adaspec_hf.efficiency.latency.LatencyModel`
interpolate it.
"""
from __future__ import annotations

import logging
import os
import statistics
import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from adaspec_hf.efficiency.latency import RooflineFit
from adaspec_hf.machine import is_busy, load_average
from adaspec_hf.profiling.store import Profile, key_hash, load_profile, profile_key, save_profile
from adaspec_hf.compat import max_positions
from adaspec_hf.profiling.timers import ModelTimer, default_overhead_fn

logger = logging.getLogger("adaspec_hf.profiling")

# Default grid (the grid). The default sweep is made sparser by caps on rows * tokens and by a
# coarser token axis for the draft: large rows x tokens points are compute-bound (linear), which the
# roofline fit extrapolates well, while the small, irregular points are the ones worth measuring.
DEFAULT_ROWS = (1, 2, 4, 8, 16, 32)
DEFAULT_TOKENS = (1, 2, 3, 4, 6, 8, 12, 16)
DEFAULT_CONTEXTS = (64, 256, 1024)
DEFAULT_DRAFT_TOKENS = (1, 2, 4, 8, 16)
DEFAULT_MAX_BATCH_TOKENS = 256  # rows * tokens cap for the default (non-fine) sweep

FINE_ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
FINE_TOKENS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16)
FINE_CONTEXTS = (32, 64, 128, 256, 512, 1024, 2048)

# Quick profile taken automatically when none is cached: a few seconds, bounded by a time budget.
QUICK_ROWS = (1, 4, 16)
QUICK_TOKENS = (1, 2, 4, 8)
QUICK_CONTEXTS = (64, 512)
QUICK_REPEATS = 2
QUICK_BUDGET_S = 8.0

Point = tuple[int, int, int]  # (rows, tokens per row, context)



MIN_REPAIR_POINTS = 5  # fewer measured points than this: no fit worth judging outliers against
ROOFLINE_TERMS = 4     # the reference fit needs at least as many points as it has terms
GROSS_OUTLIER = 2.0    # points this far above the median ratio to the fit are left out of the reference fit


def _busy_warning() -> float | None:
    """Warn when other processes load the CPU: timings taken now will be inflated and noisy."""
    load = load_average()
    if is_busy(load):
        logger.warning("the machine is busy (load average %.1f on %d CPUs): the latency profile will be "
                       "noisy; re-run `adaspec-hf profile` when it is idle", load, os.cpu_count() or 1)
    return load


def _repair_outliers(results: dict[str, list[list[float]]], timers: dict[str, ModelTimer],
                     budget_s: float | None, threshold: float = 1.75, max_share: float = 0.25) -> int:
    """Re-measure points far above a roofline fit of the rest; keep the lower median. Returns the count.

    Interference from other processes only ever adds time, so of two medians the lower is the better
    estimate. Real kinks (a 2-token forward slower than an 8-token one) survive: they re-measure the same.
    """
    t0 = time.perf_counter()
    done = 0
    for which, pts in results.items():
        if len(pts) < MIN_REPAIR_POINTS:
            continue
        P = np.asarray(pts, dtype=float)
        ratio = P[:, 3] / RooflineFit.fit(P)(P[:, 0], P[:, 1], P[:, 2])
        keep = ratio <= GROSS_OUTLIER * np.median(ratio)  # drop gross outliers from the reference fit
        if keep.sum() >= ROOFLINE_TERMS:
            ratio = P[:, 3] / RooflineFit.fit(P[keep])(P[:, 0], P[:, 1], P[:, 2])
        bad = [i for i in np.argsort(-ratio) if ratio[i] > threshold][: max(1, int(max_share * len(pts)))]
        for i in sorted(bad, key=lambda i: (pts[i][0] * pts[i][2], pts[i][0])):  # group (rows, ctx) caches
            if budget_s is not None and time.perf_counter() - t0 > budget_s:
                return done
            r, t, c = (int(x) for x in pts[i][:3])
            pts[i][3] = min(pts[i][3], timers[which].time(r, t, c))
            done += 1
        timers[which].drop_cache()
    if done:
        logger.info("latency profile: re-measured %d points that looked disturbed", done)
    return done


def _grid(rows: Iterable[int], tokens: Iterable[int], contexts: Iterable[int], cap: int | None) -> list[Point]:
    pts = []
    for r in sorted(set(int(x) for x in rows)):
        for c in sorted(set(int(x) for x in contexts)):
            for t in sorted(set(int(x) for x in tokens)):
                if cap is None or r * t <= cap or t == min(tokens):
                    pts.append((r, t, c))
    return pts


def profile(
    target: torch.nn.Module,
    draft: torch.nn.Module | None,
    *,
    rows: Sequence[int] = DEFAULT_ROWS,
    tokens: Sequence[int] = DEFAULT_TOKENS,
    contexts: Sequence[int] = DEFAULT_CONTEXTS,
    repeats: int = 3,
    progress: bool = True,
    fine: bool = False,
    time_budget_s: float | None = None,
    overhead_fn: Callable[[], float] | None = None,
    draft_tokens: Sequence[int] | None = None,
    max_batch_tokens: int | None = None,
    repair: bool = True,
    seed: int = 0,
) -> Profile:
    """Measure forward latency of target and draft on a rows x tokens x context grid.

    Default (``fine=False``): the given grid for the target, capped at ``rows*tokens <= 256``
    (``max_batch_tokens``), and the draft on tokens ``(1, 2, 4, 8, 16)`` (``draft_tokens``), since
    draft forwards are cheap and smooth. ``fine=True`` replaces default axes by denser ones
    (``FINE_*``) with no cap. Groups of points are measured cheapest first; with ``time_budget_s``
    the remaining (largest) ones are skipped once the budget is spent and later extrapolated.
    With ``repair``, points far above a roofline fit of the others (typically hit by another process)
    are measured once more and the lower median kept. The result is not saved; see
    :func:`save_profile` / :func:`load_or_profile`.
    """
    t_start = time.perf_counter()
    load = _busy_warning()
    if fine:
        rows = FINE_ROWS if tuple(rows) == DEFAULT_ROWS else rows
        tokens = FINE_TOKENS if tuple(tokens) == DEFAULT_TOKENS else tokens
        contexts = FINE_CONTEXTS if tuple(contexts) == DEFAULT_CONTEXTS else contexts
    if draft_tokens is None:
        draft_tokens = DEFAULT_DRAFT_TOKENS if (not fine and tuple(tokens) == DEFAULT_TOKENS) else tokens
    if max_batch_tokens is None and not fine and tuple(rows) == DEFAULT_ROWS and tuple(tokens) == DEFAULT_TOKENS:
        max_batch_tokens = DEFAULT_MAX_BATCH_TOKENS

    # Clamp contexts that would run past an absolute-position model's table (e.g. GPT-2's 1024).
    limits = [m for m in (max_positions(target), max_positions(draft) if draft is not None else None) if m]
    limit = min(limits) if limits else None
    max_tok = max(max(tokens), max(draft_tokens))
    ctxs = sorted(set(int(c) for c in contexts))
    if limit is not None and any(c + max_tok > limit for c in ctxs):
        kept = sorted({max(1, min(c, limit - max_tok)) for c in ctxs})
        logger.info("contexts %s exceed the models' %d positions; profiling %s", ctxs, limit, kept)
        ctxs = kept

    plan: dict[str, list[Point]] = {
        "target": _grid(rows, tokens, ctxs, max_batch_tokens),
        "draft": _grid(rows, draft_tokens, ctxs, max_batch_tokens) if draft is not None else [],
    }
    timers = {"target": ModelTimer(target, repeats, seed)}
    if draft is not None:  # None: prompt lookup alone, no draft forwards to time
        timers["draft"] = ModelTimer(draft, repeats, seed + 1)
    groups: dict[tuple[int, int], list[tuple[str, int]]] = {}
    for which, pts in plan.items():
        for r, t, c in pts:
            groups.setdefault((r, c), []).append((which, t))
    order = sorted(groups, key=lambda rc: (rc[0] * rc[1], rc[0]))

    results: dict[str, list[list[float]]] = {"target": [], "draft": []}
    skipped: list[list[Any]] = []
    total = sum(len(v) for v in plan.values())
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="profiling latency", unit="pt", leave=False)
    try:
        for r, c in order:
            items = sorted(groups[(r, c)], key=lambda wt: (wt[1], wt[0] != "target"))
            # the budget never skips a model's first group: every model needs at least one point
            over = (time_budget_s is not None and time.perf_counter() - t_start > time_budget_s
                    and all(results[w] or not plan[w] for w in results))
            if over:
                skipped += [[w, r, t, c] for w, t in items]
                if bar is not None:
                    bar.update(len(items))
                continue
            for which in ("target", "draft"):
                ts = [t for w, t in items if w == which]
                if not ts:
                    continue
                if bar is not None:
                    bar.set_postfix_str(f"{which} rows={r} tokens={ts[0]}..{ts[-1]} ctx={c}")
                for t, sec in zip(ts, timers[which].time_many(r, ts, c)):  # token counts take turns
                    results[which].append([r, t, c, sec])
                if bar is not None:
                    bar.update(len(ts))
            for tm in timers.values():
                tm.drop_cache()
        remeasured = 0
        if repair:
            left = None if time_budget_s is None else time_budget_s - (time.perf_counter() - t_start)
            remeasured = _repair_outliers(results, timers, left)
    finally:
        if bar is not None:
            bar.close()
        for tm in timers.values():
            tm.release()
    if skipped:
        logger.info("latency profile: time budget %.1f s spent; %d of %d points left to extrapolation",
                    time_budget_s, len(skipped), total)

    fn = overhead_fn if overhead_fn is not None else default_overhead_fn(target, draft)
    fn()  # warm-up
    overhead = float(statistics.median(fn() for _ in range(max(3, repeats))))

    meta = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "duration_s": round(time.perf_counter() - t_start, 3),
        "repeats": repeats,
        "fine": fine,
        "quick": False,
        "grid": {"rows": sorted(set(rows)), "tokens": sorted(set(tokens)), "draft_tokens": sorted(set(draft_tokens)),
                 "contexts": ctxs, "max_batch_tokens": max_batch_tokens},
        "skipped": skipped,
        "remeasured": remeasured,
        "load_average_at_start": load,
        "overhead_source": "overhead_fn" if overhead_fn is not None else "default_overhead_fn",
    }
    return Profile(key=profile_key(target, draft), target=results["target"], draft=results["draft"],
                   overhead=overhead, meta=meta)


_logged_quick: set[str] = set()


def load_or_profile(target: torch.nn.Module, draft: torch.nn.Module | None, *, quick: bool = True,
                    overhead_fn: Callable[[], float] | None = None, progress: bool = False) -> Profile:
    """The cached profile for this setup, or a new one (quick by default, a few seconds), saved."""
    prof = load_profile(target, draft)
    if prof is not None:
        return prof
    key = profile_key(target, draft)
    if quick:
        tag = key_hash(key)
        if tag not in _logged_quick:
            _logged_quick.add(tag)
            logger.info(
                "no latency profile for %s / %s on %s; taking a quick one (~%d s); run "
                "`adaspec-hf profile --target %s --draft %s` for a full one",
                key["target"] or "<unnamed target>", key["draft"] or "<unnamed draft>", key["device_name"],
                round(QUICK_BUDGET_S), key["target"] or "ID", key["draft"] or "ID",
            )
        prof = profile(target, draft, rows=QUICK_ROWS, tokens=QUICK_TOKENS, contexts=QUICK_CONTEXTS,
                       draft_tokens=QUICK_TOKENS, repeats=QUICK_REPEATS, progress=progress,
                       time_budget_s=QUICK_BUDGET_S, overhead_fn=overhead_fn)
        prof.meta["quick"] = True
    else:
        prof = profile(target, draft, progress=progress, overhead_fn=overhead_fn)
    try:
        save_profile(prof)
    except OSError as e:  # a read-only home must not stop generation
        logger.warning("could not save latency profile: %s", e)
    return prof
