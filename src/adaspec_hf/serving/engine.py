"""SLO-aware continuous-batching engine: submit requests, stream tokens, meet latency objectives.

::

    with Engine(target, draft, tokenizer, max_rows=8) as engine:
        h = engine.submit("def main():", max_new_tokens=64, slo=SLO(tpot_ms=40, ttft_ms=500))
        for chunk in h:                      # or: async for chunk in h
            print(chunk.text, end="")
        print(h.result().tpot, h.result().slo_met)

A background thread runs the step loop until :meth:`Engine.close` (or until the engine is dropped);
``Engine(..., start=False)`` then :meth:`Engine.run` runs it in the calling thread instead (faster on
a CPU, see there), while other threads submit.
Faults stay with their request or step (:mod:`adaspec_hf.serving.batch`): every handle resolves.
Queued requests join earliest TTFT deadline first, and into a running batch only while no running
request's TPOT objective is put at risk (:mod:`adaspec_hf.serving.admission`). Each step is the
shared :class:`~adaspec_hf.core.SpecStep` with per-request tokens, sampling mode and logits
processors, and each request stops under the same :class:`~adaspec_hf.core.CommitRule` as
``generate`` (EOS, ``max_new_tokens``, stop strings), so greedy outputs equal ``target.generate``
for the same prompt whatever the batch around it.
"""
from __future__ import annotations

import itertools
import logging
import threading
import weakref
from typing import Any, Sequence

import torch
from transformers import GenerationConfig, LogitsProcessorList, PreTrainedModel

from adaspec_hf.config import EngineConfig
from adaspec_hf.core import GenerationStats, build_proposer, draw_keys
from adaspec_hf.core.architecture import check_cache_support
from adaspec_hf.efficiency.latency import LatencyModel
from adaspec_hf.core.vocab import check_vocab
from adaspec_hf.policies import DraftPolicy
from adaspec_hf.policies.registry import make_policy
from adaspec_hf.policies.slo import SLOPlanner
from adaspec_hf.serving.admission import Admission, EDFQueue
from adaspec_hf.serving.batch import RunningBatch, interrupted
from adaspec_hf.serving.claims import claim_policy
from adaspec_hf.serving.handle import Chunk, EngineClosed, RequestHandle, RequestResult
from adaspec_hf.serving.intake import Intake
from adaspec_hf.serving.requests import Request
from adaspec_hf.serving.settings import engine_config, recorded
from adaspec_hf.slo import SLO

logger = logging.getLogger("adaspec_hf")

# SLOPlanner stays importable from here for code written before it moved to adaspec_hf.policies.slo
__all__ = ["Chunk", "Engine", "EngineClosed", "RequestHandle", "RequestResult", "SLO", "SLOPlanner"]

STEP_HISTORY = 4096  # step records an engine keeps (totals count every step); bounded memory
IDLE_POLL_S = 0.1  # an idle step loop re-checks for work (and for its engine being dropped) this often
_told_about_threads = False  # the background-loop-on-CPU note is logged once per process


def _engine_thread(ref: "weakref.ref[Engine]") -> None:
    """The step loop. It holds its engine only during an iteration, so an engine dropped without
    close() is collected and its thread ends (within ``IDLE_POLL_S``)."""
    while True:
        engine = ref()
        if engine is None:
            return
        state = engine._tick()
        if state == "stop":
            engine._released = True  # the policy may serve another engine
            return
        if state == "idle":
            wake = engine._wake
            with wake:
                if engine._idle_locked():
                    engine = None
                    wake.wait(timeout=IDLE_POLL_S)
        engine = None


def _note_background_loop(device: torch.device) -> None:
    """Say once that on a CPU the background loop is the slower way to step (see Engine.run)."""
    global _told_about_threads
    if device.type == "cpu" and not _told_about_threads:
        _told_about_threads = True
        logger.info("adaspec engine: stepping on a background thread; on a CPU this runs 1.2-1.7x slower "
                    "than in the thread that loaded the model (OpenMP); Engine(..., start=False).run() "
                    "steps in the calling thread")


def _wake_up(cond: threading.Condition) -> None:
    with cond:
        cond.notify_all()


