"""Fault injection into the serving engine: a fault stays with the request (or the one step) it
belongs to, the engine keeps serving, and every handle resolves. Faults are monkeypatched into the
cache surgery (row append / select / compaction), the forwards, prefill, the tokenizer and the
consumers. Tiny random models; no wall-clock assertions (timeouts only bound a hang)."""
from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from adaspec_hf import Engine, EngineClosed
from adaspec_hf.core.kv import KVState
from adaspec_hf.policies import StaticChain

from conftest import VOCAB, pair
from test_serving import make_prompts, random_shapes, reference, word_tokenizer

WAIT_S = 120  # bounds a hang; a healthy engine answers these tiny requests in well under a second


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest


class Fault:
    """Make ``owner.name`` raise ``make()`` on the calls where ``when(call_no, *args)`` is true."""

    def __init__(self, monkeypatch, owner, name: str, make, when):
        orig = getattr(owner, name)
        self.calls = self.raised = 0

        def wrapper(*args, **kwargs):
            self.calls += 1
            if when(self.calls, *args, **kwargs):
                self.raised += 1
                raise make()
            return orig(*args, **kwargs)
        monkeypatch.setattr(owner, name, wrapper)


def oom():
    return torch.OutOfMemoryError("injected: CUDA out of memory")


def once(n: int):
    return lambda call, *a, **k: call == n


def run_all(engine: Engine, prompts, lens, **kw):
    hs = [engine.submit(p, max_new_tokens=n, **kw) for p, n in zip(prompts, lens)]
    return hs


def assert_all_reference(hs, prompts, lens):
    for h, p, n in zip(hs, prompts, lens):
        assert h.result(timeout=WAIT_S).token_ids == reference(p, n)


def assert_serves(engine: Engine, prompt=None):
    prompt = prompt or [5, 6, 7]
    assert engine.submit(prompt, max_new_tokens=6).result(timeout=WAIT_S).token_ids == reference(prompt, 6)


# --------------------------------------------------------------------------- cache surgery (item 1)
@pytest.mark.parametrize("call", [1, 2], ids=["target-cache", "draft-cache"])
def test_oom_once_while_merging_a_newcomer_fails_nobody(monkeypatch, call):
    """append_rows raising (target's, or the draft's after the target's succeeded) rolls the merge
    back; the newcomer is prefilled again later and every output is the target's own."""
    target, draft = pair("llama")
    fault = Fault(monkeypatch, KVState, "append_rows", oom, lambda n, kv, other: n == call and kv.rows > 0)
    prompts, lens = make_prompts(6, 11), [12, 9, 14, 7, 10, 13]
    with Engine(target, draft, policy=random_shapes(3), max_rows=3, seed=0) as engine:
        hs = run_all(engine, prompts, lens)
        assert_all_reference(hs, prompts, lens)
        assert_serves(engine)
    assert fault.raised == 1


def test_persistent_oom_while_merging_fails_only_newcomers(monkeypatch):
    target, draft = pair("llama")
    fault = Fault(monkeypatch, KVState, "append_rows", oom, lambda n, kv, other: kv.rows > 0)
    prompts, lens = make_prompts(5, 12), [20, 6, 8, 5, 7]
    engine = Engine(target, draft, policy=StaticChain(2), max_rows=3, seed=0)
    hs = run_all(engine, prompts, lens)
    failed = 0
    for h, p, n in zip(hs, prompts, lens):
        err = h.exception(timeout=WAIT_S)
        if err is None:
            assert h.result().token_ids == reference(p, n)
        else:
            assert isinstance(err, torch.OutOfMemoryError)
            failed += 1
    assert fault.raised > 0 and 0 < failed < len(hs)
    monkeypatch.undo()
    assert_serves(engine)  # the engine never died
    engine.close()


@pytest.mark.parametrize("method", ["select_rows", "compact"])
def test_oom_once_dropping_rows_or_compacting_fails_nobody(monkeypatch, method):
    target, draft = pair("llama")
    fault = Fault(monkeypatch, KVState, method, oom, once(1))
    prompts, lens = make_prompts(6, 13), [40, 9, 44, 7, 38, 13]
    with Engine(target, draft, policy=random_shapes(4), max_rows=3, seed=0, compaction_threshold=0.2) as engine:
        hs = run_all(engine, prompts, lens)
        assert_all_reference(hs, prompts, lens)
        assert_serves(engine)
    assert fault.raised == 1


