"""Serving engine: continuous batching, per-request losslessness, isolation of bad requests, shutdown,
streaming (sync and async), the SLO planner's phase 1. Tiny random models; no wall-clock assertions."""
from __future__ import annotations

import asyncio
import copy
import functools
import random
import threading

import pytest
import torch

import conftest
from transformers import LogitsProcessor, LogitsProcessorList

from adaspec_hf import SLO, Engine, EngineClosed, SLOPlanner
from adaspec_hf.efficiency.latency import LatencyModel
from adaspec_hf.policies import ShapeFunction, StaticChain, TreeShape
from adaspec_hf.policies import StepContext as ServingStepContext
from adaspec_hf.core.tree import DraftTree

from conftest import VOCAB, pair


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest


def make_prompts(n: int, seed: int, lo: int = 2, hi: int = 14) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


_REF: dict = {}


def reference(ids: list[int], n: int, **kw) -> list[int]:
    key = (tuple(ids), n, tuple(sorted(kw.items())))
    if key not in _REF:
        target, _ = pair("llama")
        x = torch.tensor([ids])
        out = target.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                              pad_token_id=0, **kw)
        _REF[key] = out[0, len(ids):].tolist()
    return _REF[key]


def synthetic_latency(verify_growth: float = 0.0005) -> LatencyModel:
    """A latency model where speculation pays (cheap draft, verify grows slowly with tokens), with
    online corrections off (bounds (1, 1)) so that decisions do not depend on the machine's speed."""
    target, draft = [], []
    for r in (1, 4, 16):
        for t in (1, 4, 16):
            for c in (1, 512):
                target.append([r, t, c, 0.01 + verify_growth * r * t])
                draft.append([r, t, c, 0.0005 + 0.00005 * r * t])
    return LatencyModel.from_points(target, draft, overhead=0.0005, bounds=(1.0, 1.0))


@functools.lru_cache(maxsize=None)
def confident_draft():
    """A noisy copy of the tiny target with a sharpened head: agrees ~65% of the time and is (over)
    confident, so the goodput planners really draft (the random tiny draft is near-uniform)."""
    target, _ = pair("llama")
    draft = copy.deepcopy(target)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2 * p.std().clamp(min=1e-3))
        draft.get_output_embeddings().weight.mul_(10.0)
    return draft


def random_shapes(seed: int, max_depth: int = 4, max_width: int = 2) -> ShapeFunction:
    return conftest.random_shapes(seed, max_depth, max_width, p_empty=0.25, p_chain=0.35)


class AlwaysBehind(SLOPlanner):
    """Every request with a TPOT objective is behind its track but can still meet it, whatever the
    machine's speed: phase 1 runs deterministically inside the real engine loop."""

    def max_depth(self, ctx):
        slo_rows = torch.isfinite(ctx.tpot)
        ctx.tokens_needed = torch.where(slo_rows, 3.0, 0.0)
        ctx.rate_needed = torch.where(slo_rows, 1.5, 0.0)
        return super().max_depth(ctx)


POLICIES = {
    "shapes": lambda: random_shapes(5),
    "slo": lambda: AlwaysBehind(synthetic_latency()),
    "slo-tree": lambda: AlwaysBehind(synthetic_latency(), tree=True, max_depth=4),
}


