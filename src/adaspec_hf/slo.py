"""Service-level objectives of a request: time to first token and time per output token.

``TPOT`` is the mean gap between output tokens after the first, ``(t_last - t_first) / (n - 1)``;
``TTFT`` is measured from submission to the first token. A request meets its SLO when every
objective it sets is met (a one-token answer has no TPOT and meets any TPOT objective).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any


def _check_ms(name: str, value: Any) -> float | None:
    if value is None:
        return None
    # any real number (numpy scalars, Fraction, Decimal...), never a bool
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"SLO {name} must be a number of milliseconds, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"SLO {name} must be a finite positive number of milliseconds, got {value!r}")
    return value


@dataclass(frozen=True)
class SLO:
    """Latency objectives in milliseconds; at least one must be given."""

    tpot_ms: float | None = None
    ttft_ms: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "tpot_ms", _check_ms("tpot_ms", self.tpot_ms))
        object.__setattr__(self, "ttft_ms", _check_ms("ttft_ms", self.ttft_ms))
        if self.tpot_ms is None and self.ttft_ms is None:
            raise ValueError("an SLO needs tpot_ms and/or ttft_ms (use slo=None for best effort)")

    @classmethod
    def coerce(cls, value: "SLO | dict | None") -> "SLO | None":
        """``None``, an :class:`SLO` (re-validated) or a dict of its fields."""
        if value is None:
            return None
        if isinstance(value, SLO):
            return cls(value.tpot_ms, value.ttft_ms)
        if isinstance(value, dict):
            unknown = set(value) - {"tpot_ms", "ttft_ms"}
            if unknown:
                raise ValueError(f"unknown SLO fields {sorted(unknown)}; use tpot_ms / ttft_ms")
            return cls(**value)
        raise ValueError(f"slo must be an SLO, a dict or None, got {type(value).__name__}")

    @property
    def tpot(self) -> float:
        """Seconds per output token (inf when unset)."""
        return self.tpot_ms / 1000.0 if self.tpot_ms is not None else math.inf

    @property
    def ttft(self) -> float:
        """Seconds to the first token (inf when unset)."""
        return self.ttft_ms / 1000.0 if self.ttft_ms is not None else math.inf

    def met(self, ttft: float | None, tpot: float | None) -> bool:
        """Whether measured ``ttft`` / ``tpot`` (seconds; None = not applicable) meet this SLO."""
        if self.ttft_ms is not None and (ttft is None or ttft > self.ttft):
            return False
        if self.tpot_ms is not None and tpot is not None and tpot > self.tpot:
            return False
        return True
