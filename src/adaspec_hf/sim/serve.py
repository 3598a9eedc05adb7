"""Serving, simulated: requests arrive, share a continuously batched step loop, and are judged by
their own TPOT / TTFT objectives, with steps charged by a cost curve and acceptance read from a
trace (no timing noise, seconds per run).

Why: whether SLO-first selection raises a tight class's attainment depends on the cost curve (on a
CPU every extra verified token slows the whole batch; on a GPU verify is flat up to a token budget)
and on load, and a real serving run on this machine cannot show the GPU regime. The policy object
is the real one: it sees the same per-row objectives the engine gives it (``tpot``,
``tokens_needed``, ``rate_needed``, ``step_time``, computed as :mod:`adaspec_hf.serving.rows` does)
and the same outcomes.

Model of the engine: first come, first served admission up to ``max_rows``; a new request's prefill
(``cost.verify(1, prompt_len, 0)``) runs before the next step and yields its first token; every step
of the running batch is :func:`~adaspec_hf.sim.simulate.sim_step`; a request leaves at its
trace row's length.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from adaspec_hf.policies.base import DraftPolicy, StepContext
from adaspec_hf.sim.cost import CostCurve
from adaspec_hf.core.step import TimedPolicy
from adaspec_hf.sim.simulate import sim_step
from adaspec_hf.sim.trace import Trace

STEP_EMA = 0.2  # weight of one step in the running step-time estimate (as the engine's)


@dataclass
class SimRequest:
    row: int  # trace row
    arrival: float
    tpot: float  # seconds per token objective (inf: none)
    ttft: float  # seconds to first token objective (inf: none)
    cls: str = ""
    t_first: float | None = None
    t_done: float | None = None
    n_gen: int = 0

    @property
    def met(self) -> bool:
        if self.t_done is None or self.t_first is None:
            return False
        tpot = (self.t_done - self.t_first) / max(self.n_gen - 1, 1)
        return tpot <= self.tpot and self.t_first - self.arrival <= self.ttft


@dataclass
class ServeResult:
    policy: str
    requests: list[SimRequest] = field(default_factory=list)
    duration: float = 0.0
    steps: int = 0

    def attainment(self, cls: str | None = None) -> float:
        rs = [r for r in self.requests if cls is None or r.cls == cls]
        return sum(r.met for r in rs) / len(rs) if rs else math.nan

    def goodput(self, cls: str | None = None) -> float:
        """Tokens of requests that met their objectives, per simulated second."""
        rs = [r for r in self.requests if (cls is None or r.cls == cls) and r.met]
        return sum(r.n_gen for r in rs) / self.duration if self.duration > 0 else 0.0

    def summary(self, classes: list[str]) -> dict:
        return {"policy": self.policy, "attainment": round(self.attainment(), 4), "goodput": round(self.goodput(), 3),
                "attainment_by_class": {c: round(self.attainment(c), 4) for c in classes},
                "goodput_by_class": {c: round(self.goodput(c), 3) for c in classes},
                "steps": self.steps, "duration_s": round(self.duration, 4)}


def simulate_serving(policy: DraftPolicy, trace: Trace, cost: CostCurve, requests: list[SimRequest], *,
                     max_rows: int = 8) -> ServeResult:
    """Replay ``requests`` (sorted by arrival; each one reads its ``row`` of ``trace``) through a
    continuously batched loop under ``policy``; returns every request with its timings."""
    reqs = [SimRequest(r.row, r.arrival, r.tpot, r.ttft, r.cls) for r in sorted(requests, key=lambda r: r.arrival)]
    res = ServeResult(policy=policy.name, requests=reqs)
    call = TimedPolicy(policy)
    call.reset()
    now, tau, nxt, step = 0.0, None, 0, 0
    running: list[int] = []
    while nxt < len(reqs) or running:
        if not running and nxt < len(reqs) and reqs[nxt].arrival > now:
            now = reqs[nxt].arrival  # idle until the next arrival
        while nxt < len(reqs) and reqs[nxt].arrival <= now and len(running) < max_rows:
            r = reqs[nxt]
            row = trace.rows[r.row]
            now += cost.verify(1, row.prompt_len, 0.0)  # its prefill yields the first token
            r.t_first, r.n_gen = now, 1
            if r.n_gen >= row.length:
                r.t_done = now
            else:
                running.append(nxt)
            nxt += 1
        if not running:
            continue
        step += 1
        rows = [trace.rows[reqs[i].row] for i in running]
        n_gen = [reqs[i].n_gen for i in running]
        remaining = torch.tensor([row.length - g for row, g in zip(rows, n_gen)], dtype=torch.long)
        length = torch.tensor([row.prompt_len + g for row, g in zip(rows, n_gen)], dtype=torch.long)
        est = tau if tau is not None else cost.overhead + cost.verify(len(running), 1, float(length.float().mean()))
        tpot, need, rate = [], [], []
        for i in running:
            r = reqs[i]
            tpot.append(r.tpot)
            if math.isfinite(r.tpot):
                need.append(1.0 + (now + est - r.t_first) / r.tpot - r.n_gen)
                left = r.t_first + (trace.rows[r.row].length - 1) * r.tpot - now
                rate.append((trace.rows[r.row].length - r.n_gen) * est / left if left > 0 else math.inf)
            else:
                need.append(0.0)
                rate.append(0.0)
        ctx = StepContext(rows=len(running), context_len=length, remaining=remaining, sampling=trace.sampling,
                          step=step, row_ids=torch.tensor(running, dtype=torch.long), tpot=torch.tensor(tpot),
                          tokens_needed=torch.tensor(need), step_time=est, rate_needed=torch.tensor(rate))
        out = sim_step(call, rows, n_gen, ctx, cost, max(1, policy.max_children))
        now += out.step_time
        tau = out.step_time if tau is None else (1 - STEP_EMA) * tau + STEP_EMA * out.step_time
        res.steps += 1
        emit = torch.minimum(out.n_accepted + 1, remaining).tolist()
        still = []
        for i, e in zip(running, emit):
            r = reqs[i]
            r.n_gen += e
            if r.n_gen >= trace.rows[r.row].length:
                r.t_done = now
                call.forget(i)
            else:
                still.append(i)
        running = still
    res.duration = max((r.t_done for r in reqs if r.t_done is not None), default=0.0) - min(
        (r.arrival for r in reqs), default=0.0)
    return res


def poisson_requests(n: int, rate: float, n_rows: int, classes: list[tuple[str, float, float, float]], *,
                     seed: int = 0, cv: float = 1.0) -> list[SimRequest]:
    """``n`` requests at ``rate`` per second (exponential gaps, or gamma with coefficient of
    variation ``cv`` for bursts), rows drawn in turn from ``n_rows`` trace rows, classes
    ``(name, tpot_s, ttft_s, weight)`` drawn by weight."""
    rng = np.random.default_rng(seed)
    shape = 1.0 / (cv * cv)
    t = np.cumsum(rng.gamma(shape, 1.0 / (shape * rate), n)).tolist()
    w = np.asarray([c[3] for c in classes], dtype=float)
    pick = rng.choice(len(classes), size=n, p=w / w.sum()).tolist()
    return [SimRequest(row=i % n_rows, arrival=t[i], tpot=classes[k][1], ttft=classes[k][2], cls=classes[k][0])
            for i, k in enumerate(pick)]
