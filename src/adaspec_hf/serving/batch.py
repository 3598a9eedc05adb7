"""The running batch: its requests, its caches and the speculative step over them.

Every change to the caches is all or nothing (:meth:`RowBatch.atomic
<adaspec_hf.core.RowBatch.atomic>`): a newcomer's merge, a step, dropping finished rows, a
compaction. A failure (say, out of memory) is rolled back and retried; only when it repeats does it
fail the newcomer alone, or that step's rows. Between steps, finished and cancelled requests leave
(``KVState.select_rows``) and a newcomer is prefilled alone and merged in (``KVState.append_rows``).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from adaspec_hf.core import NO_TOKEN_MESSAGE, GenerationStats, Proposer, RowBatch, SpecStep
from adaspec_hf.core.race import NO_TOKEN, race_sample
from adaspec_hf.policies import DraftPolicy
from adaspec_hf.serving import requests
from adaspec_hf.serving.handle import EngineClosed
from adaspec_hf.serving.requests import Request
from adaspec_hf.serving.rows import RequestRows

logger = logging.getLogger("adaspec_hf")

STEP_RETRIES = 1  # a failed step is rolled back and retried this often before its rows fail
SURGERY_RETRIES = 1  # same for dropping rows / compacting (a transient OOM costs no request)
MERGE_RETRIES = 1  # a newcomer whose merge into the batch failed is prefilled again this often
STEP_EMA = 0.2  # weight of one step in the running step time / tokens / drafted estimates


@dataclass
class Prefilled:
    """How a newcomer's prefill went: ``retry``: its merge failed and it should queue again;
    ``prefill_s``: the prefill's measured seconds (None when the prefill itself failed)."""

    retry: bool = False
    prefill_s: float | None = None


def _draft_length(batch: RowBatch) -> int:
    """Draft-cache slots per row (0 without a draft model: prompt lookup alone)."""
    return batch.dkv.length if batch.dkv is not None else 0


