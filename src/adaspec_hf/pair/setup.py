"""Pick the training precision and thread count of a pair build by timing them on this machine.

Why measure: bf16 autocast is 2-3x faster than fp32 on CPUs with native bf16 (AVX-512 BF16, AMX) but
10-25x *slower* where it is emulated (AVX2 only), and on a shared machine one thread can beat two
(OpenMP threads spin on a descheduled peer). No flag or CPU-name rule gets this right everywhere, a
few timed training steps do. The choice changes speed only: the recipe (steps, tokens, shapes) is the
same on every machine.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

PROBE_ROWS = 2           # sequences per probe step (a quarter of a real batch: cheap even when emulated)
PROBE_REPEATS = 2        # timed steps per candidate after one warm-up step
ABORT_FACTOR = 3.0       # a candidate whose warm-up step is this much slower than the best is dropped


@dataclass(frozen=True)
class Candidate:
    precision: str       # "fp32" or "bf16" (autocast; weights stay fp32)
    threads: int

    @property
    def name(self) -> str:
        return f"{self.precision}/{self.threads}thr"


@dataclass
class TrainingSetup:
    """What a build trains with, and the timings that chose it (recorded in report.json)."""

    precision: str
    threads: int
    device: str
    probe_step_s: float                       # chosen candidate, one probe step of PROBE_ROWS rows
    timings: dict[str, float | None] = field(default_factory=dict)   # candidate -> seconds (None: dropped)
    reason: str = ""

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    def to_dict(self) -> dict:
        return asdict(self)


def candidates(device: str, max_threads: int | None = None) -> list[Candidate]:
    """fp32 and bf16 autocast, with all threads and with one (CPU); on CUDA the thread count is moot."""
    if device.startswith("cuda"):
        out = [Candidate("fp32", 1)]
        if torch.cuda.is_bf16_supported():
            out.append(Candidate("bf16", 1))
        return out
    full = max_threads or torch.get_num_threads()
    threads = [full, 1] if full > 1 else [1]
    return [Candidate(p, t) for p in ("fp32", "bf16") for t in threads]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def choose_training_setup(
    step: Callable[[torch.nn.Module, torch.nn.Module, torch.Tensor], torch.Tensor],
    target: torch.nn.Module, draft: torch.nn.Module, batch: torch.Tensor, device: str = "cpu",
    options: list[Candidate] | None = None, timer: Callable[[], float] = time.perf_counter,
) -> TrainingSetup:
    """Time ``step(target, draft, batch) -> loss`` (forward + backward) under each candidate; keep the fastest.

    The models are deep-copied, so the probe leaves the real ones untouched (same initial weights on
    every machine). Each candidate runs one warm-up step, then :data:`PROBE_REPEATS` timed steps; the
    best of those counts. A candidate whose warm-up is :data:`ABORT_FACTOR` times slower than the best
    so far is dropped after that one step (emulated bf16 costs a minute per real step).
    """
    options = options or candidates(device)
    restore = torch.get_num_threads()
    batch = batch[:PROBE_ROWS].to(device)
    timings: dict[str, float | None] = {}
    best: tuple[float, Candidate] | None = None
    t_copy, d_copy = copy.deepcopy(target).to(device).train(), copy.deepcopy(draft).to(device).train()
    try:
        for cand in options:
            if not device.startswith("cuda"):
                torch.set_num_threads(cand.threads)

            def once() -> float:
                _sync(device)
                t0 = timer()
                with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16,
                                    enabled=cand.precision == "bf16"):
                    loss = step(t_copy, d_copy, batch)
                loss.backward()
                _sync(device)
                dt = timer() - t0
                t_copy.zero_grad(set_to_none=True)
                d_copy.zero_grad(set_to_none=True)
                return dt

            warm = once()
            if best is not None and warm > ABORT_FACTOR * best[0]:
                timings[cand.name] = None
                continue
            t = min(once() for _ in range(PROBE_REPEATS))
            timings[cand.name] = round(t, 4)
            if best is None or t < best[0]:
                best = (t, cand)
    finally:
        torch.set_num_threads(restore)
    assert best is not None
    t, cand = best
    others = ", ".join(f"{k} {v:.3f} s" if v is not None else f"{k} dropped (warm-up > {ABORT_FACTOR:g}x best)"
                       for k, v in timings.items())
    return TrainingSetup(precision=cand.precision, threads=cand.threads, device=device, probe_step_s=t,
                         timings=timings, reason=f"fastest probe step of {PROBE_ROWS} rows: {others}")
