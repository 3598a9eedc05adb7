"""What the planners learn about one target/draft pair, in one object: the latency model (profiled
grid + corrections), the verify costs measured while decoding, and per decoding mode the acceptance
calibration and running acceptance rate. Kept across ``generate`` calls and engines while the two
models live, so calibration carries over instead of restarting every call.

Why per mode: greedy acceptance (argmax match) and sampling acceptance (min(1, p/q)) are different
quantities of the same draft; one calibration cannot serve both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from adaspec_hf.efficiency.acceptance import AcceptanceModel
from adaspec_hf.efficiency.latency import LatencyModel

DEFAULT_COST_EMA = 0.3  # weight of one measured verify time in the observed cost table
DEFAULT_COST_CONFIRM = 3  # measurements above the profile needed before they replace it


class ObservedCosts:
    """Measured verify times per (rows, query tokens per row), as ratios to what the latency model
    predicted when each was measured.

    Why ratios and not seconds: a CPU's speed drifts by tens of percent within a minute (clocks,
    neighbours), and the latency model's running correction already follows that drift for every
    shape at once. A table of raw seconds would remember each shape at the speed of the moment it
    was last chosen, so a shape tried during a fast spell would look cheaper than the rest for good
    and the planner would stay on it; a ratio keeps only what drift cannot explain: the shape's own
    deviation from the profile's curve."""

    def __init__(self, ema: float = DEFAULT_COST_EMA, min_count: int = 1, confirm: int = DEFAULT_COST_CONFIRM):
        self.ema, self.min_count, self.confirm = ema, min_count, confirm
        self.table: dict[tuple[int, int], tuple[float, int]] = {}
        # per (rows, planner kind): EMA of a drafting step's seconds per draft level (forward + drafter +
        # policy work), which the profile's bare forwards underestimate several-fold on a CPU. Per kind
        # because that work is the planner's own: a tree planner's step (building and packing trees, a
        # dearer level rule) costs more per level than a chain planner's, and planners of one pair that
        # take turns (a benchmark, a notebook trying both) must not price their levels at each other's
        self.draft_level: dict[tuple[int, str], float] = {}
        self._draft_seen: dict[tuple[int, str], int] = {}
        self._factors: dict[int, np.ndarray] = {}  # per rows: factors(), kept up to date by add

    def add_draft(self, rows: int, levels: int, seconds: float, kind: str = "chain") -> None:
        """A step of ``kind``'s planner ("chain" or "tree") drafted ``levels`` levels in ``seconds``."""
        if levels > 0 and seconds > 0 and math.isfinite(seconds):
            key = (rows, kind)
            prev = self.draft_level.get(key)
            per = seconds / levels
            self.draft_level[key] = per if prev is None else (1 - self.ema) * prev + self.ema * per
            self._draft_seen[key] = self._draft_seen.get(key, 0) + 1

    def draft_per_level(self, rows: int, kind: str = "chain") -> float | None:
        """Measured seconds per draft level at ``rows`` by ``kind``'s planner, once seen ``min_count``
        times, else None."""
        key = (rows, kind)
        return self.draft_level.get(key) if self._draft_seen.get(key, 0) >= self.min_count else None

    def add(self, rows: int, q: int, seconds: float, predicted: float) -> None:
        """One verify of ``q`` query tokens per row took ``seconds`` where ``predicted`` was expected."""
        if not (seconds > 0 and math.isfinite(seconds) and predicted > 0 and math.isfinite(predicted)):
            return
        ratio = seconds / predicted
        prev, n = self.table.get((rows, q), (ratio, 0))
        self.table[(rows, q)] = ((1 - self.ema) * prev + self.ema * ratio if n else ratio, n + 1)
        out = self._factors.get(rows)
        if out is not None and q <= len(out):
            out[q - 1] = self._factor(rows, q)

    def _factor(self, rows: int, q: int) -> float:
        seen = self.get(rows, q)
        if seen is None:
            return 1.0
        ratio, n = seen
        return ratio if n >= self.confirm else min(ratio, 1.0)

    def factors(self, rows: int, max_q: int) -> np.ndarray:
        """(max_q,) float64: what to multiply the profile's verify time for 1..max_q query tokens by,
        from what was measured at ``rows``. Contention only inflates timings, so a shape measured
        below the profile is believed at once, one above it only once seen ``confirm`` times (a
        busy-machine profile must not freeze the decisions, and one noisy step must not either);
        an unmeasured shape keeps the profile (1). Kept, not rebuilt: a tree planner
        asks for ~50 widths every step, and a step measures one."""
        out = self._factors.get(rows)
        if out is None or len(out) < max_q:
            out = self._factors[rows] = np.asarray([self._factor(rows, q) for q in range(1, max_q + 1)], dtype=float)
        return out[:max_q]

    def get(self, rows: int, q: int) -> tuple[float, int] | None:
        """(EMA of measured / predicted, observations) once seen ``min_count`` times, else None."""
        value, n = self.table.get((rows, q), (0.0, 0))
        return (value, n) if n >= self.min_count else None