# ---------------------------------------------------------------------------------- losslessness
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_greedy_matches_generate_whatever_the_batch(policy):
    target, _ = pair("llama")
    draft = confident_draft()
    prompts = make_prompts(10, 1)
    lens = [5 + (7 * i) % 20 for i in range(10)]
    slos = [None, SLO(tpot_ms=0.01), SLO(tpot_ms=1e4, ttft_ms=1e5), SLO(ttft_ms=1e5)] * 3
    engine = Engine(target, draft, policy=POLICIES[policy](), max_rows=3, seed=0, start=False)
    handles = [engine.submit(p, max_new_tokens=n, slo=s) for p, n, s in zip(prompts[:5], lens, slos)]
    # neighbours of other kinds: a sampled request and a greedy one with a repetition penalty
    sampled = engine.submit(prompts[0], max_new_tokens=12, do_sample=True, temperature=0.9, top_k=20)
    penal = engine.submit(prompts[1], max_new_tokens=10, repetition_penalty=1.3)
    engine.start()
    late = []
    t = threading.Thread(target=lambda: late.extend(
        engine.submit(p, max_new_tokens=n, slo=s) for p, n, s in zip(prompts[5:], lens[5:], slos[5:])))
    t.start()
    t.join()
    engine.close(drain=True)
    for h, p, n in zip(handles + late, prompts, lens):
        res = h.result()
        assert [*res.token_ids] == reference(p, n), f"request {res.request_id} differs from target.generate"
        assert res.finish_reason in ("length", "eos")
        assert res.steps >= 1 and res.ttft is not None
    assert penal.result().token_ids == reference(prompts[1], 10, repetition_penalty=1.3)
    out = sampled.result()
    assert 1 <= len(out.token_ids) <= 12 and all(0 <= x < VOCAB for x in out.token_ids)
    assert engine.stats.drafted_tokens > 0
    assert max(s.rows for s in engine.stats.steps) == 3  # requests really shared steps
    assert 0 < engine.stats.accepted_tokens < engine.stats.drafted_tokens  # accepts and rejects
    if isinstance(engine.policy, SLOPlanner):
        assert engine.policy.behind_rows > 0 and engine.policy.slo_nodes > 0  # phase 1 ran


@pytest.mark.parametrize("arch", ["gpt2", "mistral", "qwen2"])
def test_other_architectures_in_continuous_batch(arch):
    target, draft = pair(arch)
    prompts = make_prompts(6, 9)
    lens = [4 + (11 * i) % 25 for i in range(6)]
    with Engine(target, draft, policy=random_shapes(7), max_rows=3, seed=0) as engine:
        hs = [engine.submit(p, max_new_tokens=n) for p, n in zip(prompts, lens)]
    for h, p, n in zip(hs, prompts, lens):
        x = torch.tensor([p])
        ref = target.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                              pad_token_id=0)[0, len(p):].tolist()
        assert h.result().token_ids == ref


def test_eos_and_self_draft_in_continuous_batch():
    target, same = pair("llama", same=True)
    prompts = make_prompts(6, 2)
    full = [reference(p, 20) for p in prompts]
    eos = full[0][6]  # a token the reference emits mid-way
    with Engine(target, same, policy=StaticChain(3), max_rows=2, seed=0) as engine:
        hs = [engine.submit(p, max_new_tokens=20, eos_token_id=eos) for p in prompts]
        results = [h.result() for h in hs]
    for p, res in zip(prompts, results):
        assert res.token_ids == reference(p, 20, eos_token_id=eos)
    assert results[0].finish_reason == "eos" and results[0].token_ids[-1] == eos
    assert sum(r.accepted_tokens for r in results) > 0


# ------------------------------------------------------------------------------ no loss, no dupes
def test_burst_of_threads_with_cancellations_loses_nothing():
    target, _ = pair("llama")
    draft = confident_draft()
    prompts = make_prompts(8, 3)
    engine = Engine(target, draft, policy=SLOPlanner(synthetic_latency()), max_rows=4, seed=0)
    submitted: list = []
    lock = threading.Lock()
    streams: dict[int, list[int]] = {}

    def client(k: int):
        rng = random.Random(k)
        for j in range(6):
            p = prompts[(k + j) % len(prompts)]
            h = engine.submit(p, max_new_tokens=12, slo=SLO(tpot_ms=rng.choice([0.01, 1e4])))
            with lock:
                submitted.append((h, p))
            if rng.random() < 0.35:
                if rng.random() < 0.5:
                    next(iter(h), None)  # after its first chunk
                h.cancel()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    def consume(h):
        streams[h.request_id] = [tok for chunk in h for tok in chunk.token_ids]
    readers = [threading.Thread(target=consume, args=(h,)) for h, _ in submitted]
    for t in readers:
        t.start()
    for t in readers:
        t.join(60)
    engine.close(drain=True)
    results = [(h.result(timeout=0), p) for h, p in submitted]
    ids = [r.request_id for r, _ in results]
    assert len(ids) == 36 and len(set(ids)) == 36
    n_cancelled = 0
    for res, p in results:
        assert streams[res.request_id] == res.token_ids  # streamed exactly once, in order
        if res.finish_reason == "cancelled":
            n_cancelled += 1
            assert res.token_ids == reference(p, 12)[: len(res.token_ids)]
        else:
            assert res.finish_reason in ("length", "eos")
            assert res.token_ids == reference(p, 12)
    assert n_cancelled > 0 and engine.stats.accepted_tokens > 0
    assert engine.running == 0 and engine.queued == 0 and not engine._thread.is_alive()


