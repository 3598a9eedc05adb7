"""Serving benchmark: replay seeded workloads against the engine, systems side by side, one run.

For each request rate and each system (a draft policy in the same :class:`~adaspec_hf.serving.engine.Engine`)
the same workload is replayed in real time: requests are submitted at their arrival times, each
with its SLO class; TTFT / TPOT percentiles, SLO attainment, goodput and throughput come from the
`evaluate` metric module :mod:`adaspec_hf.metrics` (``serving_metrics``).

SLO classes are set from the machine: the single-request vanilla per-token latency (HF
``target.generate``, greedy) measured at start; ``tight`` TPOT = 1.2x and ``loose`` = 3x of it by
default, TTFT = ``ttft_scale`` x the vanilla single-request TTFT. With ``--rates auto`` the rates are
multiples of the rate one vanilla request-at-a-time server sustains.

Systems: ``static-0`` (no speculation), ``static-K``, ``smartspec``, ``adaptive`` (goodput planner,
no SLO phase), ``slo`` (goodput planner with AdaServe's SLO phase); also ``adaptive-tree``/``slo-tree``.
Each system gets fresh latency corrections and acceptance calibration and a short unmeasured warm-up;
all use the same engine (same SLO-aware admission). A run is bounded in time: arrivals for
``duration`` seconds, then ``drain_timeout`` seconds before unfinished requests are cancelled and
counted as missed. Default: 5 systems x 3 rates x (20 + <=10) s, about 8-9 minutes.

One run at one rate is one draw of arrivals and prompts, and on a 2-core CPU its attainment moves
between runs by more than systems differ; ``seeds`` replays several workloads per rate, systems by
turns, and pools them (:func:`~adaspec_hf.bench.serving_results.pool_runs`): compare systems on the
pooled table.
"""
from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from adaspec_hf.bench.harness import machine_info
from adaspec_hf.bench.serving_results import ServingBenchResult
from adaspec_hf.bench.workload import SLOClass, Workload, make_workload
from adaspec_hf.machine import load_averages
from adaspec_hf.metrics import compute_serving_metrics
from adaspec_hf.policies.build import fresh_state
from adaspec_hf.policies.registry import make_policy

logger = logging.getLogger("adaspec_hf")

DEFAULT_SYSTEMS = ("static-0", "static-4", "smartspec", "adaptive", "slo")


# ------------------------------------------------------------------------------------ calibration
@dataclass
class Calibration:
    per_token_s: float  # vanilla single-request decode latency per token
    ttft_s: float  # vanilla single-request time to first token (prefill + 1 token)
    request_s: float  # vanilla single-request time for a mean-length request
    prompt_tokens: float
    output_tokens: float


def calibrate(target, prompts: Sequence[Sequence[int]], output_tokens: float, *, n_prompts: int = 4,
              new_tokens: int = 32, repeats: int = 4) -> Calibration:
    """Single-request latencies of plain greedy ``target.generate`` on this machine.

    Per prompt, the fastest of ``repeats`` runs of 1 and of ``new_tokens`` tokens (a shared CPU only
    ever adds time, so the minimum is the machine's own speed); then the median over prompts.
    """
    from transformers import GenerationConfig

    gen = getattr(target, "_adaspec_original_generate", None) or target.generate
    pad = target.generation_config.pad_token_id
    pad = pad if pad is not None else 0
    per_tok, ttft = [], []
    sample = [list(p) for p in prompts[:n_prompts]]
    with torch.no_grad():
        gen(input_ids=torch.tensor([sample[0]], device=target.device), max_new_tokens=2, do_sample=False,
            pad_token_id=pad)  # warm-up
        for p in sample:
            ids = torch.tensor([p], device=target.device)
            mask = torch.ones_like(ids)
            best = {}
            for _ in range(repeats):
                for n in (1, new_tokens):
                    cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad,
                                           eos_token_id=None)
                    t0 = time.perf_counter()
                    gen(input_ids=ids, attention_mask=mask, generation_config=cfg)
                    best[n] = min(best.get(n, math.inf), time.perf_counter() - t0)
            ttft.append(best[1])
            per_tok.append(max(best[new_tokens] - best[1], 1e-6) / (new_tokens - 1))
    pt, tf = statistics.median(per_tok), statistics.median(ttft)
    mean_prompt = statistics.fmean(len(p) for p in prompts)
    return Calibration(per_token_s=pt, ttft_s=tf, request_s=tf + pt * max(output_tokens - 1, 0),
                       prompt_tokens=mean_prompt, output_tokens=output_tokens)


def slo_classes(cal: Calibration, *, tight: float = 1.2, loose: float = 3.0, tight_fraction: float = 0.5,
                ttft_scale: float = 10.0) -> list[SLOClass]:
    ttft_ms = ttft_scale * cal.ttft_s * 1000.0
    return [SLOClass("tight", tpot_ms=tight * cal.per_token_s * 1000.0, ttft_ms=ttft_ms, weight=tight_fraction),
            SLOClass("loose", tpot_ms=loose * cal.per_token_s * 1000.0, ttft_ms=ttft_ms, weight=1 - tight_fraction)]


