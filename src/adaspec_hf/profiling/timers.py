"""Timing one forward of a model the way a speculative step runs it.

How one grid point is timed: a cache of ``context`` tokens is already present (a one-row cache is
prefilled once per context from random token ids, then repeated to ``rows`` rows); the timed call is
one forward of ``tokens`` new tokens per row with explicit ``position_ids`` and a 4-D float additive
mask (0 visible / dtype-min masked) -- exactly the shape of a verify or draft step -- after which the
cache is cropped back to ``context``. Median of ``repeats`` after one warm-up; the token counts of one
(rows, context) take turns (:meth:`ModelTimer.time_many`).
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import Any, Callable, Sequence

import torch

from adaspec_hf.compat import cache_kwargs, forward_parameters, new_cache

MIN_POINT_TIME_S = 0.03  # cheap points get more runs until their timed runs add up to this: robust medians
MAX_REPEAT_FACTOR = 5    # ... but at most this many times ``repeats``
OVERHEAD_TOP_K = 4       # draft candidates per position in the stand-in step (a typical tree's branching)
OVERHEAD_HOLES = 0.1     # share of cache positions masked out in the stand-in step (finished rows' holes)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work: a timer must not stop before the work it times is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu":
        mod = getattr(torch, device.type, None)
        if mod is not None and hasattr(mod, "synchronize"):
            mod.synchronize()


def _text_config(model: torch.nn.Module) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


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


class ModelTimer:
    """Times forwards of one model on caches of given (rows, context); keeps one-row prefills."""

    def __init__(self, model: torch.nn.Module, repeats: int, seed: int = 0,
                 min_time_s: float = MIN_POINT_TIME_S) -> None:
        self.model = model
        self.min_time_s = min_time_s
        p = next(model.parameters())
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

    def time(self, rows: int, tokens: int, context: int) -> float:
        return self.time_many(rows, [tokens], context)[0]

    @torch.inference_mode()
    def time_many(self, rows: int, tokens: Sequence[int], context: int) -> list[float]:
        """Median seconds of one forward for each of ``tokens`` (query tokens per row), on one cache.

        The token counts take turns (a warm-up round, then ``repeats`` rounds; cheap points go on
        taking turns while their runs add up to < ``min_time_s``), so that a CPU's drift over seconds
        moves the whole curve, not one point of it: the planner's choices hinge on how the cost
        grows with tokens. Timed one after the other, the built-in pair's profile put a 12-token
        verify (1 row, context 64) at 1.09x a 1-token one, where a separate turn-taking
        measurement gave 1.51x; with turns, the profile says 1.55x, and its held-out point error
        fell from 8.4% to 3.0%."""
        cache = self.cache_for(rows, context)
        feeds = []
        for t in tokens:
            feeds.append((self._ids(rows, t),
                          torch.arange(context, context + t, device=self.device).expand(rows, t),
                          causal_float_mask(rows, t, context, self.dtype, self.device)))
        times: list[list[float]] = [[] for _ in tokens]

        def wanted(j: int) -> bool:  # `repeats` runs, more while they add up to < min_time_s
            n = len(times[j])
            return n < self.repeats or (sum(times[j]) < self.min_time_s and n < MAX_REPEAT_FACTOR * self.repeats)

        rnd = 0  # round 0 is a warm-up of every point
        while True:
            order = [j for j in range(len(tokens)) if rnd == 0 or wanted(j)]
            if not order:
                break
            for j in (order if rnd % 2 else order[::-1]):
                ids, pos, mask = feeds[j]
                sync(self.device)
                t0 = time.perf_counter()
                out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                                 **cache_kwargs(self.model, cache))
                sync(self.device)
                dt = time.perf_counter() - t0
                del out
                _crop(cache, context)
                if rnd:
                    times[j].append(dt)
            rnd += 1
        return [float(statistics.median(x)) for x in times]

    def drop_cache(self) -> None:
        """Free the current (rows, context) cache; the one-row prefills stay."""
        self._cache = None

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
    p = next(target.parameters())
    device, dtype = p.device, p.dtype
    vocab = int(_text_config(target).vocab_size)
    gen = torch.Generator().manual_seed(1)
    t_logits = torch.randn(rows, tokens, vocab, generator=gen).to(device, dtype)
    d_logits = torch.randn(rows, 1, vocab, generator=gen).to(device, dtype)
    holes = torch.rand(rows, context, generator=gen).to(device) > OVERHEAD_HOLES
    drafted = torch.randint(0, vocab, (rows, tokens), generator=gen).to(device)
    seq = torch.randint(0, vocab, (rows, context), generator=gen).to(device)
    tree = torch.ones(tokens, tokens, dtype=torch.bool, device=device).tril()
    neg = torch.finfo(dtype).min

    @torch.inference_mode()
    def step_ops() -> float:
        sync(device)
        t0 = time.perf_counter()
        vis = torch.cat([holes[:, None, None, :].expand(rows, 1, tokens, context), tree.expand(rows, 1, tokens, tokens)], -1)
        mask = torch.zeros(vis.shape, dtype=dtype, device=device).masked_fill_(~vis, neg)
        probs = torch.softmax(d_logits.float(), -1)
        top_p, top_i = probs.topk(OVERHEAD_TOP_K, dim=-1)
        greedy = t_logits.argmax(-1)
        ok = (greedy[:, :-1] == drafted[:, 1:]).long().cumprod(-1)
        n_acc = ok.sum(-1)
        new = torch.cat([seq, greedy.gather(1, n_acc[:, None])], 1)
        pos = holes.sum(-1, keepdim=True) + torch.arange(tokens, device=device)
        del mask, top_p, top_i, new, pos
        sync(device)
        return time.perf_counter() - t0

    return step_ops
