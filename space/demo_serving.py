"""The Serving tab: simulated users with SLOs replayed against ``adaspec_hf.Engine``.

Workloads come from :mod:`adaspec_hf.bench.workload` (the serving benchmark's own seeded arrivals), so
the tab and ``adaspec-hf bench serve`` send requests the same way.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from matplotlib.figure import Figure

import adaspec_hf
from adaspec_hf.bench.workload import SLOClass, WorkloadRequest
from adaspec_hf.bench.workload import make_workload as make_library_workload
from demo_figures import LINE_COLORS
from demo_models import Store

DEFAULT_USERS = [["chat", 100.0, 1000.0, 50.0], ["code assistant", 200.0, 2000.0, 30.0],
                 ["batch summariser", 1000.0, 10000.0, 20.0]]
USER_HEADERS = ["user", "TPOT SLO (ms)", "TTFT SLO (ms)", "share of requests (%)"]
SERVING_POLICIES = ["slo", "slo-tree", "adaptive", "adaptive-tree", "static-4", "heuristic"]
BASELINE = "static-0"


def serving_api():
    """(Engine, SLO, None) from adaspec_hf, or (None, None, why the serving tab cannot run)."""
    Engine, SLO = getattr(adaspec_hf, "Engine", None), getattr(adaspec_hf, "SLO", None)
    if Engine is None or SLO is None:
        try:
            from adaspec_hf.serving import engine as serving

            Engine, SLO = serving.Engine, serving.SLO
        except Exception as e:  # noqa: BLE001
            return None, None, (f"The serving engine is not available in this version of adaspec-hf "
                                f"(`adaspec_hf.Engine`: {type(e).__name__}: {e}). The Generate tab works without it.")
    return Engine, SLO, None


@dataclass
class SimRequest:
    """One request of the serving tab: the library's workload request, and what the engine made of it."""

    request: WorkloadRequest
    result: object | None = None  # adaspec_hf.serving.engine.RequestResult
    error: str | None = None

    @property
    def user(self) -> str:
        return self.request.slo_class

    @property
    def arrival(self) -> float:
        return self.request.arrival

    @property
    def tokens(self) -> int:
        return len(self.result.token_ids) if self.result is not None else 0

    def met(self) -> bool:
        r = self.result
        if r is None or self.error or r.error is not None:
            return False
        return bool(r.slo_met) if r.slo_met is not None else True


def _ms(v) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if v > 0 else None


def make_workload(users: list[list], rate: float, n_requests: int, prompts: list[list[int]], seed: int = 0,
                  max_new_tokens: int = 48) -> list[SimRequest]:
    """Poisson arrivals at ``rate`` requests/s, each request's user (an SLO class) drawn by share:
    :func:`adaspec_hf.bench.workload.make_workload`, the serving benchmark's own workloads."""
    rows = [u for u in (users or []) if u is not None and len(u) >= 4 and str(u[0]).strip()]
    if not rows:
        raise ValueError("add at least one user (name, TPOT SLO ms, TTFT SLO ms, share %)")
    if sum(max(_ms(u[3]) or 0.0, 0.0) for u in rows) <= 0:
        raise ValueError("the users' shares of requests must add up to more than 0")
    if not rate or rate <= 0:
        raise ValueError("the request rate must be > 0")
    if not prompts:
        raise ValueError("no prompts to send")
    classes = [SLOClass(str(u[0]), tpot_ms=_ms(u[1]), ttft_ms=_ms(u[2]), weight=max(_ms(u[3]) or 0.0, 0.0))
               for u in rows]
    wl = make_library_workload(prompts, float(rate), n_requests=int(n_requests), slo_classes=classes,
                               output_len=int(max_new_tokens), seed=seed)
    return [SimRequest(r) for r in wl.requests]


def simulate(store: Store, users, rate: float, n_requests: int, max_new_tokens: int, policy: str,
             max_rows: int = 8) -> dict:
    """The same seeded workload through ``Engine`` with ``policy`` and with ``static-0``;
    returns {policy: (requests, makespan seconds)}."""
    Engine, _, why = serving_api()
    if why:
        raise RuntimeError(why)
    L = store.loaded
    prompts = [L.tokenizer(p)["input_ids"] for p in L.prompts if p]
    make_workload(users, rate, n_requests, prompts, max_new_tokens=max_new_tokens)  # validate before taking the machine
    results = {}
    with store.busy:
        for pol in (policy, BASELINE):
            reqs = make_workload(users, rate, n_requests, prompts, max_new_tokens=max_new_tokens)
            with Engine(L.target, L.draft, L.tokenizer, policy=pol, max_rows=max_rows, seed=0) as engine:
                results[pol] = (reqs, _drive(engine, reqs))
    return results