# -------------------------------------------------------------------------------------- systems
def make_system_policy(name: str, target, draft, *, sampling: bool = False):
    """A fresh policy per system: its own latency corrections and acceptance calibration (the
    profiled latency grid is shared, measured once per pair), so compared systems do not learn
    from each other. ``sampling``: the workload samples, so planners take the sampling calibration
    (and ``"adaptive"`` plans trees, as ``generate`` does when sampling)."""
    return make_policy(name, target, draft, fresh=True, sampling=sampling)


def run_system(system: str, target, draft, tokenizer, workload: Workload, *, max_rows: int = 8,
               warmup: int = 4, drain_timeout: float = 15.0, seed: int = 0, policy=None,
               engine_thread: bool = False, temperature: float | None = None) -> dict:
    """Replay ``workload`` in real time on a fresh engine; return metrics and per-request records.

    The engine's step loop runs in this (the main) thread (:meth:`Engine.run`) and a client thread
    replays the arrivals, as a CPU deployment should run it; ``engine_thread=True``: the engine's own
    background thread steps instead (slower on a CPU: see :meth:`Engine.run`). ``temperature``: every
    request samples at it (greedy when None or 0)."""
    from adaspec_hf.serving.engine import Engine

    sample = dict(do_sample=True, temperature=float(temperature)) if temperature else {}
    policy = policy if policy is not None else make_system_policy(system, target, draft, sampling=bool(sample))
    latency = policy.latency
    if latency is None:  # every system gets the same latency-model-based admission
        latency = fresh_state(target, draft).latency
    engine = Engine(target, draft, tokenizer, policy, max_rows=max_rows, seed=seed, latency=latency,
                    start=engine_thread)
    box: dict = {"handles": [], "t0": time.perf_counter(), "n_steps0": 0}

    def client() -> None:
        try:
            warm = [engine.submit(r.prompt_ids, max_new_tokens=min(16, r.max_new_tokens), **sample)
                    for r in workload.requests[:warmup]]
            for h in warm:
                h.result()
            box["n_steps0"] = engine.stats.target_forwards  # counts every step (stats.steps keeps the last STEP_HISTORY)
            box["t0"] = t0 = time.perf_counter()
            for r in workload.requests:
                delay = t0 + r.arrival - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                box["handles"].append((r, engine.submit(r.prompt_ids, max_new_tokens=r.max_new_tokens, slo=r.slo,
                                                        **sample)))
            deadline = t0 + workload.duration + drain_timeout
            for _, h in box["handles"]:
                try:
                    h.result(timeout=max(deadline - time.perf_counter(), 0.0))
                except TimeoutError:
                    pass
        except BaseException as e:  # noqa: BLE001 - reported by the caller below
            box["error"] = e
        finally:
            engine.close(drain=False)

    if engine_thread:
        client()
    else:
        feeder = threading.Thread(target=client, name="serving-client", daemon=True)
        feeder.start()
        engine.run()
        feeder.join()
    if "error" in box:
        raise box["error"]
    handles, t0, n_steps0 = box["handles"], box["t0"], box["n_steps0"]
    new_steps = min(engine.stats.target_forwards - n_steps0, len(engine.stats.steps))
    steps = engine.stats.steps[len(engine.stats.steps) - new_steps:]
    records, ttft, tpot, new, met = [], [], [], [], []
    last = t0
    for r, h in handles:
        res = h._wait(0)
        finished = res.finish_reason in ("eos", "length", "stop")
        ok = bool(finished and (res.slo_met if res.slo is not None else True))
        ttft.append(res.ttft)
        tpot.append(res.tpot)
        new.append(len(res.token_ids))
        met.append(ok)
        if res.last_token_at is not None:
            last = max(last, res.last_token_at)
        rec = res.to_dict()
        rec.update(slo_class=r.slo_class, arrival=r.arrival, max_new_tokens=r.max_new_tokens, met=ok)
        records.append(rec)
    start = t0 + (workload.requests[0].arrival if workload.requests else 0.0)
    duration = max(last - start, 1e-6)
    metrics = compute_serving_metrics(ttft, tpot, new, met, duration)
    by_class, goodput_by_class, n_by_class = {}, {}, {}
    for c in dict.fromkeys(rec["slo_class"] for rec in records):
        sel = [(ok, n) for rec, ok, n in zip(records, met, new) if rec["slo_class"] == c]
        n_by_class[c] = len(sel)
        by_class[c] = sum(ok for ok, _ in sel) / len(sel)
        goodput_by_class[c] = sum(n for ok, n in sel if ok) / duration  # tokens/s of the class's SLO-meeting requests
    rows = sum(s.rows for s in steps)
    out = {
        "system": system, "policy": policy.name, "config": engine.config.to_dict(), "rate": workload.rate, **metrics,
        "attainment_by_class": by_class, "goodput_by_class": goodput_by_class, "requests_by_class": n_by_class,
        "finished": sum(rec["finish_reason"] in ("eos", "length", "stop") for rec in records),
        "duration_s": duration, "steps": len(steps),
        "mean_rows": rows / max(len(steps), 1),
        "accepted_per_step": sum(sum(s.accepted) for s in steps) / max(rows, 1),
        "drafted_per_step": sum(sum(s.drafted) for s in steps) / max(rows, 1),
        "slo_nodes": getattr(policy, "slo_nodes", None),
        "deferred_admissions": engine.deferred_admissions,
    }
    return {"metrics": out, "requests": records}


