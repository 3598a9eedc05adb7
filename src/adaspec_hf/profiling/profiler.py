"""Latency profiling of a target/draft pair on the device and dtype they actually run on.

Why: the efficiency model (docs/design.md, "The efficiency model") needs the forward time of each model as a
function of rows in the batch x query tokens per row x context length, plus the fixed per-step
overhead. These costs are hardware-specific and not smooth (on CPU a 2-token verify can cost more
than an 8-token one), so we measure a grid once, cache it as JSON keyed by everything that changes
timings, and let :class:`adaspec_hf.efficiency.latency.LatencyModel` interpolate it.

How one grid point is timed: a cache of ``context`` tokens is already present (a one-row cache is
prefilled once per context from random token ids, then repeated to ``rows`` rows); the timed call is
one forward of ``tokens`` new tokens per row with explicit ``position_ids`` and a 4-D float additive
mask (0 visible / dtype-min masked) -- exactly the shape of a verify or draft step -- after which the
cache is cropped back to ``context``. Median of ``repeats`` after one warm-up.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from adaspec_hf.compat import cache_kwargs, forward_parameters, new_cache
from adaspec_hf.machine import is_busy, load_average

logger = logging.getLogger(__name__)

PROFILE_FORMAT = 1

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


# ----------------------------------------------------------------------------------------------
# Profile data
# ----------------------------------------------------------------------------------------------
@dataclass
class Profile:
    """Measured forward times of a target/draft pair, plus the key that says where they are valid.

    ``target`` and ``draft`` are lists of ``[rows, tokens_per_row, context, seconds]``.
    """

    key: dict[str, Any]
    target: list[list[float]]
    draft: list[list[float]]
    overhead: float
    meta: dict[str, Any] = field(default_factory=dict)

    def points(self, which: str) -> list[list[float]]:
        """The measured points of ``"target"`` or ``"draft"``."""
        if which not in ("target", "draft"):
            raise ValueError(f"which must be 'target' or 'draft', not {which!r}")
        return self.target if which == "target" else self.draft

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Profile":
        data = json.loads(text)
        return cls(
            key=dict(data["key"]),
            target=[list(map(float, p)) for p in data["target"]],
            draft=[list(map(float, p)) for p in data["draft"]],
            overhead=float(data["overhead"]),
            meta=dict(data.get("meta", {})),
        )

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
        tmp.write_text(self.to_json())
        tmp.replace(path)  # atomic: concurrent readers never see half a file
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Profile":
        return cls.from_json(Path(path).read_text())


# ----------------------------------------------------------------------------------------------
# Keying
# ----------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """``$ADASPEC_HF_CACHE`` or ``~/.cache/adaspec_hf``."""
    env = os.environ.get("ADASPEC_HF_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "adaspec_hf"


def _param(model: torch.nn.Module) -> torch.Tensor:
    return next(model.parameters())


def _model_name(model: torch.nn.Module) -> str:
    name = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    return str(name or "")


_VOLATILE_CONFIG_KEYS = {"_name_or_path", "name_or_path", "transformers_version", "_commit_hash", "dtype", "torch_dtype"}


def config_hash(model: torch.nn.Module) -> str:
    """Hash of the model config (minus fields that do not change timings, such as its path)."""
    cfg = model.config.to_dict()
    cfg = {k: v for k, v in cfg.items() if k not in _VOLATILE_CONFIG_KEYS}
    text = json.dumps(cfg, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def device_name(device: torch.device) -> str:
    """A human-readable name of the hardware: the GPU's name, or the CPU model."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine() or "cpu"
    return device.type


def _attn_impl(model: torch.nn.Module) -> str:
    return str(getattr(model.config, "_attn_implementation", None) or "")