# ---------------------------------------------------------------------------------- bad requests
class Boom(LogitsProcessor):
    def __init__(self, after: int):
        self.calls, self.after = 0, after

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("boom from a user logits processor")
        return scores


def test_bad_request_fails_alone():
    target, draft = pair("llama")
    prompts = make_prompts(4, 4)
    with Engine(target, draft, policy=random_shapes(2), max_rows=4, max_cached_tokens=400, seed=0) as engine:
        good = [engine.submit(p, max_new_tokens=15) for p in prompts]
        bad_calls = [
            dict(slo={"tpot_ms": float("nan")}), dict(slo={"tpot_ms": 0}), dict(slo={"ttft_ms": -5}),
            dict(slo={"tpot": 5}), dict(slo=3.0), dict(do_sample=True, temperature=-1.0), dict(top_p=1.5),
            dict(top_k=-2), dict(repetition_penalty=0.0), dict(max_new_tokens=0), dict(stop="x"),
            dict(temperature=float("inf"), do_sample=True), dict(max_new_tokens=399),
        ]
        for kw in bad_calls:
            kw = {"max_new_tokens": 5, **kw}
            with pytest.raises(ValueError):
                engine.submit(prompts[0], **kw)
        for prompt in ([], [VOCAB + 5], [1.5], "text without a tokenizer", list(range(3, 3 + 600))):
            with pytest.raises(ValueError):
                engine.submit(prompt, max_new_tokens=5)
        with pytest.raises(ValueError):
            SLO(tpot_ms=-1)
        failing = engine.submit(prompts[1], max_new_tokens=15, logits_processor=LogitsProcessorList([Boom(3)]))
        failing_at_prefill = engine.submit(prompts[2], max_new_tokens=5,
                                           logits_processor=LogitsProcessorList([Boom(0)]))
        more = [engine.submit(p, max_new_tokens=15) for p in prompts]
        with pytest.raises(RuntimeError, match="boom"):
            failing.result()
        with pytest.raises(RuntimeError, match="boom"):
            list(failing_at_prefill)
        assert isinstance(failing.exception(), RuntimeError)
        for h, p in zip(good + more, prompts + prompts):
            assert h.result().token_ids == reference(p, 15)
        after = engine.submit(prompts[3], max_new_tokens=6)  # the engine still serves
        assert after.result().token_ids == reference(prompts[3], 6)


# ---------------------------------------------------------------------------------------- close
def test_close_drains():
    target, draft = pair("llama")
    prompts = make_prompts(6, 5)
    engine = Engine(target, draft, policy=StaticChain(2), max_rows=2, seed=0)
    hs = [engine.submit(p, max_new_tokens=10) for p in prompts]
    engine.close(drain=True)
    assert not engine._thread.is_alive()
    for h, p in zip(hs, prompts):
        assert h.done() and h.result().token_ids == reference(p, 10)
    with pytest.raises(EngineClosed):
        engine.submit(prompts[0], max_new_tokens=3)
    engine.close()  # idempotent


