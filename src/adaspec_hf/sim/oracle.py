"""The oracle bound: per-step chain lengths chosen knowing each step's outcome in advance.

At batch 1 a chain of ``k`` drafted at output position ``t`` emits ``min(k, run(t)) + 1`` tokens
(``run``: consecutive positions where the draft's argmax is the output) and costs
``overhead + k * draft + verify(1 + k)``. The fastest way through the whole output is a shortest
path over positions, solved backwards by dynamic programming; no policy without foresight can beat
it, so ``ours / oracle`` says how much of the reachable speed-up a policy gets.
"""
from __future__ import annotations

from adaspec_hf.sim.cost import CostCurve
from adaspec_hf.sim.trace import Trace


def oracle_chain(trace: Trace, cost: CostCurve, *, max_k: int = 12, max_new_tokens: int | None = None
                 ) -> tuple[float, float]:
    """(tokens, seconds) of the oracle over every row of ``trace`` (rows one at a time)."""
    tokens = seconds = 0.0
    for row in trace.rows:
        n = min(row.length, max_new_tokens or row.length)
        context = row.prompt_len + n / 2
        step = [cost.overhead + cost.verify(1, 1, context)] + [
            cost.overhead + k * cost.draft(1, 1.0, context) + cost.verify(1, 1 + k, context) for k in range(1, max_k + 1)]
        best = [0.0] * (n + 1)  # best[t]: seconds to finish from t committed tokens
        for t in range(n - 1, 0, -1):
            run = row.run_length(t)
            remaining = n - t
            best[t] = min(step[k] + best[min(n, t + min(k, run, remaining - 1) + 1)]
                          for k in range(0, min(max_k, remaining - 1) + 1))
        tokens += n
        seconds += best[1] if n > 1 else 0.0
    return tokens, seconds
