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
from adaspec_hf.latency import LatencyModel
from adaspec_hf.policies import ShapeFunction, StaticChain, TreeShape
from adaspec_hf.serving import ServingStepContext
from adaspec_hf.tree import DraftTree

from conftest import VOCAB, pair


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is faster and far steadier on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
        stop_word = f"w{ref[5]}"
        cut = next(k + 1 for k in range(len(ref)) if stop_word in tok.decode(ref[: k + 1]))
        s = engine.submit(prompt, max_new_tokens=16, stop=[stop_word, "never"]).result()
        assert s.finish_reason == "stop" and s.token_ids == ref[:cut] and s.text.endswith(stop_word)
