"""Who joins the running batch next, and when: an earliest-deadline-first queue (latest start =
TTFT deadline minus the predicted prefill), the KV cache slot bound, and the check that one more
row does not make a running request miss a TPOT objective it would otherwise meet."""
from __future__ import annotations

import heapq
import math
import time
from typing import TYPE_CHECKING, Callable, Iterator

from adaspec_hf.efficiency.latency import LatencyModel
from adaspec_hf.serving.requests import Request

if TYPE_CHECKING:  # pragma: no cover
    from adaspec_hf.serving.batch import RunningBatch

PREFILL_EMA = 0.2  # weight of one observed prefill in the running corrections
MAX_LOG_RATIO = 3.0  # observed / predicted prefill is clamped to e^+-3: one outlier cannot swamp it
DEFAULT_CONTEXT = 64.0  # tokens per row assumed for a step-time ratio when no row is running
URGENT_STEPS = 2.0  # a newcomer whose deadline is within its prefill plus this many steps cannot wait
PRIOR_STEPS = 2.0  # pseudo-steps of the batch's tokens-per-step mix into a row's own rate


class EDFQueue:
    """Requests waiting to join, earliest latest-start first (arrival, then id, break ties)."""

    def __init__(self):
        self._heap: list[tuple[float, float, int, Request]] = []

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Request]:
        return (item[3] for item in self._heap)

    def push(self, r: Request, priority: float) -> None:
        heapq.heappush(self._heap, (priority, r.arrival, r.id, r))

    def peek(self) -> Request:
        return self._heap[0][3]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[3]

    def take(self, which: Callable[[Request], bool]) -> list[Request]:
        """Remove and return the requests ``which`` picks, wherever they are in the queue."""
        if not any(which(item[3]) for item in self._heap):
            return []
        taken = [item[3] for item in self._heap if which(item[3])]
        self._heap = [item for item in self._heap if not which(item[3])]
        heapq.heapify(self._heap)
        return taken

    def drain(self) -> list[Request]:
        out, self._heap = [item[3] for item in self._heap], []
        return out