def free_memory(device: torch.device) -> None:
    """After an allocation failure: hand cached accelerator blocks back before a retry."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


class RunningBatch:
    """The requests in the batch (``running``, by id), their caches (``batch``) and the step."""

    def __init__(self, target: PreTrainedModel, draft: PreTrainedModel | None, tokenizer, policy: DraftPolicy, *,
                 stats: GenerationStats, generator: torch.Generator, max_cached_tokens: int | None,
                 compaction_threshold: float, proposer: Proposer | None = None):
        self.target, self.draft, self.tokenizer, self.policy = target, draft, tokenizer, policy
        # tokenizers that clean up spaces rewrite the end of a partial decode: stream only what settled
        self.cleans_up = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self.stats = stats
        self.device = target.device
        self.max_cached_tokens, self.compaction_threshold = max_cached_tokens, compaction_threshold
        self.running: dict[int, Request] = {}
        self.batch = RowBatch(target, draft)
        self.view = RequestRows(self)
        self.stepper = SpecStep(policy, proposer=proposer, draft_sampling=False, generator=generator)
        self.step_no = 0
        self.step_ema = 0.0
        self.tokens_ema = 1.0  # emitted tokens per row per step
        self.drafted_ema = 0.0  # verified draft nodes per row per step
        self._step_failures = 0  # consecutive failed steps (rolled back, retried)
        self._surgery_failures = 0  # consecutive failed row drops / compactions

    @property
    def rows(self) -> int:
        return self.batch.rows

    def _empty(self) -> RowBatch:
        return RowBatch(self.target, self.draft)

    # ----------------------------------------------------------------------------- requests
    def finish(self, r: Request, reason: str) -> None:
        """``r`` leaves (its row goes at the next :meth:`sync`); its handle resolves. Never raises."""
        try:
            self.running.pop(r.id, None)
            self.policy.forget(r.id)
        except Exception:  # noqa: BLE001 - a policy's bookkeeping cannot keep a handle unresolved
            logger.exception("adaspec engine: dropping request %d's policy state failed", r.id)
        requests.resolve(r, reason, self.tokenizer)

    def commit(self, r: Request, toks: list[int], now: float) -> str | None:
        kept, reason = requests.commit(r, toks, now, self.tokenizer, self.cleans_up)
        self.stats.new_tokens += kept
        return reason

    def first_token(self, r: Request, scores: torch.Tensor) -> int:
        """The token after the prompt: argmax, or the winner of the request's race at its position."""
        if not r.do_sample:
            return int(scores.argmax(-1)[0])
        probs = torch.softmax(scores.float(), -1).cpu()
        first = int(race_sample(probs, torch.tensor([r.key], dtype=torch.long), torch.tensor([len(r.prompt)]))[0])
        if first == NO_TOKEN:
            raise ValueError(NO_TOKEN_MESSAGE)
        return first

    def prefill(self, r: Request) -> Prefilled:
        """Prefill ``r`` alone, merge it into the batch and commit its first token."""
        t0 = time.perf_counter()
        try:
            ids = r.buf[: len(r.prompt)][None]
            rb = RowBatch(self.target, self.draft)
            logits = rb.prefill(ids, torch.ones_like(ids), torch.tensor([r.id], device=self.device))
            scores = logits
            if r.processing is not None:
                scores = r.processing(logits, lambda: [(0, ids[0])])
            first = self.first_token(r, scores)
            now = time.perf_counter()
            _, reason = r.cut([first])  # does it end right here? (then it never joins the batch)
        except Exception as e:  # noqa: BLE001 - this request fails alone
            r.failed = e
            self.finish(r, "error")
            return Prefilled()
        except BaseException as e:  # an interrupt: this request is out of the queue, not running yet
            r.failed = interrupted(e)
            self.finish(r, "error")
            raise
        done = Prefilled(prefill_s=now - t0)
        if reason is None:
            merged = self._merge(r, rb)
            if merged is not True:
                done.retry = merged is False
                return done
        try:
            reason = self.commit(r, [first], now)
        except Exception as e:  # noqa: BLE001 - e.g. the tokenizer's decode raised
            r.failed, reason = e, "error"
        if reason is not None:
            self.finish(r, reason)  # a merged row leaves at the next sync()
        return done

    def _merge(self, r: Request, rb: RowBatch) -> bool | None:
        """Join the running batch (all or nothing). True: running. False: the merge failed, ``r``
        should queue again. None: it failed for good and ``r`` failed alone."""
        try:
            if self.batch.rows:
                with self.batch.atomic():
                    if self.max_cached_tokens is not None:
                        rows, width = self.batch.rows + 1, max(self.batch.tkv.length, rb.tkv.length)
                        if rows * max(width, _draft_length(self.batch), _draft_length(rb)) > self.max_cached_tokens:
                            self.batch.force_compact()  # holes and padding out before the merge
                    self.batch.extend(rb)
            else:
                self.batch = rb
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: the batch is as it was
            r.merge_failures += 1
            free_memory(self.device)
            if r.merge_failures <= MERGE_RETRIES:
                logger.warning("adaspec engine: merging request %d failed (%r); it will be prefilled again", r.id, e)
                return False
            r.failed = e
            self.finish(r, "error")
            return None
        r.admitted = True
        self.running[r.id] = r
        return True

    # --------------------------------------------------------------------------------- step
    def step(self) -> None:
        """One speculative step of every running row (rolled back and retried on failure)."""
        batch, view = self.batch, self.view
        rid_list = batch.rid.tolist()
        self.step_no += 1
        view.finish_reason = {}
        try:
            caps = self._slot_caps()
            with batch.atomic():
                finished, record = self.stepper(batch, view, self.step_no, **caps)
        except Exception as e:  # noqa: BLE001 - rolled back: no request saw a token of this step
            view.clear()
            self._step_failures += 1
            free_memory(self.device)
            if self._step_failures <= STEP_RETRIES:
                logger.warning("adaspec engine step failed (%r); rolled back, retrying", e)
                return
            logger.exception("adaspec engine step failed again; failing the %d running requests", len(rid_list))
            self.fail_all(e)
            return
        self._step_failures = 0
        a = STEP_EMA
        self.step_ema = record.step_time if self.step_ema == 0 else (1 - a) * self.step_ema + a * record.step_time
        rows_n = max(record.rows, 1)
        self.tokens_ema = (1 - a) * self.tokens_ema + a * (1.0 + sum(record.accepted) / rows_n)
        self.drafted_ema = (1 - a) * self.drafted_ema + a * (sum(record.drafted) / rows_n)
        self.stats.record(record)
        for rq, d, acc in zip(rid_list, record.drafted, record.accepted):
            r = self.running[rq]
            r.drafted += d
            r.accepted += acc
            r.steps += 1
        fin = finished.tolist()
        for i, rq in enumerate(rid_list):
            r = self.running[rq]
            if r.failed is not None:
                self.finish(r, "error")
            elif fin[i]:
                self.finish(r, view.finish_reason.get(rq, "length"))
        view.clear()
        if self.sync():
            self._compact(force=False)

    def _slot_caps(self) -> dict:
        """Verified nodes / draft levels per row this step may add within ``max_cached_tokens``
        (compacting first when holes and padding are in the way)."""
        bound = self.max_cached_tokens
        batch = self.batch
        if bound is None or batch.rows == 0:
            return {}
        room = bound // batch.rows
        width = max(1, int(self.policy.max_children))
        # draft: catch-up on unseen committed tokens, then up to `width` fed nodes per level
        catch_up = int((batch.length - batch.draft_seen).max()) if batch.dkv is not None else 0
        need_t = batch.tkv.length + 1
        need_d = _draft_length(batch) + catch_up + width
        if need_t > room or need_d > room:
            self._compact(force=True)
            need_t = batch.tkv.length + 1
        nodes = room - need_t
        if nodes < 0:
            raise RuntimeError(f"max_cached_tokens={bound}: {batch.rows} rows x {need_t} slots do not fit")
        levels = (room - _draft_length(batch) - catch_up) // width
        return {"max_nodes": nodes, "max_depth_cap": max(0, min(nodes, levels))}

    def _compact(self, force: bool) -> None:
        """Compact the caches (all or nothing); a failure is retried at the next step."""
        try:
            with self.batch.atomic():
                if force:
                    self.batch.force_compact()
                else:
                    self.batch.maybe_compact(self.compaction_threshold)
        except Exception as e:  # noqa: BLE001 - the caches are as they were: holes cost compute, not output
            free_memory(self.device)
            logger.warning("adaspec engine: compacting the cache failed (%r); retried later", e)
            if force:
                raise

    # ------------------------------------------------------------------------ leaving rows
    def sync(self) -> bool:
        """Drop the rows whose request left (finished, cancelled, failed), all or nothing. False
        when that failed: the loop retries before any other step; after ``SURGERY_RETRIES`` the
        remaining rows fail."""
        ids = self.batch.rid.tolist()
        keep = [i for i, rq in enumerate(ids) if rq in self.running]
        if len(keep) == len(ids):
            return True
        if not keep:
            self.batch = self._empty()
            return True
        try:
            with self.batch.atomic():
                self.batch.keep(torch.tensor(keep, dtype=torch.long, device=self.device))
        except Exception as e:  # noqa: BLE001 - the batch is as it was
            self._surgery_failures += 1
            free_memory(self.device)
            if self._surgery_failures <= SURGERY_RETRIES:
                logger.warning("adaspec engine: dropping finished rows failed (%r); retrying", e)
                return False
            logger.exception("adaspec engine: could not drop finished rows; failing the batch")
            self.fail_all(e)
            return True
        self._surgery_failures = 0
        return True

    def fail_all(self, e: BaseException) -> None:
        """Fail every request of the running batch (a step or its cache surgery failed for good)."""
        for i in self.batch.rid.tolist():
            r = self.running.get(i)
            if r is not None:
                r.failed = r.failed or e
                self.finish(r, "error")
        self.batch = self._empty()
        self._step_failures = self._surgery_failures = 0

    def cancel_all(self) -> None:
        for r in list(self.running.values()):
            self.finish(r, "cancelled")
        self.batch = self._empty()


def interrupted(e: BaseException) -> EngineClosed:
    """What the requests of a loop stopped by KeyboardInterrupt / SystemExit see (raising the
    interrupt itself in a caller's thread would look like the caller's own Ctrl-C)."""
    err = EngineClosed(f"the engine's step loop was stopped by {type(e).__name__}")
    err.__cause__ = e
    return err
