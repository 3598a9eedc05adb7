"""Offline planning: traces of what a draft would have proposed along the target's own output, a
simulator that replays them against any policy on a cost curve (no timing noise, seconds per run),
the oracle bound (draft lengths chosen knowing the outcomes), and serving replayed the same way
(arrivals, continuous batching, per-request objectives)."""
from adaspec_hf.sim.cost import CostCurve, GpuShapedCost, ProfileCost, policy_on
from adaspec_hf.sim.oracle import oracle_chain
from adaspec_hf.sim.serve import ServeResult, SimRequest, poisson_requests, simulate_serving
from adaspec_hf.sim.simulate import SimResult, simulate
from adaspec_hf.sim.trace import RowTrace, Trace, record_trace, synthetic_trace

__all__ = ["CostCurve", "GpuShapedCost", "ProfileCost", "RowTrace", "ServeResult", "SimRequest", "SimResult", "Trace",
           "oracle_chain", "poisson_requests", "policy_on", "record_trace", "simulate", "simulate_serving", "synthetic_trace"]