class Admission:
    """Admission decisions from a latency model (if any) corrected by the prefills observed."""

    def __init__(self, latency: LatencyModel | None, best_effort_wait_s: float, max_rows: int,
                 max_cached_tokens: int | None):
        self.latency = latency
        self.best_effort_wait_s = float(best_effort_wait_s)
        self.max_rows, self.max_cached_tokens = max_rows, max_cached_tokens
        self.deferred = 0  # admissions postponed to protect running TPOT objectives
        self._prefill_rate: float | None = None  # seconds per prompt token (EMA of observed prefills)
        self._prefill_log_ratio = 0.0  # observed / latency-model prefill time (log EMA)

    # ------------------------------------------------------------------------ prefill time
    def priority(self, r: Request) -> float:
        """Latest start time that still meets the TTFT deadline (deadline - predicted prefill)."""
        return r.deadline - self.predict_prefill(len(r.prompt))

    def _prefill_model(self, n_tokens: int) -> float | None:
        """Prefill seconds (target + draft) for a prompt from the latency model, if it has tables."""
        lat = self.latency
        if lat is None or not lat.tables:
            return None
        try:
            return float(lat.target_time(1, n_tokens, n_tokens / 2) + lat.draft_time(1, n_tokens, n_tokens / 2))
        except Exception:  # noqa: BLE001 - a prediction is only a hint
            return None

    def predict_prefill(self, n_tokens: int) -> float:
        """Latency-model prediction corrected by observed prefills (else the observed s/token)."""
        base = self._prefill_model(n_tokens)
        if base is not None:
            return base * math.exp(self._prefill_log_ratio)
        return (self._prefill_rate or 0.0) * n_tokens

    def observe_prefill(self, n_tokens: int, seconds: float) -> None:
        rate = seconds / n_tokens
        a = PREFILL_EMA
        self._prefill_rate = rate if self._prefill_rate is None else (1 - a) * self._prefill_rate + a * rate
        base = self._prefill_model(n_tokens)
        if base and seconds > 0:
            obs = min(max(math.log(seconds / base), -MAX_LOG_RATIO), MAX_LOG_RATIO)
            self._prefill_log_ratio = (1 - a) * self._prefill_log_ratio + a * obs

    # ----------------------------------------------------------------------------- decisions
    def admit_deadline(self, r: Request) -> float:
        """TTFT deadline, or for best-effort requests the latest time to start them (no starvation)."""
        return r.deadline if math.isfinite(r.deadline) else r.arrival + self.best_effort_wait_s

    def fits(self, r: Request, batch: "RunningBatch") -> bool:
        """Would the batch with ``r`` stay within ``max_cached_tokens``? Every row is padded to the
        longest, so the bound is rows x the longest request (prompt + max_new_tokens): after a
        compaction, even the last one-token step of every row then fits."""
        if self.max_cached_tokens is None:
            return True
        longest = max([q.reserve for q in batch.running.values()] + [r.reserve])
        return (len(batch.running) + 1) * longest <= self.max_cached_tokens

    def step_ratio(self, batch: "RunningBatch") -> float:
        """Predicted step time with one more row over that now (latency model, else linear)."""
        rows = batch.rows
        if self.latency is not None and rows > 0:
            q = 1.0 + batch.drafted_ema
            ctx = float(batch.batch.length.float().mean()) if rows else DEFAULT_CONTEXT
            try:
                now = self.latency.target_time(rows, q, ctx)
                more = self.latency.target_time(rows + 1, q, ctx)
                if now > 0 and more > 0:
                    return more / now
            except Exception:  # noqa: BLE001 - a prediction is only a hint
                pass
        return (rows + 1) / max(rows, 1)

    def tpot_risk(self, batch: "RunningBatch", now: float, stall: float) -> bool:
        """Would one more row (and ``stall`` seconds of prefill) make a running request miss a TPOT
        objective it would otherwise meet? Projected from each row's tokens per step so far."""
        if batch.rows == 0 or batch.step_ema <= 0:
            return False
        t_cur = batch.step_ema
        t_new = t_cur * self.step_ratio(batch)
        for r in batch.running.values():
            if r.slo is None or r.slo.tpot_ms is None or r.t_first is None:
                continue
            left = r.max_new - r.n_gen
            if left <= 0:
                continue
            per_step = (r.n_gen - 1 + PRIOR_STEPS * batch.tokens_ema) / (r.steps + PRIOR_STEPS)
            allowed = r.t_first + (r.max_new - 1) * r.slo.tpot
            if now + left / per_step * t_cur <= allowed < now + stall + left / per_step * t_new:
                return True
        return False

    def admit(self, queue: EDFQueue, batch: "RunningBatch") -> None:
        """Earliest deadline first. Into a running batch, a request is admitted when no running
        request's TPOT objective is put at risk by the larger batch and the prefill stall, or when
        its own TTFT deadline cannot wait any longer. A newcomer whose merge failed goes back to
        the queue and lets a step run first."""
        stall = 0.0
        while queue and batch.rows < self.max_rows:
            r = queue.peek()
            if not self.fits(r, batch):
                break
            cost = self.predict_prefill(len(r.prompt))
            if batch.rows:
                now = time.perf_counter()
                urgent = self.admit_deadline(r) - now <= cost + URGENT_STEPS * batch.step_ema
                if not urgent and self.tpot_risk(batch, now, stall + cost):
                    self.deferred += 1
                    break
            queue.pop()
            outcome = batch.prefill(r)
            if outcome.prefill_s is not None:
                self.observe_prefill(len(r.prompt), outcome.prefill_s)
            if outcome.retry:
                queue.push(r, self.priority(r))
                break
            stall += cost