@dataclass
class ModeState:
    """Acceptance knowledge for one decoding mode (greedy or sampling): one calibration per kind of
    proposer, since a prompt-lookup confidence and a draft model's probability of the same value
    are not accepted equally often (``lookup`` marks prompt-lookup nodes)."""

    acceptance: AcceptanceModel = field(default_factory=AcceptanceModel)
    running_rate: float | None = None  # the pair's acceptance rate of drafted nodes (None: not seen yet)
    lookup: AcceptanceModel = field(default_factory=AcceptanceModel)
    # a draft node that is not its parent's most probable child (a tree's runner-up): at the same
    # draft probability it is accepted far less often than a top child (at most one sibling can be)
    sibling: AcceptanceModel = field(default_factory=AcceptanceModel)

    def _kinds(self, lookup: torch.Tensor | None, sibling: torch.Tensor | None, like: torch.Tensor):
        """(model, mask) per kind of node: prompt lookup first, then runners-up, then top children."""
        none = torch.zeros_like(like, dtype=torch.bool)
        is_l = none if lookup is None else lookup.to(like.device)
        is_s = none if sibling is None else (sibling.to(like.device) & ~is_l)
        return ((self.lookup, is_l), (self.sibling, is_s), (self.acceptance, ~(is_l | is_s)))

    def predict(self, draft_prob: torch.Tensor, depth: torch.Tensor, lookup: torch.Tensor | None = None,
                sibling: torch.Tensor | None = None) -> torch.Tensor:
        pred = self.acceptance.predict(draft_prob, depth)
        if lookup is None and sibling is None:  # a draft-model chain: one kind (skips three mask syncs)
            return pred
        for model, mask in self._kinds(lookup, sibling, pred)[:2]:
            if bool(mask.any()):
                pred = torch.where(mask, model.predict(draft_prob, depth).to(pred.device, pred.dtype), pred)
        return pred

    def update(self, draft_prob: torch.Tensor, depth: torch.Tensor, outcome: torch.Tensor,
               lookup: torch.Tensor | None = None, sibling: torch.Tensor | None = None) -> None:
        """Fold verified nodes (1-D tensors) into their own kind's calibration (:meth:`update_np`)."""
        def np_(t):
            return None if t is None else t.detach().cpu().numpy()
        p = draft_prob.detach().to("cpu", torch.float64).reshape(-1).numpy()
        d = np.broadcast_to(torch.as_tensor(depth).detach().cpu().long().numpy(), p.shape)
        y = np.broadcast_to(torch.as_tensor(outcome).detach().to("cpu", torch.float64).numpy(), p.shape)
        self.update_np(p, d, y, np_(lookup), np_(sibling))

    def predict_np(self, draft_prob: np.ndarray, depth: np.ndarray, lookup: np.ndarray | None = None,
                   sibling: np.ndarray | None = None) -> np.ndarray:
        """:meth:`predict` on numpy arrays (float32)."""
        pred = self.acceptance.predict_np(draft_prob, depth)
        if sibling is not None and sibling.any():
            pred = np.where(sibling, self.sibling.predict_np(draft_prob, depth), pred)
        if lookup is not None and lookup.any():  # lookup wins over sibling, as in :meth:`_kinds`
            pred = np.where(lookup, self.lookup.predict_np(draft_prob, depth), pred)
        return pred.astype(np.float32)

    def update_np(self, draft_prob: np.ndarray, depth: np.ndarray, outcome: np.ndarray,
                  lookup: np.ndarray | None = None, sibling: np.ndarray | None = None) -> None:
        """:meth:`update` on 1-D numpy arrays."""
        if lookup is None and sibling is None:  # a draft-model chain: one kind
            self.acceptance.update_np(draft_prob, depth, outcome)
            return
        is_l = np.zeros(draft_prob.shape, dtype=bool) if lookup is None else lookup
        is_s = np.zeros(draft_prob.shape, dtype=bool) if sibling is None else (sibling & ~is_l)
        for model, keep in ((self.lookup, is_l), (self.sibling, is_s), (self.acceptance, ~(is_l | is_s))):
            if keep.all():
                model.update_np(draft_prob, depth, outcome)
            elif keep.any():
                model.update_np(draft_prob[keep], depth[keep], outcome[keep])


    def update_lists(self, draft_prob: list[float], depth: list[int], outcome: list[float],
                     sibling: list[bool] | None = None) -> None:
        """:meth:`update_np` for the few tested nodes of one row of draft-model nodes, as Python
        lists (:meth:`AcceptanceModel.update_list`): the same statistics, bit for bit."""
        if sibling is None or not any(sibling):
            self.acceptance.update_list(draft_prob, depth, outcome)
            return
        for model, keep in ((self.sibling, sibling), (self.acceptance, [not s for s in sibling])):
            if any(keep):
                model.update_list([p for p, k in zip(draft_prob, keep) if k], [d for d, k in zip(depth, keep) if k],
                                  [y for y, k in zip(outcome, keep) if k])