def test_close_cancels_and_context_manager():
    target, draft = pair("llama")
    prompts = make_prompts(10, 6)
    engine = Engine(target, draft, policy=StaticChain(1), max_rows=2, seed=0)
    hs = [engine.submit(p, max_new_tokens=200) for p in prompts]
    next(iter(hs[0]))  # running
    engine.close(drain=False)
    assert not engine._thread.is_alive()
    reasons = [h.result(timeout=0).finish_reason for h in hs]
    assert all(r in ("cancelled", "length", "eos") for r in reasons)
    assert reasons.count("cancelled") >= 1
    for h in hs:
        assert list(h.tokens()) == h.result().token_ids  # iteration ends cleanly
    assert not hs[0].cancel()  # already done

    with Engine(target, draft, policy=StaticChain(1), max_rows=2, seed=0) as eng:
        h = eng.submit(prompts[0], max_new_tokens=4)
    assert h.done() and h.result().token_ids == reference(prompts[0], 4)
    # an engine that never started still resolves every handle on close
    idle = Engine(target, draft, policy=StaticChain(1), start=False)
    h = idle.submit(prompts[1], max_new_tokens=4)
    idle.close(drain=False)
    assert h.result(timeout=0).finish_reason == "cancelled"


# ----------------------------------------------------------------------------------------- async
def test_async_iteration():
    target, draft = pair("llama")
    prompts = make_prompts(3, 7)

    async def main():
        with Engine(target, draft, policy=StaticChain(2), max_rows=3, seed=0) as engine:
            hs = [engine.submit(p, max_new_tokens=8 + i) for i, p in enumerate(prompts)]

            async def collect(h):
                toks = []
                async for chunk in h:
                    toks.extend(chunk.token_ids)
                return toks, await h.aresult()
            return await asyncio.gather(*(collect(h) for h in hs))

    out = asyncio.run(main())
    for (toks, res), p, i in zip(out, prompts, range(3)):
        assert toks == res.token_ids == reference(p, 8 + i)


# ---------------------------------------------------------------------------------- scheduling
def test_ttft_deadline_admitted_first():
    target, draft = pair("llama")
    a, b = make_prompts(2, 8)
    engine = Engine(target, draft, policy=StaticChain(0), max_rows=1, seed=0, start=False)
    best_effort = engine.submit(a, max_new_tokens=6)
    urgent = engine.submit(b, max_new_tokens=6, slo=SLO(ttft_ms=1e4))
    engine.start()
    engine.close(drain=True)
    assert urgent.result().first_token_at < best_effort.result().first_token_at
    assert urgent.result().slo_met is not None and best_effort.result().slo_met is None


def test_slo_phase_gives_nodes_to_the_row_behind():
    """Verify cost doubles from 1 to 4 tokens per row: for the batch's goodput one good tree among
    junk ones does not pay, but for a row behind its TPOT track it raises its own token rate."""
    planner = SLOPlanner(synthetic_latency(verify_growth=0.00125), row_prior=0.05, probe_every=0)
    planner.alpha[1] = 0.9  # the row's running acceptance rate
    tree = DraftTree.from_lists([[5, 6, 7]] * 4, [[-1, 0, 1]] * 4)
    probs = torch.tensor([[0.05, 0.05, 0.05], [0.9, 0.8, 0.7], [0.05, 0.05, 0.05], [0.05, 0.05, 0.05]])
    tree.draft_prob = probs * tree.valid

    def ctx(need):
        return ServingStepContext(rows=4, context_len=torch.full((4,), 20), remaining=torch.full((4,), 50),
                                  sampling=False, step=1, row_ids=torch.arange(4), tpot=torch.full((4,), 0.01),
                                  tokens_needed=torch.tensor(need), rate_needed=torch.tensor(need) / 2)

    c = ctx([0.0, 0.0, 0.0, 0.0])
    planner.max_depth(c)
    base = planner.select(tree, c)
    assert int(base.sum()) == 0
    c = ctx([0.0, 3.0, 0.0, 0.0])
    depth = planner.max_depth(c)
    assert int(depth[1]) > 0
    keep = planner.select(tree, c)
    assert int(keep[1].sum()) > 0 and planner.slo_nodes > 0
    # (the others' nodes are then free: the verify pass is as wide as its widest row)
    hopeless = ctx([0.0, 3.0, 0.0, 0.0])
    hopeless.rate_needed = torch.tensor([0.0, 100.0, 0.0, 0.0])  # cannot meet its TPOT any more
    planner.max_depth(hopeless)
    assert not planner.select(tree, hopeless).any()  # best effort, like everyone else
    tree.select(keep)  # closed under ancestors


