"""Soak: a few hundred requests from several threads (greedy and seeded sampling, EOS, stop
strings, cancellations, streaming) against an engine whose cache surgery, forwards and tokenizer
fail at random. Every handle resolves, each failure stays its request's, greedy outputs are the
target's own, seeded samples repeat, the cache bound holds, and nothing is left behind. Runs in
well under a minute on CI (tiny random models); no wall-clock assertions."""
from __future__ import annotations

import random
import threading

import pytest
import torch

from adaspec_hf import SLO, Engine
from adaspec_hf.core.kv import KVState

from conftest import char_tokenizer, pair
from test_serving import AlwaysBehind, confident_draft, make_prompts, reference, synthetic_latency

N_CLIENTS, PER_CLIENT = 4, 40
FAULT_RATE = 0.02  # per cache operation / forward / decode
MAX_CACHED = 100  # binding: 4 rows of the longest request (30 slots) would not fit
WAIT_S = 120  # bounds a hang only


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest


class Faults:
    """Random, seeded faults in KVState's surgery and forwards and in the tokenizer's decode;
    also records the peak cache slots of each model."""

    def __init__(self, monkeypatch, target, seed: int):
        self.rng = random.Random(seed)
        self.on = True
        self.raised: dict[str, int] = {}
        self.peak = {"target": 0, "draft": 0}
        self.target = target
        for name in ("append_rows", "select_rows", "compact", "forward", "prefill"):
            self._wrap(monkeypatch, name)

    def _wrap(self, monkeypatch, name):
        orig = getattr(KVState, name)

        def wrapper(kv, *args, **kwargs):
            if self.on and self.rng.random() < FAULT_RATE:
                self.raised[name] = self.raised.get(name, 0) + 1
                raise torch.OutOfMemoryError(f"injected in KVState.{name}")
            out = orig(kv, *args, **kwargs)
            key = "target" if kv.model is self.target else "draft"
            self.peak[key] = max(self.peak[key], kv.rows * kv.length)
            return out
        monkeypatch.setattr(KVState, name, wrapper)

    def tokenizer(self, tok):
        faults = self

        class Flaky:
            clean_up_tokenization_spaces = False

            def __call__(self, *a, **k):
                return tok(*a, **k)

            def __getattr__(self, name):  # vocabulary access for HF's stop-string criterion
                return getattr(tok, name)

            def decode(self, ids, **k):
                if faults.on and faults.rng.random() < FAULT_RATE / 4:
                    faults.raised["decode"] = faults.raised.get("decode", 0) + 1
                    raise IndexError("injected: piece id out of range")
                return tok.decode(ids, **k)
        return Flaky()


def test_soak_with_random_faults(monkeypatch):
    target, _ = pair("llama")
    draft = confident_draft()
    prompts = make_prompts(6, 50)
    chars = char_tokenizer()
    refs = {(i, n): reference(p, n) for i, p in enumerate(prompts) for n in (4, 9, 16)}
    faults = Faults(monkeypatch, target, seed=7)
    policy = AlwaysBehind(synthetic_latency(), tree=True, max_depth=4)
    engine = Engine(target, draft, faults.tokenizer(chars), policy=policy, max_rows=4,
                    max_cached_tokens=MAX_CACHED, seed=0)
    submitted, lock, client_errors = [], threading.Lock(), []
    streams: dict[int, list[int]] = {}

    def client(k: int):
        try:
            _client(k)
        except Exception as e:  # noqa: BLE001 - reported below
            client_errors.append(e)

    def _client(k: int):
        rng = random.Random(100 + k)
        for _ in range(PER_CLIENT):
            i, n = rng.randrange(len(prompts)), rng.choice((4, 9, 16))
            kind = rng.choice(("greedy", "greedy", "sampled", "stop"))
            kw = dict(max_new_tokens=n, slo=rng.choice((None, SLO(tpot_ms=0.01), SLO(ttft_ms=1e5))))
            if kind == "sampled":
                kw.update(do_sample=True, temperature=1.1, seed=rng.randrange(3))
            elif kind == "stop":
                ref = refs[(i, n)]
                kw.update(stop=[chars.decode([ref[min(n // 2, len(ref) - 1)]]) or "never"])
            h = engine.submit(prompts[i], **kw)
            with lock:
                submitted.append((h, i, n, kind, kw.get("seed")))
            r = rng.random()
            if r < 0.1:
                h.cancel()
            elif r < 0.4:  # stream it here
                streams[h.request_id] = [t for c in _chunks(h) for t in c.token_ids]

    threads = [threading.Thread(target=client, args=(k,)) for k in range(N_CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert not client_errors, client_errors
    results = [(h.exception(timeout=WAIT_S), h, i, n, kind, seed) for h, i, n, kind, seed in submitted]
    samples: dict[tuple, list[int]] = {}
    counts: dict[str, int] = {}
    for err, h, i, n, kind, seed in results:
        res = h._result
        counts[res.finish_reason] = counts.get(res.finish_reason, 0) + 1
        if err is not None:
            assert isinstance(err, (torch.OutOfMemoryError, IndexError)), repr(err)
            continue
        if h.request_id in streams:
            assert streams[h.request_id] == res.token_ids  # streamed exactly once, in order
        ref = refs[(i, n)]
        if kind == "greedy":
            want = ref if res.finish_reason != "cancelled" else ref[: len(res.token_ids)]
            assert res.token_ids == want
        elif kind == "stop":
            assert res.token_ids == ref[: len(res.token_ids)]
            assert res.finish_reason in ("stop", "cancelled") or res.token_ids == ref
        elif res.finish_reason in ("length", "eos"):
            got = samples.setdefault((i, n, seed), res.token_ids)
            assert got == res.token_ids  # a seeded sample repeats whatever the batch and the faults
    assert len({h.request_id for h, *_ in submitted}) == N_CLIENTS * PER_CLIENT
    assert sum(counts.get(k, 0) for k in ("length", "eos", "stop")) > N_CLIENTS * PER_CLIENT // 2  # ran to their end
    assert sum(faults.raised.values()) > 5 and len(faults.raised) >= 4, faults.raised
    assert faults.peak["target"] <= MAX_CACHED and faults.peak["draft"] <= MAX_CACHED, faults.peak
    faults.on = False
    assert engine.generate(prompts[0], max_new_tokens=9).token_ids == refs[(0, 9)]  # still serving
    engine.close(timeout=WAIT_S)
    assert not engine._thread.is_alive() and engine.running == 0 and engine.queued == 0
    assert not policy.alpha and not policy.first_value  # per-request planner state dropped
    assert engine.stats.new_tokens >= sum(len(h._result.token_ids) for _, h, *_ in results if h._result.error is None)


def _chunks(h):
    try:
        yield from h
    except (torch.OutOfMemoryError, IndexError):
        return
