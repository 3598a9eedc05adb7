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

from adaspec_hf.efficiency.acceptance import AcceptanceModel
from adaspec_hf.efficiency.latency import LatencyModel

DEFAULT_COST_EMA = 0.3  # weight of one measured verify time in the observed cost table
DEFAULT_COST_CONFIRM = 3  # measurements above the profile needed before they replace it


class ObservedCosts:
    """EMA of measured verify times per (rows, query tokens per row)."""

    def __init__(self, ema: float = DEFAULT_COST_EMA, min_count: int = 1, confirm: int = DEFAULT_COST_CONFIRM):
        self.ema, self.min_count, self.confirm = ema, min_count, confirm
        self.table: dict[tuple[int, int], tuple[float, int]] = {}

    def add(self, rows: int, q: int, seconds: float) -> None:
        if not (seconds > 0 and math.isfinite(seconds)):
            return
        prev, n = self.table.get((rows, q), (seconds, 0))
        self.table[(rows, q)] = ((1 - self.ema) * prev + self.ema * seconds if n else seconds, n + 1)

    def get(self, rows: int, q: int) -> tuple[float, int] | None:
        """(EMA seconds, observations) once seen ``min_count`` times, else None."""
        value, n = self.table.get((rows, q), (0.0, 0))
        return (value, n) if n >= self.min_count else None


@dataclass
class ModeState:
    """Acceptance knowledge for one decoding mode (greedy or sampling)."""

    acceptance: AcceptanceModel = field(default_factory=AcceptanceModel)
    running_rate: float | None = None  # the pair's acceptance rate of drafted nodes (None: not seen yet)


@dataclass
class PairState:
    latency: LatencyModel
    observed: ObservedCosts = field(default_factory=ObservedCosts)
    greedy: ModeState = field(default_factory=ModeState)
    sampling: ModeState = field(default_factory=ModeState)

    def mode(self, sampling: bool) -> ModeState:
        return self.sampling if sampling else self.greedy