def _drive(engine, reqs: list[SimRequest]) -> float:
    """Submit each request at its arrival time, wait for all; returns the makespan in seconds."""
    t0 = time.perf_counter()
    handles = []
    for r in reqs:
        delay = r.arrival - (time.perf_counter() - t0)
        if delay > 0:
            time.sleep(delay)
        q = r.request
        try:
            handles.append((r, engine.submit(q.prompt_ids, max_new_tokens=q.max_new_tokens, slo=q.slo, eos_token_id=[])))
        except Exception as e:  # noqa: BLE001 - a refused request counts as missed
            r.error = f"{type(e).__name__}: {e}"
    for r, h in handles:
        try:
            r.result = h.result()
        except Exception as e:  # noqa: BLE001
            r.error = f"{type(e).__name__}: {e}"
    return time.perf_counter() - t0


def _agg(reqs: list[SimRequest], total: float) -> dict:
    met = [r for r in reqs if r.met()]
    done = [r.result for r in reqs if r.result is not None and r.result.tpot is not None]
    return {"n": len(reqs), "attain": 100 * len(met) / max(len(reqs), 1),
            "goodput": sum(r.tokens for r in met) / total, "throughput": sum(r.tokens for r in reqs) / total,
            "tpot": 1e3 * sum(d.tpot for d in done) / len(done) if done else float("nan"),
            "ttft": 1e3 * sum(r.result.ttft for r in reqs if r.result and r.result.ttft is not None)
                    / max(sum(1 for r in reqs if r.result and r.result.ttft is not None), 1)}


def serving_table(results) -> list[list]:
    rows = []
    for pol, (reqs, total) in results.items():
        groups = [(u, [r for r in reqs if r.user == u]) for u in dict.fromkeys(r.user for r in reqs)]
        for user, rs in groups + [("all users", reqs)]:
            a = _agg(rs, total)
            rows.append([pol, user, a["n"], f"{a['attain']:.0f}%", round(a["goodput"], 1), round(a["throughput"], 1),
                         round(a["ttft"]), round(a["tpot"], 1)])
    return rows


SERVE_HEADERS = ["policy", "user", "requests", "SLO attainment", "goodput (tok/s)", "throughput (tok/s)",
                 "mean TTFT (ms)", "mean TPOT (ms)"]


def serving_md(results) -> str:
    (pol, (r1, t1)), (_, (r0, t0)) = list(results.items())[:2]
    a1, a0 = _agg(r1, t1), _agg(r0, t0)
    ratio = f"{a1['goodput'] / a0['goodput']:.2f}×" if a0["goodput"] > 0 else "∞×" if a1["goodput"] > 0 else "—"
    return (f"**{pol}: SLO attainment {a1['attain']:.0f}% vs {a0['attain']:.0f}% without speculation; goodput "
            f"{a1['goodput']:.1f} vs {a0['goodput']:.1f} tokens/s ({ratio}).**")


def fig_serving(results) -> Figure:
    fig = Figure(figsize=(9.6, 3.2), dpi=100, layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    pols = list(results)
    users = list(dict.fromkeys(r.user for reqs, _ in results.values() for r in reqs)) + ["all users"]
    width = 0.8 / len(pols)
    colors = {pols[0]: LINE_COLORS["ours"], BASELINE: LINE_COLORS["plain"]}
    for i, pol in enumerate(pols):
        reqs, total = results[pol]
        att = [_agg([r for r in reqs if r.user == u] if u != "all users" else reqs, total)["attain"] for u in users]
        ax1.bar([x + i * width for x in range(len(users))], att, width, label=pol, color=colors.get(pol))
    ax1.set_xticks([x + width * (len(pols) - 1) / 2 for x in range(len(users))], users, fontsize=8)
    ax1.set_ylabel("SLO attainment (%)")
    ax1.set_ylim(0, 105)
    ax1.legend(fontsize=8)
    good = [_agg(*results[p])["goodput"] for p in pols]
    thr = [_agg(*results[p])["throughput"] for p in pols]
    ax2.bar(pols, thr, color="#e2e8f0", label="throughput")
    ax2.bar(pols, good, color=[colors.get(p) for p in pols], width=0.5, label="goodput (within SLO)")
    ax2.set_ylabel("tokens/s")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3, axis="y")
    return fig
