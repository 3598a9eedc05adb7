"""The running requests as :class:`~adaspec_hf.core.SpecStep` sees them (rows keyed by request id):
each row's own tokens, sampling mode, sampling key, logits processors and latency objective, and
where its emitted tokens go. A request whose processor fails fails alone; the step goes on."""
from __future__ import annotations

import math
import time
import weakref
from typing import TYPE_CHECKING

import torch

from adaspec_hf.core import RowSource
from adaspec_hf.core.processing import Processing
from adaspec_hf.policies import StepContext
from adaspec_hf.serving.requests import Request

if TYPE_CHECKING:  # pragma: no cover
    from adaspec_hf.serving.batch import RunningBatch


def fail(r: Request, e: BaseException) -> None:
    """Mark ``r`` failed (its first error is the one it reports); it leaves after this step."""
    if r.failed is None:
        r.failed = e


class RequestRows(RowSource):
    """The step's view of a :class:`~adaspec_hf.serving.batch.RunningBatch`'s requests."""

    def __init__(self, owner: "RunningBatch"):
        # weak, and the request cache is cleared after each step: an engine dropped without close()
        # is then freed by reference counting (no cycle), which ends its thread
        self.owner = weakref.proxy(owner)
        self._cache: tuple[list[int], list[Request]] | None = None
        self.finish_reason: dict[int, str] = {}

    def clear(self) -> None:
        """Forget the step's rows (call after each step, also a failed one)."""
        self._cache = None

    def reqs(self, rid: torch.Tensor) -> list[Request]:
        ids = rid.tolist()
        if self._cache is None or self._cache[0] != ids:
            self._cache = (ids, [self.owner.running[i] for i in ids])
        return self._cache[1]

    def sample_keys(self, rid):
        return torch.tensor([r.key for r in self.reqs(rid)], dtype=torch.long, device=rid.device)

    def fail_rows(self, rid, bad, error):
        for r, b in zip(self.reqs(rid), bad.tolist()):
            if b:
                fail(r, error)

    def remaining(self, rid):
        return torch.tensor([r.max_new - r.n_gen for r in self.reqs(rid)], dtype=torch.long, device=rid.device)

    def committed(self, rid, start, width):
        rows = []
        for r, s in zip(self.reqs(rid), start.tolist()):
            piece = r.buf[s: s + width]
            if piece.shape[0] < width:
                piece = torch.cat([piece, piece.new_zeros(width - piece.shape[0])])
            rows.append(piece)
        return torch.stack(rows).to(rid.device)

    def token_at(self, rid, position):
        return torch.stack([r.buf[p] for r, p in zip(self.reqs(rid), position.tolist())]).to(rid.device)

    def prefix_fn(self, rid):
        reqs = self.reqs(rid)

        def prefix_of(rows: torch.Tensor, paths: torch.Tensor, depths: torch.Tensor | None = None):
            dl = depths.tolist() if depths is not None else [paths.shape[1]] * len(rows)
            res = []
            for i, path, d in zip(rows.tolist(), paths, dl):
                r = reqs[i]
                res.append((i, torch.cat([r.buf[: r.n], path[:d].to(r.buf.device)])))
            return res
        return prefix_of

    def process_fn(self, rid):
        reqs = self.reqs(rid)
        if all(r.processing is None for r in reqs):
            return None
        groups: dict[int, tuple[Processing, list[int]]] = {}
        for i, r in enumerate(reqs):
            if r.processing is not None:
                groups.setdefault(id(r.processing), (r.processing, []))[1].append(i)

        def process(scores: torch.Tensor, prefixes) -> torch.Tensor:
            b = len(reqs)
            k = scores.shape[0] // b
            if k * b != scores.shape[0]:
                raise RuntimeError("processor lines are not laid out row-major over the batch")
            out = scores.clone()
            items = None
            for proc, rows in groups.values():
                if proc.input_free:  # one call for every row sharing these stateless settings
                    lines = torch.cat([torch.arange(i * k, (i + 1) * k) for i in rows]).to(scores.device)
                    try:
                        out[lines] = proc(scores[lines], list)
                    except Exception as e:  # noqa: BLE001 - a request's processor fails that request only
                        for i in rows:
                            fail(reqs[i], e)
                    continue
                for i in rows:
                    lines = torch.arange(i * k, (i + 1) * k, device=scores.device)
                    try:
                        if items is None:
                            items = prefixes()
                        mine = [(0, items[j][1]) for j in lines.tolist()]
                        out[lines] = proc(scores[lines], lambda mine=mine: mine)
                    except Exception as e:  # noqa: BLE001
                        fail(reqs[i], e)
            return out
        return process

    def sampling(self, rid):
        flags = [r.do_sample for r in self.reqs(rid)]
        if all(flags) or not any(flags):
            return bool(flags[0]) if flags else False
        return torch.tensor(flags, dtype=torch.bool, device=rid.device)

    def context(self, **kw):
        """The step context plus each row's TPOT objective and how far behind its track it is."""
        now = time.perf_counter()
        tau = self.owner.step_ema
        tpot, need, rate = [], [], []
        for r in self.reqs(kw["row_ids"]):
            t = r.slo.tpot if r.slo is not None else math.inf
            tpot.append(t)
            if math.isfinite(t) and r.t_first is not None:
                need.append(1.0 + (now + tau - r.t_first) / t - r.n_gen)
                left = r.t_first + (r.max_new - 1) * t - now
                rate.append((r.max_new - r.n_gen) * tau / left if left > 0 else math.inf)
            else:
                need.append(0.0)
                rate.append(0.0)
        dev = kw["context_len"].device
        return StepContext(**kw, tpot=torch.tensor(tpot, device=dev),
                           tokens_needed=torch.tensor(need, device=dev), step_time=tau,
                           rate_needed=torch.tensor(rate, device=dev))

    def commit(self, rid, emitted, n_emit, scores, raw, source):
        now = time.perf_counter()
        done = []
        for r, toks, n in zip(self.reqs(rid), emitted.tolist(), n_emit.tolist()):
            if r.failed is not None:
                done.append(True)
                continue
            try:
                reason = self.owner.commit(r, toks[:n], now)
            except Exception as e:  # noqa: BLE001 - e.g. a stop-string criterion or the decode raised
                fail(r, e)
                reason = "error"
            if reason is not None:
                self.finish_reason[r.id] = reason
            done.append(reason is not None)
        return torch.tensor(done, dtype=torch.bool, device=rid.device)