def profile_key(target: torch.nn.Module, draft: torch.nn.Module) -> dict[str, Any]:
    """Everything a latency profile depends on. A profile is used only if its key is equal."""
    import transformers

    from adaspec_hf import __version__

    tp, dp = _param(target), _param(draft)
    return {
        "format": PROFILE_FORMAT,
        "target": _model_name(target),
        "target_config": config_hash(target),
        "target_dtype": str(tp.dtype).replace("torch.", ""),
        "target_attn": _attn_impl(target),
        "draft": _model_name(draft),
        "draft_config": config_hash(draft),
        "draft_dtype": str(dp.dtype).replace("torch.", ""),
        "draft_attn": _attn_impl(draft),
        "device": str(tp.device.type),
        "draft_device": str(dp.device.type),
        "device_name": device_name(tp.device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "adaspec_hf": __version__,
        "threads": torch.get_num_threads(),
    }


def _key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.")
    return s[-48:] if s else "unnamed"


def profile_path(key: dict[str, Any]) -> Path:
    """Where the profile for ``key`` lives: ``<cache>/profiles/<target>--<draft>--<keyhash>.json``."""
    stem = f"{_slug(str(key.get('target', '')))}--{_slug(str(key.get('draft', '')))}"
    return cache_dir() / "profiles" / f"{stem}--{_key_hash(key)}.json"


def key_diff(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Human-readable differences between a stored key and the current one."""
    out = []
    for k in sorted(set(stored) | set(wanted)):
        if stored.get(k) != wanted.get(k):
            out.append(f"{k}: {stored.get(k)!r} (profile) != {wanted.get(k)!r} (now)")
    return out


def save_profile(prof: Profile, path: str | os.PathLike | None = None) -> Path:
    """Save under the cache dir (or ``path``); returns the path written."""
    return prof.save(path if path is not None else profile_path(prof.key))


def load_profile(
    target: torch.nn.Module, draft: torch.nn.Module, *, path: str | os.PathLike | None = None
) -> Profile | None:
    """The cached profile for exactly this pair and setup, or None.

    A profile whose key differs in anything (config, dtype, device, library versions, threads) is never
    used; we log why it was rejected so that a user who expects one to load can see what changed.
    """
    key = profile_key(target, draft)
    p = Path(path) if path is not None else profile_path(key)
    if p.exists():
        try:
            prof = Profile.load(p)
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("ignoring unreadable latency profile %s: %s", p, e)
            return None
        diff = key_diff(prof.key, key)
        if not diff:
            return prof
        logger.warning("ignoring latency profile %s, made for a different setup: %s", p, "; ".join(diff))
        return None
    # No exact match: explain any profile for the same pair that we are not using.
    stem = p.name.rsplit("--", 1)[0]
    for other in sorted(p.parent.glob(f"{glob_escape(stem)}--*.json")) if p.parent.exists() else []:
        try:
            diff = key_diff(Profile.load(other).key, key)
        except (OSError, ValueError, KeyError, TypeError) as e:
            diff = [f"unreadable ({e})"]
        logger.info("not using latency profile %s, made for a different setup: %s", other, "; ".join(diff))
    return None


def glob_escape(s: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", s)


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu":
        mod = getattr(torch, device.type, None)
        if mod is not None and hasattr(mod, "synchronize"):
            mod.synchronize()


def _text_config(model: torch.nn.Module) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _max_positions(model: torch.nn.Module) -> int | None:
    cfg = _text_config(model)
    for name in ("max_position_embeddings", "n_positions"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _crop(cache: Any, length: int) -> None:
    """Crop ``cache`` back to ``length`` tokens (transformers 5 wants a negative 'tokens to remove')."""
    remove = cache.get_seq_length() - length
    if remove > 0:
        cache.crop(-remove)


def causal_float_mask(rows: int, tokens: int, context: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(rows, 1, tokens, context + tokens) additive mask: the whole cache visible, causal among new tokens."""
    mask = torch.zeros(rows, 1, tokens, context + tokens, dtype=dtype, device=device)
    tri = torch.ones(tokens, tokens, dtype=torch.bool, device=device).triu(1)
    mask[..., context:].masked_fill_(tri, torch.finfo(dtype).min)
    return mask


class _ModelTimer:
    """Times forwards of one model on caches of given (rows, context); keeps one-row prefills."""

    def __init__(self, model: torch.nn.Module, repeats: int, seed: int = 0, min_time_s: float = 0.03) -> None:
        self.model = model
        self.min_time_s = min_time_s  # cheap points get more runs (up to 5x repeats): robust medians
        p = _param(model)
        self.device, self.dtype = p.device, p.dtype
        self.vocab = int(_text_config(model).vocab_size)
        self.repeats = max(1, int(repeats))
        self.gen = torch.Generator().manual_seed(seed)
        self._prefilled: dict[int, Any] = {}
        self._cache: tuple[tuple[int, int], Any] | None = None

    def _ids(self, rows: int, n: int) -> torch.Tensor:
        return torch.randint(0, self.vocab, (rows, n), generator=self.gen).to(self.device)

    @torch.inference_mode()
    def _prefill(self, context: int) -> Any:
        if context not in self._prefilled:
            cache = new_cache()
            ids = self._ids(1, context)
            extra = {"logits_to_keep": 1} if "logits_to_keep" in forward_parameters(self.model) else {}
            self.model(input_ids=ids, **cache_kwargs(self.model, cache), **extra)
            self._prefilled[context] = cache
        return self._prefilled[context]

    def cache_for(self, rows: int, context: int) -> Any:
        """A cache of ``rows`` rows x ``context`` tokens (the last one built is reused)."""
        if self._cache is None or self._cache[0] != (rows, context):
            self._cache = None  # free the previous one first
            cache = copy.deepcopy(self._prefill(context))
            if rows > 1:
                cache.batch_repeat_interleave(rows)
            self._cache = ((rows, context), cache)
        return self._cache[1]

    @torch.inference_mode()
    def time(self, rows: int, tokens: int, context: int) -> float:
        cache = self.cache_for(rows, context)
        ids = self._ids(rows, tokens)
        pos = torch.arange(context, context + tokens, device=self.device).expand(rows, tokens)
        mask = causal_float_mask(rows, tokens, context, self.dtype, self.device)
        times: list[float] = []
        i = 0
        # the first run is a warm-up; then `repeats` runs, more while they add up to < min_time_s
        while i <= self.repeats or (sum(times) < self.min_time_s and i <= 5 * self.repeats):
            _sync(self.device)
            t0 = time.perf_counter()
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, **cache_kwargs(self.model, cache))
            _sync(self.device)
            dt = time.perf_counter() - t0
            del out
            _crop(cache, context)
            if i:
                times.append(dt)
            i += 1
        return float(statistics.median(times))

    def release(self) -> None:
        self._cache = None
        self._prefilled.clear()


def default_overhead_fn(target: torch.nn.Module, draft: torch.nn.Module, rows: int = 4, tokens: int = 5,
                        context: int = 256) -> Callable[[], float]:
    """A stand-in for the engine's own per-step overhead: the tensor bookkeeping of one typical step.

    It times, on the models' device, what a step does besides the two forwards: build the 4-D float
    mask from a hole mask, softmax + top-k of draft logits, argmax of target logits, the greedy
    accept (compare, cumprod, sum), and appending tokens/positions. It does not include Python
    scheduling, so engines should pass their own ``overhead_fn`` (or correct it online).
    """
    p = _param(target)
    device, dtype = p.device, p.dtype
    vocab = int(_text_config(target).vocab_size)
    gen = torch.Generator().manual_seed(1)
    t_logits = torch.randn(rows, tokens, vocab, generator=gen).to(device, dtype)
    d_logits = torch.randn(rows, 1, vocab, generator=gen).to(device, dtype)
    holes = torch.rand(rows, context, generator=gen).to(device) > 0.1
    drafted = torch.randint(0, vocab, (rows, tokens), generator=gen).to(device)
    seq = torch.randint(0, vocab, (rows, context), generator=gen).to(device)
    tree = torch.ones(tokens, tokens, dtype=torch.bool, device=device).tril()
    neg = torch.finfo(dtype).min

    @torch.inference_mode()
    def step_ops() -> float:
        _sync(device)
        t0 = time.perf_counter()
        vis = torch.cat([holes[:, None, None, :].expand(rows, 1, tokens, context), tree.expand(rows, 1, tokens, tokens)], -1)
        mask = torch.zeros(vis.shape, dtype=dtype, device=device).masked_fill_(~vis, neg)
        probs = torch.softmax(d_logits.float(), -1)
        top_p, top_i = probs.topk(4, dim=-1)
        greedy = t_logits.argmax(-1)
        ok = (greedy[:, :-1] == drafted[:, 1:]).long().cumprod(-1)
        n_acc = ok.sum(-1)
        new = torch.cat([seq, greedy.gather(1, n_acc[:, None])], 1)
        pos = holes.sum(-1, keepdim=True) + torch.arange(tokens, device=device)
        del mask, top_p, top_i, new, pos
        _sync(device)
        return time.perf_counter() - t0

    return step_ops


def _busy_warning() -> float | None:
    """Warn when other processes load the CPU: timings taken now will be inflated and noisy."""
    load = load_average()
    if is_busy(load):
        logger.warning("the machine is busy (load average %.1f on %d CPUs): the latency profile will be "
                       "noisy; re-run `adaspec-hf profile` when it is idle", load, os.cpu_count() or 1)
    return load


def _repair_outliers(results: dict[str, list[list[float]]], timers: dict[str, "_ModelTimer"],
                     budget_s: float | None, threshold: float = 1.75, max_share: float = 0.25) -> int:
    """Re-measure points far above a roofline fit of the rest; keep the lower median. Returns the count.

    Interference from other processes only ever adds time, so of two medians the lower is the better
    estimate. Real kinks (a 2-token forward slower than an 8-token one) survive: they re-measure the same.
    """
    import numpy as np

    from adaspec_hf.efficiency.latency import RooflineFit

    t0 = time.perf_counter()
    done = 0
    for which, pts in results.items():
        if len(pts) < 5:
            continue
        P = np.asarray(pts, dtype=float)
        ratio = P[:, 3] / RooflineFit.fit(P)(P[:, 0], P[:, 1], P[:, 2])
        keep = ratio <= 2.0 * np.median(ratio)  # drop gross outliers from the reference fit
        if keep.sum() >= 4:
            ratio = P[:, 3] / RooflineFit.fit(P[keep])(P[:, 0], P[:, 1], P[:, 2])
        bad = [i for i in np.argsort(-ratio) if ratio[i] > threshold][: max(1, int(max_share * len(pts)))]
        for i in sorted(bad, key=lambda i: (pts[i][0] * pts[i][2], pts[i][0])):  # group (rows, ctx) caches
            if budget_s is not None and time.perf_counter() - t0 > budget_s:
                return done
            r, t, c = (int(x) for x in pts[i][:3])
            pts[i][3] = min(pts[i][3], timers[which].time(r, t, c))
            done += 1
        timers[which]._cache = None
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
    draft: torch.nn.Module,
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
    limits = [m for m in (_max_positions(target), _max_positions(draft)) if m]
    limit = min(limits) if limits else None
    max_tok = max(max(tokens), max(draft_tokens))
    ctxs = sorted(set(int(c) for c in contexts))
    if limit is not None and any(c + max_tok > limit for c in ctxs):
        kept = sorted({max(1, min(c, limit - max_tok)) for c in ctxs})
        logger.info("contexts %s exceed the models' %d positions; profiling %s", ctxs, limit, kept)
        ctxs = kept

    plan: dict[str, list[Point]] = {
        "target": _grid(rows, tokens, ctxs, max_batch_tokens),
        "draft": _grid(rows, draft_tokens, ctxs, max_batch_tokens),
    }
    timers = {"target": _ModelTimer(target, repeats, seed), "draft": _ModelTimer(draft, repeats, seed + 1)}
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
            for which, t in items:
                if bar is not None:
                    bar.set_postfix_str(f"{which} rows={r} tokens={t} ctx={c}")
                results[which].append([r, t, c, timers[which].time(r, t, c)])
                if bar is not None:
                    bar.update(1)
            for tm in timers.values():
                tm._cache = None
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


def load_or_profile(target: torch.nn.Module, draft: torch.nn.Module, *, quick: bool = True,
                    overhead_fn: Callable[[], float] | None = None, progress: bool = False) -> Profile:
    """The cached profile for this setup, or a new one (quick by default, a few seconds), saved."""
    prof = load_profile(target, draft)
    if prof is not None:
        return prof
    key = profile_key(target, draft)
    if quick:
        tag = _key_hash(key)
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


# ----------------------------------------------------------------------------------------------
# Reporting and CLI
# ----------------------------------------------------------------------------------------------
def format_table(prof: Profile) -> str:
    """Per model and context: a rows x tokens table of forward times in ms."""
    lines = []
    for which in ("target", "draft"):
        pts = prof.points(which)
        if not pts:
            continue
        toks = sorted({int(p[1]) for p in pts})
        for c in sorted({int(p[2]) for p in pts}):
            lines.append(f"{which} forward ms, context {c}   (rows \\ tokens per row)")
            lines.append("rows " + "".join(f"{t:>8d}" for t in toks))
            for r in sorted({int(p[0]) for p in pts}):
                vals = {int(p[1]): p[3] for p in pts if int(p[0]) == r and int(p[2]) == c}
                lines.append(f"{r:>4d} " + "".join(f"{vals[t] * 1e3:8.2f}" if t in vals else f"{'-':>8}" for t in toks))
            lines.append("")
    lines.append(f"fixed per-step overhead: {prof.overhead * 1e3:.3f} ms")
    return "\n".join(lines)


def plot_profile(prof: Profile, path: str | os.PathLike) -> Path:
    """PNG of measured latency vs the model's prediction (with held-out predictions)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from adaspec_hf.efficiency.latency import LatencyModel, holdout_predictions

    model = LatencyModel(prof)
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for row, which in enumerate(("target", "draft")):
        pts = np.asarray(prof.points(which), dtype=float)
        ax = axes[row, 0]
        if len(pts):
            ctxs = sorted(set(pts[:, 2]))
            c = ctxs[len(ctxs) // 2]
            tmax = pts[:, 1].max()
            tt = np.linspace(1, 1.5 * tmax, 200)
            fn = model.target_time if which == "target" else model.draft_time
            for i, r in enumerate(sorted(set(pts[:, 0]))):
                sel = (pts[:, 0] == r) & (pts[:, 2] == c)
                col = f"C{i % 10}"
                ax.plot(pts[sel, 1], pts[sel, 3] * 1e3, "o", color=col, label=f"rows={int(r)}")
                ax.plot(tt, [fn(int(r), t, c) * 1e3 for t in tt], "-", color=col, lw=1)
            ax.axvline(tmax, color="grey", ls=":", lw=1)
            ax.set_yscale("log")
        ax.set_title(f"{which}: context {int(c) if len(pts) else '-'} (dots measured, lines predicted)")
        ax.set_xlabel("query tokens per row")
        ax.set_ylabel("forward ms")
        ax.legend(fontsize=7)
        ax = axes[row, 1]
        meas, pred = holdout_predictions(prof, which)
        if len(meas):
            ax.loglog(meas * 1e3, pred * 1e3, ".", alpha=0.7)
            lo, hi = min(meas.min(), pred.min()) * 1e3, max(meas.max(), pred.max()) * 1e3
            ax.plot([lo, hi], [lo, hi], "k--", lw=1)
            mape = float(np.mean(np.abs(pred - meas) / meas)) * 100
            ax.set_title(f"{which}: held-out points, MAPE {mape:.1f}%")
        ax.set_xlabel("measured ms")
        ax.set_ylabel("predicted ms (point held out)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cli_profile(args: argparse.Namespace) -> int:
    from adaspec_hf.efficiency.latency import holdout_report
    from adaspec_hf.pair.build import load_models

    dtype = getattr(torch, args.dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    target, draft, _ = load_models(target=args.target, draft=args.draft, dtype=dtype, device=device)
    target.eval()
    draft.eval()
    kwargs: dict[str, Any] = {"fine": args.fine, "time_budget_s": args.time_budget}
    if args.repeats is not None:
        kwargs["repeats"] = args.repeats
    prof = profile(target, draft, **kwargs)
    path = save_profile(prof)
    print(format_table(prof))
    rep = holdout_report(prof)
    for which, d in rep.items():
        print(f"{which} held-out MAPE: " + ", ".join(f"{k} {v * 100:.1f}%" for k, v in d.items()))
    print(f"sweep took {prof.meta['duration_s']:.1f} s; saved {path}")
    if args.plot:
        print(f"plot: {plot_profile(prof, args.plot)}")
    return 0


def register_cli(subparsers: Any) -> None:
    """``adaspec-hf profile``: measure and cache a pair's latency profile."""
    p = subparsers.add_parser(
        "profile", help="measure a target/draft pair's forward latency and cache it",
        description="Measure the forward latency of a target/draft pair over rows x tokens x context on "
                    "this device and dtype, print it, and cache it (JSON) for the adaptive planner.")
    p.add_argument("--target", default=None, help="target model id or path (default: the built-in pair)")
    p.add_argument("--draft", default=None, help="draft model id or path (default: the built-in pair)")
    p.add_argument("--fine", action="store_true", help="denser grid (slower)")
    p.add_argument("--plot", default=None, metavar="PNG", help="write measured vs predicted latency to this PNG")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per point (median; default 3)")
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="stop measuring after S seconds and extrapolate the rest")
    p.set_defaults(func=_cli_profile)