class Engine:
    """Continuous-batching speculative engine with per-request SLOs; see the module docstring.

    ``config``: an :class:`~adaspec_hf.config.EngineConfig` (defaults: ``policy="slo"``, 8 rows, no
    cache bound). ``policy``, ``max_rows``, ``max_cached_tokens``, ``compaction_threshold``,
    ``seed``, ``best_effort_wait_s`` and ``prompt_lookup`` are shorthands for its fields (one given both ways with two
    values is an error); ``policy`` may also be a ready :class:`~adaspec_hf.policies.DraftPolicy`.
    ``max_cached_tokens`` bounds each model's KV cache slots (rows x cache length, left padding and
    holes included) at every forward: a request joins only while rows x the longest request
    (prompt + max_new_tokens) fits, speculation is capped to the room left, and the caches are
    compacted when needed (a request that alone exceeds it is refused). ``seed``: per-request
    sampling keys, drawn in submission order (see :meth:`submit`). ``latency``: a
    :class:`~adaspec_hf.efficiency.latency.LatencyModel` for admission decisions (default: the
    policy's, if it has one). The settings that ran are ``engine.config`` and in :meth:`summary`.
    ``draft=None`` with ``prompt_lookup=True``: requests are drafted by prompt lookup alone.
    """

    def __init__(self, target: PreTrainedModel, draft: PreTrainedModel | None, tokenizer=None,
                 policy: "str | DraftPolicy | None" = None, *, config: EngineConfig | None = None,
                 max_rows: int | None = None, max_cached_tokens: int | None = None,
                 compaction_threshold: float | None = None, seed: int | None = None,
                 latency: LatencyModel | None = None, best_effort_wait_s: float | None = None,
                 prompt_lookup: bool | None = None, start: bool = True):
        check_cache_support(target)
        if draft is not None:
            check_cache_support(draft)
            check_vocab(target, draft)
        cfg = engine_config(config, policy, max_rows=max_rows, max_cached_tokens=max_cached_tokens,
                            compaction_threshold=compaction_threshold, seed=seed,
                            best_effort_wait_s=best_effort_wait_s, prompt_lookup=prompt_lookup)
        self.target, self.draft, self.tokenizer = target, draft, tokenizer
        self._released = False
        self._inline: threading.Event | None = None  # set while run() is the step loop; its end is signalled
        self._inline_thread: threading.Thread | None = None  # the thread run() steps in
        self.policy = make_policy(policy if isinstance(policy, DraftPolicy) else cfg.policy, target, draft,
                                  config=cfg.adaptive)
        claim_policy(self.policy, self)  # before reset(): never disturb another engine's policy
        self.policy.reset()
        self.config = recorded(cfg, self.policy)
        self.proposer = build_proposer(cfg.adaptive, self.policy, has_draft=draft is not None)
        self.max_rows, self.max_cached_tokens = cfg.max_rows, cfg.max_cached_tokens
        self.device = target.device
        self.generator = torch.Generator(device=self.device)
        self._key_gen = torch.Generator()  # per-request sampling keys, drawn in submission order
        if cfg.seed is None:
            self.generator.seed()
            self._key_gen.seed()
        else:
            self.generator.manual_seed(cfg.seed)
            self._key_gen.manual_seed(cfg.seed)
        self.stats = GenerationStats(policy=self.policy.name, history=STEP_HISTORY, config=self.config.to_dict())
        self._intake = Intake(target, draft, tokenizer, max_cached_tokens=cfg.max_cached_tokens)
        self._admission = Admission(latency if latency is not None else self.policy.latency, cfg.best_effort_wait_s,
                                    cfg.max_rows, cfg.max_cached_tokens)
        self._batch = RunningBatch(target, draft, tokenizer, self.policy, stats=self.stats, generator=self.generator,
                                   proposer=self.proposer, max_cached_tokens=cfg.max_cached_tokens,
                                   compaction_threshold=cfg.adaptive.compaction_threshold)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._incoming: list[Request] = []
        self._queue = EDFQueue()
        self._closing = False
        self._abort = False
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=_engine_thread, args=(weakref.ref(self),), name="adaspec-engine",
                                        daemon=True)
        weakref.finalize(self, _wake_up, self._wake)  # dropped without close(): the idle loop wakes, ends
        if start:
            _note_background_loop(self.device)
            self._thread.start()

    # ------------------------------------------------------------------------------ public API
    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(drain=exc_type is None)

    def submit(
        self,
        prompt: "str | Sequence[int] | torch.Tensor",
        max_new_tokens: int = 64,
        *,
        do_sample: bool = False,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        eos_token_id: "int | list[int] | None" = None,
        stop: "str | list[str] | None" = None,
        slo: "SLO | dict | None" = None,
        logits_processor: LogitsProcessorList | None = None,
        generation_config: GenerationConfig | None = None,
        seed: int | None = None,
        **generation_kwargs: Any,
    ) -> RequestHandle:
        """Queue a request. Invalid arguments raise here (``ValueError``) and affect nothing else.

        ``eos_token_id=None`` uses the target's generation config (``[]`` disables EOS);
        ``stop``: stop strings (need a tokenizer), matched as ``generate(stop_strings=...)`` matches
        them: token by token, ending at the token that completes one; other sampling arguments are
        those of HF ``generate`` and build the same logits processors it would. ``seed``: the
        request's own sampling seed (an int in [0, 2**63)); without it the key comes from
        ``Engine(seed=)`` in submission order. Either way a sampled request's text does not depend
        on the batch around it, on what was drafted, or on the machine's speed.
        """
        if self._dead is not None:
            raise EngineClosed(f"the engine's step loop stopped: {self._dead!r}")
        if self._closing:
            raise EngineClosed("the engine is closed")
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
        sampling.update(generation_kwargs)
        rid = next(self._ids)
        req = self._intake.request(rid, RequestHandle(self, rid), prompt, max_new_tokens, do_sample=do_sample,
                                   sampling=sampling, eos_token_id=eos_token_id, stop=stop, slo=slo,
                                   logits_processor=logits_processor, generation_config=generation_config,
                                   seed=seed)
        with self._lock:
            if self._closing or self._dead is not None:
                raise EngineClosed("the engine is closed")
            req.key = int(seed) if seed is not None else int(draw_keys(1, self._key_gen)[0])
            self._incoming.append(req)
            self._wake.notify_all()
        return req.handle

    def generate(self, prompt, max_new_tokens: int = 64, **kwargs) -> RequestResult:
        """Submit and wait (convenience)."""
        return self.submit(prompt, max_new_tokens, **kwargs).result()

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting requests; ``drain=True`` finishes queued and running ones, ``False`` cancels
        them. Waits for the step loop to end (at most ``timeout`` seconds)."""
        with self._lock:
            self._closing = True
            if not drain:
                self._abort = True
            self._wake.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        elif self._inline is not None:  # run() is the loop, in some thread: it stops, then it is done
            if threading.current_thread() is not self._inline_thread:
                self._inline.wait(timeout)
        elif not self._thread.is_alive() and not self._thread.ident:
            self._cancel_incoming()  # the loop never started
            self._released = True

    def start(self) -> None:
        """Start the step loop (``Engine(..., start=False)``); a no-op while it runs."""
        with self._lock:
            if self._thread.is_alive():
                return
            if self._inline is not None:
                raise RuntimeError("the step loop already runs in a caller's thread (Engine.run)")
            if self._closing or self._thread.ident is not None:
                raise EngineClosed("the engine is closed; create a new Engine")
            _note_background_loop(self.device)
            self._thread.start()

    def run(self) -> None:
        """Run the step loop in the calling thread until :meth:`close` (from another thread): for
        ``Engine(..., start=False)``, while other threads submit and read results. A Ctrl-C here
        resolves every handle (:class:`EngineClosed`) and then propagates.

        Why: on a CPU, PyTorch's OpenMP runtime (libgomp) runs the forwards of a second thread
        throttled once the main thread has its own pool (it has, once it loaded a model or ran any
        forward): on this project's 2-core reference machine the same 4 requests took 1.2-1.7x as
        long stepped by the background thread as in the main thread, and in the serving benchmark
        no speculation's TPOT went from 104.7 ms to 47.7 ms (0.99 req/s). Run the engine here from
        the main thread (e.g. a script or server whose request handlers live on other threads)."""
        with self._lock:
            if self._thread.ident is not None:
                raise RuntimeError("the step loop already runs in the engine's own thread; create the "
                                   "Engine with start=False to run it in this thread")
            if self._closing and self._released:
                raise EngineClosed("the engine is closed; create a new Engine")
            if self._inline is not None:
                raise RuntimeError("Engine.run() is already running")
            self._inline, self._inline_thread = threading.Event(), threading.current_thread()
        try:
            while True:
                state = self._tick()
                if state == "stop":
                    if self._dead is not None and not isinstance(self._dead, Exception):
                        raise self._dead  # a Ctrl-C (or SystemExit) here: every handle has resolved, now stop
                    return
                if state == "idle":
                    with self._wake:
                        if self._idle_locked():
                            self._wake.wait(timeout=IDLE_POLL_S)
        finally:
            self._released = True  # the policy may serve another engine
            self._inline.set()

    @property
    def closed(self) -> bool:
        inline_done = self._inline is None or self._inline.is_set()
        return self._closing and not self._thread.is_alive() and inline_done

    @property
    def released(self) -> bool:
        """The step loop has ended (or never started and the engine is closed): the policy is free."""
        return self._released

    @property
    def running(self) -> int:
        return len(self._batch.running)

    @property
    def queued(self) -> int:
        with self._lock:
            return len(self._incoming) + len(self._queue)

    @property
    def deferred_admissions(self) -> int:
        """Admissions postponed to protect running TPOT objectives."""
        return self._admission.deferred

    def summary(self) -> dict:
        """The step statistics' summary plus what ran: the configuration and admission counts
        (e.g. for benchmark JSON)."""
        return {**self.stats.summary(), "deferred_admissions": self.deferred_admissions}

    # ---------------------------------------------------------------------------- step loop
    def _poke(self) -> None:
        with self._lock:
            self._wake.notify_all()

    def _tick(self) -> str:
        """One iteration of the step loop: "busy" (stepped), "idle" (nothing to run) or "stop".
        A failure is contained to its request or step; only an interrupt (KeyboardInterrupt,
        SystemExit) stops the loop, and then every handle still resolves."""
        batch = self._batch
        try:
            with torch.no_grad():
                with self._lock:
                    incoming, self._incoming = self._incoming, []
                    abort = self._abort
                for r in incoming:
                    self._queue.push(r, self._admission.priority(r))
                if abort:
                    self._cancel_all()
                    return "stop"
                self._reap_cancelled()
                if not batch.sync():
                    return "busy"  # rows could not be dropped yet: retried next iteration, no step
                self._admission.admit(self._queue, batch)
                if not batch.sync():  # a newcomer that failed right after its merge
                    return "busy"
                if batch.rows == 0:
                    with self._lock:
                        if self._closing and not self._incoming and not self._queue:
                            return "stop"  # drained
                    return "idle"
                batch.step()
                return "busy"
        except BaseException as e:  # noqa: BLE001 - fail everything clearly, never hang callers
            logger.exception("adaspec engine loop died")
            self._dead = e
            self._fail_all(e)
            return "stop"

    def _idle_locked(self) -> bool:
        """With the lock held: nothing to do until a submit, a cancel or close() wakes the loop."""
        return not (self._incoming or self._abort or self._queue or self._closing)

    def _reap_cancelled(self) -> None:
        """Cancelled requests leave at once, running or queued (wherever they are in the queue)."""
        for r in self._queue.take(lambda r: r.handle._cancel):
            self._batch.finish(r, "cancelled")
        for r in [r for r in self._batch.running.values() if r.handle._cancel]:
            self._batch.finish(r, "cancelled")

    def _cancel_all(self) -> None:
        for r in self._queue.drain():
            self._batch.finish(r, "cancelled")
        self._batch.cancel_all()
        self._cancel_incoming()

    def _cancel_incoming(self) -> None:
        with self._lock:
            late, self._incoming = self._incoming, []
        for r in late:
            self._batch.finish(r, "cancelled")

    def _fail_all(self, e: BaseException) -> None:
        """The loop stops: every request not yet resolved fails (an interrupt as :class:`EngineClosed`)."""
        if not isinstance(e, Exception):
            e = interrupted(e)
        with self._lock:
            late, self._incoming = self._incoming, []
            self._closing = True
        for r in self._queue.drain() + list(self._batch.running.values()) + late:
            if not r.handle.done():
                r.failed = e if r.failed is None or not isinstance(r.failed, Exception) else r.failed
                self._batch.finish(r, "error")