def test_oom_once_reaping_a_cancelled_row_fails_nobody(monkeypatch):
    target, draft = pair("llama")
    prompts = make_prompts(3, 14)
    with Engine(target, draft, policy=StaticChain(1), max_rows=3, seed=0) as engine:
        long = [engine.submit(p, max_new_tokens=300) for p in prompts]
        for h in long:
            next(iter(h))  # all three running
        fault = Fault(monkeypatch, KVState, "select_rows", oom, once(1))
        long[1].cancel()
        assert long[1].result(timeout=WAIT_S).finish_reason == "cancelled"
        for i in (0, 2):
            assert long[i].result(timeout=WAIT_S).token_ids == reference(prompts[i], 300)
        assert_serves(engine)
    assert fault.raised == 1


# ------------------------------------------------------------------------------ faults in a step
@pytest.mark.parametrize("which", ["target", "draft"])
def test_oom_once_in_a_forward_is_retried(monkeypatch, which):
    """A failed step is rolled back and retried: a transient OOM in the verify (or a draft) forward
    costs no request."""
    target, draft = pair("llama")
    model = target if which == "target" else draft
    fault = Fault(monkeypatch, KVState, "forward", oom,
                  lambda n, kv, *a, **k: kv.model is model and fault.calls >= 6 and fault.raised == 0)
    prompts, lens = make_prompts(4, 15), [15, 11, 13, 9]
    with Engine(target, draft, policy=StaticChain(3), max_rows=4, seed=0) as engine:
        hs = run_all(engine, prompts, lens)
        assert_all_reference(hs, prompts, lens)
        assert_serves(engine)
    assert fault.raised == 1


def test_persistent_step_failure_fails_that_batch_only(monkeypatch):
    target, draft = pair("llama")
    prompts, lens = make_prompts(3, 16), [10, 10, 10]
    engine = Engine(target, draft, policy=StaticChain(2), max_rows=3, seed=0, start=False)
    hs = run_all(engine, prompts, lens)
    Fault(monkeypatch, KVState, "forward", lambda: RuntimeError("broken kernel"),
          lambda n, kv, *a, **k: kv.model is target)
    engine.start()
    for h in hs:
        assert isinstance(h.exception(timeout=WAIT_S), RuntimeError)
    monkeypatch.undo()
    assert_serves(engine)
    engine.close()


def test_prefill_fault_fails_that_request_alone(monkeypatch):
    target, draft = pair("llama")
    prompts, lens = make_prompts(4, 17), [8, 9, 10, 11]
    bad = prompts[2]
    Fault(monkeypatch, KVState, "prefill", oom, lambda n, kv, ids, *a: ids.shape[1] == len(bad)
          and ids[0].tolist() == bad)
    with Engine(target, draft, policy=StaticChain(2), max_rows=2, seed=0) as engine:
        hs = run_all(engine, prompts, lens)
        for i, (h, p, n) in enumerate(zip(hs, prompts, lens)):
            if i == 2:
                assert isinstance(h.exception(timeout=WAIT_S), torch.OutOfMemoryError)
            else:
                assert h.result(timeout=WAIT_S).token_ids == reference(p, n)


# ----------------------------------------------------------------- a sampled row with no token (2)
def test_sampled_row_without_a_valid_token_fails_alone():
    """no_repeat_ngram_size=1 without EOS bans every token once all have been used: that request
    fails with a clear error; its neighbours (greedy and sampled) are untouched."""
    target, draft = pair("llama")
    prompts = make_prompts(3, 18)
    n_long = VOCAB + 5
    with Engine(target, draft, policy=random_shapes(6), max_rows=3, seed=0) as engine:
        doomed = engine.submit(prompts[0], max_new_tokens=n_long, do_sample=True, no_repeat_ngram_size=1,
                               eos_token_id=[])
        greedy = engine.submit(prompts[1], max_new_tokens=n_long)
        sampled = engine.submit(prompts[2], max_new_tokens=n_long, do_sample=True, eos_token_id=[])
        err = doomed.exception(timeout=WAIT_S)
        assert isinstance(err, ValueError) and "no token" in str(err)
        assert len(set(doomed._result.token_ids)) == len(doomed._result.token_ids)  # it obeyed the ban
        assert greedy.result(timeout=WAIT_S).token_ids == reference(prompts[1], n_long)
        out = sampled.result(timeout=WAIT_S)
        assert len(out.token_ids) == n_long and out.finish_reason == "length"
        assert_serves(engine)