# ------------------------------------------------------------------------------- text and stops
def word_tokenizer():
    """A word-level tokenizer over the tiny vocabulary ("w3" ... "w100"), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def test_text_prompts_streaming_and_stop_strings():
    target, draft = pair("llama")
    tok = word_tokenizer()
    prompt = "w5 w6 w7 w8"
    ref = reference([5, 6, 7, 8], 16)
    with Engine(target, draft, tok, policy=StaticChain(2), max_rows=2, seed=0) as engine:
        h = engine.submit(prompt, max_new_tokens=16)
        text = "".join(h.text())
        res = h.result()
        assert res.token_ids == ref and res.text == text == tok.decode(ref)
        # stop strings are HF's StopStringCriteria, which cannot index this word-level vocabulary
        # (generate(stop_strings=...) refuses it too); tests/test_serving_stops.py matches them
        with pytest.raises(ValueError, match="StopStringCriteria"):
            engine.submit(prompt, max_new_tokens=16, stop=[f"w{ref[5]}"])
        assert engine.generate(prompt, max_new_tokens=3).token_ids == ref[:3]  # the engine serves on


# ------------------------------------------------------------------- streamed text with cleanup (5)
def cleanup_tokenizer(punct: dict[int, str]):
    """Like :func:`word_tokenizer`, with some ids decoding to punctuation / quotes and
    ``clean_up_tokenization_spaces=True`` (decode turns "a , b ' c" into "a, b'c")."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{punct.get(i, f"w{i}"): i for i in range(3, VOCAB)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   clean_up_tokenization_spaces=True)


def test_streamed_text_never_repeats_with_cleanup_spaces():
    target, draft = pair("llama")
    prompts = make_prompts(3, 30)
    refs = [reference(p, 30) for p in prompts]
    used = [t for r in refs for t in r if t > 2]
    common = sorted(set(used), key=lambda t: -used.count(t))
    quote = common[0]  # "w a ' b" cleans up to "w a'b": the space before the quote disappears later
    after = {r[i + 1] for r in refs for i in range(len(r) - 1) if r[i] == quote}
    punct = {quote: "'", **dict(zip([t for t in common[1:] if t not in after], [",", ".", "n't"]))}
    assert after - set(punct) - {2}, "the quote must be followed by a word somewhere"
    tok = cleanup_tokenizer(punct)
    with Engine(target, draft, tok, policy=StaticChain(0), max_rows=3, seed=0) as engine:
        hs = [engine.submit(p, max_new_tokens=30) for p in prompts]
        streams = ["".join(c.text for c in h) for h in hs]
    for h, r, s in zip(hs, refs, streams):
        res = h.result()
        assert res.token_ids == r
        assert res.text == tok.decode(r, skip_special_tokens=True)
        assert s == res.text, f"stream {s!r} vs result {res.text!r}"


# ---------------------------------------------------------------- reproducible seeded sampling (6)
def test_seeded_generate_is_reproducible_whatever_the_planner_decides():
    """The same torch.manual_seed gives the same sample with any draft policy (so with the adaptive
    planner, whose decisions depend on timing and history), and consumes the global RNG the same."""
    from adaspec_hf import enable

    target, _ = pair("llama")
    target = enable(copy.deepcopy(target))  # enable() patches the instance: keep the shared one clean
    draft = confident_draft()
    ids = torch.tensor([[5, 17, 33, 8], [0, 0, 9, 4]])
    mask = (ids != 0).long()
    outs, after = [], []
    for policy in ["static-0", "static-3", random_shapes(8), random_shapes(9), "heuristic", "static-3"]:
        torch.manual_seed(123)
        out = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=True, top_k=30,
                              temperature=1.2, assistant_model=draft, adaptive=True, draft_policy=policy,
                              pad_token_id=0)
        outs.append(out)
        after.append(torch.rand(1))
        assert target.adaspec_stats.new_tokens > 0
    for o, a in zip(outs[1:], after[1:]):
        assert torch.equal(o, outs[0]) and torch.equal(a, after[0])
    torch.manual_seed(124)
    other = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=True, top_k=30,
                            temperature=1.2, assistant_model=draft, adaptive=True, draft_policy="static-3",
                            pad_token_id=0)
    assert not torch.equal(other, outs[0])  # the seed matters


