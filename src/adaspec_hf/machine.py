"""How busy this machine is: every timing we take or report is read against it.

One other CPU-bound process slows 2-thread torch several-fold on small machines, so profiles,
builds and benchmarks record the load average and warn when it says the CPUs are shared.
"""
from __future__ import annotations

import os

BUSY_LOAD_PER_CPU = 0.5  # a 1-minute load average above half the CPUs means timings are disturbed


def load_average() -> float | None:
    """The 1-minute load average (rounded), or None where the platform has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def is_busy(load: float | None) -> bool:
    """Whether a load average says other processes share the CPUs (timings taken now are disturbed)."""
    return load is not None and load > BUSY_LOAD_PER_CPU * (os.cpu_count() or 1)


def load_averages() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages (rounded), or None: recorded with serving benchmark runs."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None
