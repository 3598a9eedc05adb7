"""Thread count during pair training, re-decided from measured step times while training runs.

The probe before training (:mod:`adaspec_hf.pair.setup`) picks a starting point, but a shared machine's
load changes within minutes: the faster of "all threads" and "one thread" must be re-measured as the
build goes on. Only speed depends on it; the trained weights do not.
"""
from __future__ import annotations

import statistics
import time

import torch

SLOWDOWN_REPROBE = 1.5  # current setting this much slower than when decided: probe the other one early
PROBE_LOST = 2.0        # a probe step this much slower than the current setting ends the probe at once


class ThreadTuner:
    """Follows the faster of ``torch.get_num_threads()`` threads and 1 thread, from measured step times.

    On a shared, busy CPU, 2+ OpenMP threads can be several times slower than 1 (barrier spinning
    while other processes hold the cores); on a quiet machine they are faster. The other setting is
    probed for a few steps (aborted at once if clearly slower); the wait between probes doubles
    after each probe, and a probe comes early when the current setting gets much slower.
    """

    def __init__(self, first: int = 3, period: int = 30, probe: int = 3, max_period: int = 480):
        self.full = torch.get_num_threads()
        self.choices = [self.full, 1] if self.full > 1 else [self.full]
        self.period, self.probe, self.max_period = period, probe, max_period
        self.next_probe = first
        self.current = self.full
        self.recent: list[float] = []   # step times of the current setting
        self.baseline = None            # its median when last decided
        self.probe_times: list[float] | None = None
        self.switches = 0
        self._step, self.t0 = 0, 0.0

    def _ref(self) -> float:
        return statistics.median(self.recent[-self.probe:]) if self.recent else float("inf")

    def begin(self, step: int) -> None:
        self._step = step
        slowed = self.baseline is not None and len(self.recent) >= self.probe and \
            self._ref() > SLOWDOWN_REPROBE * self.baseline
        if len(self.choices) > 1 and self.probe_times is None and (step >= self.next_probe or slowed):
            self.probe_times = []
            torch.set_num_threads(self.choices[1] if self.current == self.choices[0] else self.choices[0])
        elif self.probe_times is None:
            torch.set_num_threads(self.current)
        self.t0 = time.perf_counter()

    def end(self) -> None:
        dt = time.perf_counter() - self.t0
        if self.probe_times is None:
            self.recent = (self.recent + [dt])[-2 * self.probe:]
            return
        self.probe_times.append(dt)
        ref = self._ref()
        lost = dt > PROBE_LOST * ref  # clearly slower (even counting warm-up): stop probing now
        if lost or len(self.probe_times) > self.probe:  # first probe step is a warm-up
            mine = statistics.median(self.probe_times[1:]) if not lost else float("inf")
            if mine < ref:
                self.current = torch.get_num_threads()
                self.recent = self.probe_times[1:]
                self.switches += 1
            torch.set_num_threads(self.current)
            self.baseline = self._ref()
            self.period = min(self.max_period, 2 * self.period)
            self.next_probe = self._step + self.period
            self.probe_times = None

    def restore(self) -> None:
        torch.set_num_threads(self.full)