# ------------------------------------------------------------------------ tokenizer faults (3)
class FlakyDecode:
    """A tokenizer whose ``decode`` raises on one token id (as sentencepiece does for an id past
    its vocabulary)."""

    def __init__(self, tok, bad: int):
        self.tok, self.bad = tok, bad
        self.clean_up_tokenization_spaces = getattr(tok, "clean_up_tokenization_spaces", False)

    def __call__(self, *args, **kwargs):
        return self.tok(*args, **kwargs)

    def decode(self, ids, **kwargs):
        if self.bad in list(ids):
            raise IndexError(f"piece id {self.bad} is out of range")
        return self.tok.decode(ids, **kwargs)


def test_decode_error_fails_that_request_and_resolves_its_handle():
    target, draft = pair("llama")
    prompts = make_prompts(6, 19)
    refs = [reference(p, 12) for p in prompts]
    bad = next(t for t in refs[0] if not any(t in r for r in refs[1:]))
    tok = FlakyDecode(word_tokenizer(), bad)
    with Engine(target, draft, tok, policy=StaticChain(2), max_rows=3, seed=0) as engine:
        hs = [engine.submit(p, max_new_tokens=12) for p in prompts]
        with pytest.raises(IndexError):
            hs[0].result(timeout=WAIT_S)
        with pytest.raises(IndexError):
            list(hs[0])  # iteration ends with the error too (it used to wait forever)
        for h, r in zip(hs[1:], refs[1:]):
            res = h.result(timeout=WAIT_S)
            assert res.token_ids == r and res.text == tok.decode(r, skip_special_tokens=True)
        assert_serves(engine)


def test_decode_error_at_prefill_resolves_the_handle():
    target, draft = pair("llama")
    prompt = make_prompts(1, 20)[0]
    first = reference(prompt, 1)[0]
    tok = FlakyDecode(word_tokenizer(), first)
    with Engine(target, draft, tok, policy=StaticChain(1), max_rows=2, seed=0) as engine:
        h = engine.submit(prompt, max_new_tokens=5)
        assert isinstance(h.exception(timeout=WAIT_S), IndexError)
        assert_serves(engine, [7, 8, 9] if first not in reference([7, 8, 9], 6) else [9, 9, 9])


# ------------------------------------------------------------------ interrupts in prefill (4)
class Interrupt(LogitsProcessor):
    def __init__(self, exc):
        self.exc = exc

    def __call__(self, input_ids, scores):
        raise self.exc()


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
def test_interrupt_during_prefill_resolves_every_handle(exc):
    target, draft = pair("llama")
    prompts = make_prompts(4, 21)
    engine = Engine(target, draft, policy=StaticChain(1), max_rows=1, seed=0, start=False)
    first = engine.submit(prompts[0], max_new_tokens=30)
    victim = engine.submit(prompts[1], max_new_tokens=5, logits_processor=LogitsProcessorList([Interrupt(exc)]))
    queued = [engine.submit(p, max_new_tokens=5) for p in prompts[2:]]
    engine.start()
    for h in [first, victim, *queued]:
        h.exception(timeout=WAIT_S)  # resolves (TimeoutError here was the bug)
    err = victim.exception()
    assert isinstance(err, EngineClosed) and isinstance(err.__cause__, exc)
    with pytest.raises(EngineClosed):
        engine.submit(prompts[0], max_new_tokens=3)
    engine.close(timeout=WAIT_S)
    assert not engine._thread.is_alive()


# ---------------------------------------------------------------------------- consumer faults
def test_failing_and_abandoned_consumers_do_not_disturb_the_engine():
    target, draft = pair("llama")
    prompts, lens = make_prompts(6, 22), [20, 18, 16, 14, 12, 10]
    with Engine(target, draft, policy=StaticChain(2), max_rows=3, seed=0) as engine:
        hs = run_all(engine, prompts, lens)
        errors = []

        def bad_consumer(h):
            try:
                for i, _ in enumerate(h):
                    if i == 1:
                        raise RuntimeError("consumer bug")
            except RuntimeError as e:
                errors.append(e)

        async def abandoned(h):
            async for _ in h:
                await asyncio.sleep(3600)  # cancelled below while holding a chunk

        async def drive():
            task = asyncio.ensure_future(abandoned(hs[1]))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        t = threading.Thread(target=bad_consumer, args=(hs[0],))
        t.start()
        asyncio.run(drive())
        t.join(WAIT_S)
        assert len(errors) == 1
        hs[2].cancel()  # and one consumer walks away mid-stream
        assert hs[2].result(timeout=WAIT_S).finish_reason in ("cancelled", "length")
        for i in (0, 1, 3, 4, 5):
            assert hs[i].result(timeout=WAIT_S).token_ids == reference(prompts[i], lens[i])
        assert_serves(engine)