def run_serving_benchmark(
    target, draft, tokenizer, prompts: Any, *,
    systems: Sequence[str] = DEFAULT_SYSTEMS,
    rates: "Sequence[float] | str" = "auto",
    rate_multipliers: Sequence[float] = (1.0, 2.0, 3.0),
    duration: float = 20.0,
    max_requests: int | None = None,
    arrival: str = "poisson",
    cv: float = 2.0,
    output_len: "int | tuple[int, int] | str" = "data",
    max_prompt_tokens: int | None = 256,
    tight: float = 1.2,
    loose: float = 3.0,
    tight_fraction: float = 0.5,
    ttft_scale: float = 10.0,
    max_rows: int = 8,
    warmup: int = 4,
    drain_timeout: float = 10.0,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    name: str = "serving",
    progress: bool = True,
    extra_config: dict | None = None,
    engine_thread: bool = False,
    temperature: float | None = None,
) -> ServingBenchResult:
    """Calibrate, build one seeded workload per rate (and per seed of ``seeds``), replay it for every
    system; see the module doc. ``seeds``: several workloads per rate (arrivals, prompts and lengths
    drawn from each seed), the systems taking turns on each in an order rotated from seed to seed so
    a drift of the machine's speed does not fall on one system; the result then pools the runs
    (:func:`~adaspec_hf.bench.serving_results.pool_runs`). Default: the one workload of ``seed``."""
    seeds = [int(s) for s in seeds] if seeds else [int(seed)]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must differ, got {seeds}")
    if not systems:
        raise ValueError("no systems to run")
    # one workload template to calibrate on (same prompts / lengths as the real ones)
    probe = make_workload(prompts, 1.0, n_requests=64, output_len=output_len, tokenizer=tokenizer,
                          max_prompt_tokens=max_prompt_tokens, seed=seeds[0])
    mean_out = statistics.fmean(r.max_new_tokens for r in probe.requests)
    cal = calibrate(target, [r.prompt_ids for r in probe.requests], mean_out)
    classes = slo_classes(cal, tight=tight, loose=loose, tight_fraction=tight_fraction, ttft_scale=ttft_scale)
    if rates == "auto":
        base = 1.0 / cal.request_s
        rates = [round(base * m, 3) for m in rate_multipliers]
    rates = [float(r) for r in rates]
    config = {
        "systems": list(systems), "rates": rates, "duration_s": duration, "arrival": arrival,
        "cv": cv if arrival == "gamma" else None, "output_len": output_len, "max_rows": max_rows,
        "seed": seeds[0], "seeds": seeds,
        "step_loop": "engine thread" if engine_thread else "main thread (Engine.run)",
        "temperature": temperature or None,
        "calibration": {k: round(v, 5) for k, v in asdict(cal).items()},
        "slo_classes": [asdict(c) for c in classes], "machine": machine_info(), "load_before": load_averages(),
        "target_params": sum(p.numel() for p in target.parameters()),
        "draft_params": sum(p.numel() for p in draft.parameters()), **(extra_config or {}),
    }
    result = ServingBenchResult(name, config)
    total = len(rates) * len(seeds) * len(systems)
    done = 0
    for rate in rates:
        for i, s in enumerate(seeds):
            wl = make_workload(prompts, rate, duration=duration, n_requests=max_requests, arrival=arrival, cv=cv,
                               slo_classes=classes, output_len=output_len, tokenizer=tokenizer,
                               max_prompt_tokens=max_prompt_tokens, seed=s)
            summary = {k: v for k, v in wl.summary().items() if k not in ("slo_classes",)}
            key = str(rate) if len(seeds) == 1 else f"{rate}/seed{s}"
            result.config.setdefault("workload", {})[key] = summary
            order = list(systems[i % len(systems):]) + list(systems[:i % len(systems)])  # turns, rotated per seed
            for system in order:
                t0 = time.perf_counter()
                out = run_system(system, target, draft, tokenizer, wl, max_rows=max_rows, warmup=warmup,
                                 drain_timeout=drain_timeout, seed=s, engine_thread=engine_thread,
                                 temperature=temperature)
                m = out["metrics"]
                m["seed"] = s
                m["load"] = load_averages()
                result.rows.append(m)
                result.requests[f"{system}@{key}"] = out["requests"]
                done += 1
                if progress:
                    print(f"[{done}/{total}] rate {rate:.2f} seed {s} {system:>10}: "
                          f"attainment {m['slo_attainment']:.2f} "
                          f"goodput {m['goodput']:.1f} tok/s throughput {m['throughput']:.1f} tok/s "
                          f"accepted/step {m['accepted_per_step']:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    result.config["load_after"] = load_averages()
    return result