def test_seeded_engine_requests_are_reproducible_whatever_the_batch():
    target, _ = pair("llama")
    draft = confident_draft()
    prompts = make_prompts(4, 31)
    runs = []
    for policy, rows in [(StaticChain(0), 1), (random_shapes(3), 4), (AlwaysBehind(synthetic_latency()), 2)]:
        with Engine(target, draft, policy=policy, max_rows=rows, seed=0) as engine:
            hs = [engine.submit(p, max_new_tokens=20, do_sample=True, temperature=1.3) for p in prompts]
            own = engine.submit(prompts[0], max_new_tokens=20, do_sample=True, seed=77)
            runs.append(([h.result().token_ids for h in hs], own.result().token_ids))
    assert all(r == runs[0] for r in runs[1:])
    assert runs[0][0][0] != runs[0][1]  # a request's own seed is its own stream
    with Engine(target, draft, policy=StaticChain(2), max_rows=2, seed=1) as engine:
        assert engine.submit(prompts[0], max_new_tokens=20, do_sample=True, seed=77).result().token_ids == runs[0][1]
        with pytest.raises(ValueError, match="seed"):
            engine.submit(prompts[0], seed=-1)


# ------------------------------------------------------------------ max_cached_tokens is a bound (7)
def test_max_cached_tokens_bounds_the_cache_slots(monkeypatch):
    """Padding of short rows to the longest, holes and the verify step's speculative slots all count."""
    from adaspec_hf.core.kv import KVState

    target, draft = pair("llama")
    peak = {"target": 0, "draft": 0}
    orig_forward, orig_append = KVState.forward, KVState.append_rows

    def watch(kv):
        key = "target" if kv.model is target else "draft"
        peak[key] = max(peak[key], kv.rows * kv.length)

    def forward(self, *a, **k):
        out = orig_forward(self, *a, **k)
        watch(self)
        return out

    def append_rows(self, other):
        orig_append(self, other)
        watch(self)
    monkeypatch.setattr(KVState, "forward", forward)
    monkeypatch.setattr(KVState, "append_rows", append_rows)
    rng = random.Random(5)
    prompts = [make_prompts(1, 40 + i, lo=2, hi=rng.choice([3, 60]))[0] for i in range(12)]
    lens = [rng.randint(5, 40) for _ in prompts]
    with Engine(target, draft, policy=random_shapes(11), max_rows=6, max_cached_tokens=400, seed=0) as engine:
        hs = [engine.submit(p, max_new_tokens=n) for p, n in zip(prompts, lens)]
        for h, p, n in zip(hs, prompts, lens):
            assert h.result().token_ids == reference(p, n)
    assert 0 < peak["target"] <= 400 and 0 < peak["draft"] <= 400, peak
    assert max(s.rows for s in engine.stats.steps) > 1


# ------------------------------------------------------------ generate allocates as it goes (8)
def test_generate_with_a_huge_max_new_tokens_stops_at_eos():
    from adaspec_hf import enable
    from adaspec_hf.core import SpeculativeDecoder

    target, draft = pair("llama")
    target = enable(copy.deepcopy(target))  # keep the shared instance un-patched
    ids = torch.tensor([[5, 6, 7, 8]])
    full = reference([5, 6, 7, 8], 12)
    eos = full[7]
    want = reference([5, 6, 7, 8], 12, eos_token_id=eos)
    dec = SpeculativeDecoder(target, draft, StaticChain(3), eos_token_id=eos, pad_token_id=0)
    assert dec.generate(ids, None, 10**12).new_tokens[0] == want
    out = target.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10**12,
                          eos_token_id=eos, pad_token_id=0, assistant_model=draft, adaptive=True,
                          draft_policy="static-2")
    assert out[0, 4:].tolist() == want
    for bad in (2.5, 0, True, "3"):
        with pytest.raises(ValueError, match="max_new_tokens"):
            dec.generate(ids, None, bad)
    with pytest.raises(ValueError, match="max_new_tokens"):
        target.generate(input_ids=ids, max_new_tokens=2.5, pad_token_id=0, assistant_model=draft, adaptive=True,
                        draft_policy="static-2")