@dataclass
class PairState:
    latency: LatencyModel
    observed: ObservedCosts = field(default_factory=ObservedCosts)
    greedy: ModeState = field(default_factory=ModeState)
    sampling: ModeState = field(default_factory=ModeState)

    def mode(self, sampling: bool) -> ModeState:
        return self.sampling if sampling else self.greedy


LOOKUP_SCALE_BOUNDS = (0.02, 4.0)
"""Per-row factor on prompt-lookup acceptance: whether a row's text repeats is a property of that row
(a loop, a quote) that no pair-wide calibration can know, so unlike the draft's row factor it may go
far below 1 (a row whose lookups keep failing stops being offered them) as well as above."""


ROW_LOOKUP_DECAY = 0.9  # per step: a row's lookup record spans its last ~10 verify steps
ROW_LOOKUP_PRIOR = 0.5  # a new row's record: half a node's worth of prediction, at ratio 1


class RowLookup:
    """Per row, the decayed (accepted, predicted) sums of its verified prompt-lookup nodes. Sums of
    nodes, not an average of steps: a few failed steps with small predictions must already weigh, so
    a row whose text does not repeat stops being offered lookups within a handful of steps."""

    def __init__(self, decay: float = ROW_LOOKUP_DECAY):
        self.decay = float(decay)
        self.sums: dict[int, tuple[float, float]] = {}

    def scale(self, row: int) -> float:
        got, pred = self.sums.get(row, (ROW_LOOKUP_PRIOR, ROW_LOOKUP_PRIOR))
        lo, hi = LOOKUP_SCALE_BOUNDS
        return min(max(got / max(pred, 1e-6), lo), hi)

    def scales(self, rows: list[int]) -> "np.ndarray":
        return np.asarray([self.scale(r) for r in rows], dtype=np.float32)

    def observe(self, rows: list[int], got: torch.Tensor, predicted: torch.Tensor, tested: torch.Tensor) -> None:
        """``got`` / ``predicted`` (B, N): outcome and calibrated prediction of each verified lookup
        node (0 elsewhere); ``tested`` (B, N): which nodes those are."""
        d = self.decay
        for r, g, p, n in zip(rows, got.sum(1).tolist(), predicted.sum(1).tolist(), tested.sum(1).tolist()):
            if n:
                a, b = self.sums.get(r, (ROW_LOOKUP_PRIOR, ROW_LOOKUP_PRIOR))
                self.sums[r] = (d * a + g, d * b + p)

    def forget(self, row: int) -> None:
        self.sums.pop(row, None)