# ---------------------------------------------------------------- per-request state is dropped (9)
def test_per_request_state_is_dropped(monkeypatch):
    from adaspec_hf.serving import engine as serving
    from adaspec_hf.serving import intake
    from adaspec_hf.policies.planner import AdaptivePlanner
    from adaspec_hf.policies import Heuristic

    monkeypatch.setattr(serving, "STEP_HISTORY", 16)
    monkeypatch.setattr(intake, "PROCESSOR_CACHE_SIZE", 4)
    target, _ = pair("llama")
    draft = confident_draft()
    prompts = make_prompts(12, 32)
    for policy in (AdaptivePlanner(synthetic_latency()), AlwaysBehind(synthetic_latency()), Heuristic()):
        with Engine(target, draft, policy=policy, max_rows=3, seed=0) as engine:
            hs = [engine.submit(p, max_new_tokens=10, do_sample=i % 2 == 1, slo=SLO(tpot_ms=0.01),
                                temperature=(0.5 + 0.1 * i) if i % 2 else None) for i, p in enumerate(prompts)]
            for h in hs:
                h.result()
        st = engine.stats
        assert len(st.steps) <= 16 and st.target_forwards > 16
        assert st.new_tokens == sum(len(h.result().token_ids) for h in hs)
        assert st.accepted_tokens == sum(h.result().accepted_tokens for h in hs)
        assert st.drafted_tokens == sum(h.result().drafted_tokens for h in hs)
        assert len(engine._intake.proc_cache) <= 4
        for name in ("alpha", "first_value", "k"):
            assert not getattr(policy, name, {}), f"{type(policy).__name__}.{name} kept finished requests' state"


# ------------------------------------------------------------------------------- small things (10)
def test_slo_accepts_real_numbers():
    import numpy as np

    assert SLO(tpot_ms=np.float32(20)).tpot_ms == 20.0
    assert SLO(ttft_ms=np.int64(300)).ttft == 0.3
    import fractions
    assert SLO(tpot_ms=fractions.Fraction(1, 2)).tpot_ms == 0.5
    for bad in (True, np.float64("nan"), np.float32("inf"), np.float32(0), -1, "20", None):
        with pytest.raises(ValueError):
            SLO(tpot_ms=bad)


def test_start_after_close_and_shared_policies_are_refused_clearly():
    target, draft = pair("llama")
    engine = Engine(target, draft, policy=StaticChain(1), seed=0)
    engine.start()  # already running: nothing happens
    engine.close()
    with pytest.raises(EngineClosed):
        engine.start()
    idle = Engine(target, draft, policy=StaticChain(1), start=False)
    idle.close()
    with pytest.raises(EngineClosed):
        idle.start()
    shared = StaticChain(2)
    with Engine(target, draft, policy=shared, seed=0) as first:
        with pytest.raises(ValueError, match="policy"):
            Engine(target, draft, policy=shared, seed=0)
        assert first.generate([5, 6], max_new_tokens=4).token_ids == reference([5, 6], 4)
    with Engine(target, draft, policy=shared, seed=0) as again:  # free once the first is closed
        assert again.generate([5, 6], max_new_tokens=4).token_ids == reference([5, 6], 4)


def test_cancelled_request_behind_a_blocked_queue_head_resolves_at_once():
    target, draft = pair("llama")
    prompts = make_prompts(3, 33)
    with Engine(target, draft, policy=StaticChain(0), max_rows=1, seed=0) as engine:
        long = engine.submit(prompts[0], max_new_tokens=480, eos_token_id=[])
        next(iter(long))  # running: the only row is taken, the queue head waits
        head = engine.submit(prompts[1], max_new_tokens=5)
        victim = engine.submit(prompts[2], max_new_tokens=5)
        victim.cancel()
        assert victim.result(timeout=60).finish_reason == "cancelled"
        assert not long.done(), "the cancelled request waited for the running one to finish"
        long.cancel()
        assert head.result(timeout=60).token_ids == reference(prompts[1], 5)


def test_dropped_engine_stops_its_thread():
    import gc

    target, draft = pair("llama")
    engine = Engine(target, draft, policy=StaticChain(1), seed=0)
    assert engine.generate([5, 6, 7], max_new_tokens=3).token_ids == reference([5, 6, 7], 3)
    thread = engine._thread
    del engine
    gc.collect()
    thread.join(30)
    assert not thread.is_alive()


def test_run_drives_the_step_loop_in_the_calling_thread():
    """Engine(start=False).run(): the caller's thread steps while another submits; outputs are the
    target's own, close() from the client ends run(), and the engine refuses a second loop."""
    target, draft = pair("llama")
    prompts = make_prompts(4, 71)
    engine = Engine(target, draft, policy=StaticChain(2), max_rows=3, seed=0, start=False)
    got, stepped_by = {}, set()
    step = engine._batch.step

    def spy():  # which thread runs the steps
        stepped_by.add(threading.current_thread().name)
        return step()
    engine._batch.step = spy

    def client():
        handles = [engine.submit(p, max_new_tokens=6) for p in prompts]
        for i, h in enumerate(handles):
            got[i] = h.result(timeout=60).token_ids
        engine.close()

    th = threading.Thread(target=client, name="client")
    th.start()
    engine.run()  # returns once the client closes the engine
    th.join(timeout=60)
    assert not th.is_alive()
    assert stepped_by == {threading.current_thread().name}
    assert [got[i] for i in range(len(prompts))] == [reference(p, 6) for p in prompts]
    assert engine.released
    with pytest.raises(EngineClosed):
        engine.run()
    with pytest.raises(RuntimeError, match="run"):
        engine.start()

    running = Engine(target, draft, policy=StaticChain(1), seed=0)
    try:
        with pytest.raises(RuntimeError, match="own thread"):
            running.run()
    finally:
        running.close()


def test_close_without_drain_stops_a_running_run_loop():
    target, draft = pair("llama")
    engine = Engine(target, draft, policy=StaticChain(0), max_rows=1, seed=0, start=False)
    h = engine.submit(make_prompts(1, 72)[0], max_new_tokens=400, eos_token_id=[])
    closer = threading.Timer(0.5, lambda: engine.close(drain=False))
    closer.start()
    engine.run()
    closer.join()
    assert h.result(timeout=10).finish_reason in ("cancelled", "length")


def test_the_serving_example_runs_offline(tmp_path):
    """examples/serving.py (tiny random models when no pair is built) checks its own outputs."""
    assert "every output equals target.generate" in conftest.run_example("serving.py", tmp_path)


def test_a_background_loop_on_a_cpu_is_noted_once(caplog, monkeypatch):
    import logging

    from adaspec_hf.serving import engine as engine_mod

    target, draft = pair("llama")
    monkeypatch.setattr(engine_mod, "_told_about_threads", False)
    with caplog.at_level(logging.INFO, logger="adaspec_hf"):
        for _ in range(2):
            Engine(target, draft, policy=StaticChain(1), seed=0).close()
        idle = Engine(target, draft, policy=StaticChain(1), seed=0, start=False)
        idle.close()
    notes = [r for r in caplog.records if "Engine(..., start=False).run()" in r.getMessage()]
    assert len(notes) == 1


def test_an_interrupt_in_run_resolves_every_handle_then_propagates():
    target, draft = pair("llama")
    engine = Engine(target, draft, policy=StaticChain(1), max_rows=2, seed=0, start=False)
    handles = [engine.submit(p, max_new_tokens=50, eos_token_id=[]) for p in make_prompts(3, 73)]
    step, calls = engine._batch.step, []

    def interrupted_step():  # the third step is interrupted, as a Ctrl-C in the calling thread would be
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step()
    engine._batch.step = interrupted_step
    with pytest.raises(KeyboardInterrupt):
        engine.run()
    for h in handles:
        with pytest.raises(EngineClosed):
            h.result(timeout=10)
    assert engine.released
