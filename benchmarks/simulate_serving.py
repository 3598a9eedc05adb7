"""Serving with per-request SLOs, offline: traces of the built-in pair replayed through a simulated
continuously batched engine (adaspec_hf.sim.serve) on a cost curve, systems side by side.

Two SLO classes (tight: TPOT = ``--tight`` x the no-speculation time per token at batch 1; loose:
``--loose`` x; both TTFT = 10 x a single request's), Poisson or gamma (bursty) arrivals at rates
that are fractions of the no-speculation capacity (max rows / step time / mean output length).
Reported per rate and system: attainment overall and per class, goodput overall and per class.
The "goal rate" is the lowest rate where no speculation attains below 80%.

    python benchmarks/simulate_serving.py                     # GPU-shaped and this CPU's profile
    python benchmarks/simulate_serving.py --cost gpu --arrival gamma --cv 3
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from adaspec_hf.bench.harness import machine_info, simulation_arguments
from adaspec_hf.bench.prompts import load_prompt_ids
from adaspec_hf.pair import load_models
from adaspec_hf.policies.build import fresh_state
from adaspec_hf.sim import GpuShapedCost, ProfileCost, poisson_requests, policy_on, record_trace, simulate_serving

SYSTEMS = "static-0,static-2,static-4,adaspec,adaptive,slo,adaptive-tree,slo-tree"


def main() -> None:
    ap = simulation_arguments(__doc__.splitlines()[0])
    ap.add_argument("--cost", default="gpu,profile")
    ap.add_argument("--systems", default=SYSTEMS)
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--max-rows", type=int, default=32)
    ap.add_argument("--fractions", default="0.5,0.8,1.1,1.4", help="rates as fractions of no-speculation capacity")
    ap.add_argument("--arrival", choices=["poisson", "gamma"], default="poisson")
    ap.add_argument("--cv", type=float, default=3.0, help="gamma arrivals: coefficient of variation")
    ap.add_argument("--tight", type=float, default=1.2)
    ap.add_argument("--loose", type=float, default=3.0)
    ap.add_argument("--tight-fraction", type=float, default=0.5)
    ap.add_argument("--budget", type=int, default=GpuShapedCost.budget,
                    help="GPU-shaped curve: query tokens (rows x tokens) a verify takes at its flat cost")
    args = ap.parse_args()
    if args.budget < 1:
        ap.error(f"--budget must be >= 1 query token, got {args.budget}")

    target, draft, tok = load_models(args.target, args.draft, allow_weak_pair=args.allow_weak_pair)
    prompts = load_prompt_ids(tok, args.n_prompts)
    systems = [s for s in args.systems.split(",") if s and s != "adaspec"]
    result: dict = {"machine": machine_info(), "args": vars(args), "runs": {}}
    lines = []
    for mode in args.modes.split(","):
        sampling = mode == "sampling"
        trace = record_trace(target, draft, prompts, args.max_new_tokens, do_sample=sampling,
                             temperature=args.temperature, seed=0, pad_token_id=tok.pad_token_id or 0,
                             eos_token_id=tok.eos_token_id)
        mean_len = statistics.mean(r.length for r in trace.rows)
        ctx = statistics.mean(r.prompt_len for r in trace.rows) + mean_len / 2
        for cname in args.cost.split(","):
            cost = GpuShapedCost(budget=args.budget) if cname == "gpu" else ProfileCost(fresh_state(target, draft).latency)
            per_tok = cost.overhead + cost.verify(1, 1, ctx)
            prefill = statistics.mean(cost.verify(1, r.prompt_len, 0.0) for r in trace.rows)
            ttft = 10 * (prefill + per_tok)
            classes = [("tight", args.tight * per_tok, ttft, args.tight_fraction),
                       ("loose", args.loose * per_tok, ttft, 1 - args.tight_fraction)]
            step_full = cost.overhead + cost.verify(args.max_rows, 1, ctx)
            capacity = args.max_rows / step_full / mean_len  # requests/s without speculation
            key = f"{cname}/{mode}"
            runs = []
            head = f"\n== {key}: no-spec capacity {capacity:.2f} req/s, tight TPOT {1e3 * classes[0][1]:.1f} ms, " \
                   f"loose {1e3 * classes[1][1]:.1f} ms, {args.arrival} arrivals"
            print(head)
            lines.append(head)
            header = "| rate (req/s) | system | attainment | tight | loose | goodput (tok/s) | tight / loose goodput |"
            print(header)
            lines += [header, "|---|---|---|---|---|---|---|"]
            for frac in (float(f) for f in args.fractions.split(",")):
                rate = frac * capacity
                reqs = poisson_requests(args.requests, rate, len(trace.rows), classes, seed=0,
                                        cv=args.cv if args.arrival == "gamma" else 1.0)
                for name in systems:
                    policy = policy_on(name, cost, target, draft, sampling=sampling)
                    res = simulate_serving(policy, trace, cost, reqs, max_rows=args.max_rows)
                    s = res.summary(["tight", "loose"])
                    s.update(rate=rate, fraction=frac, system=name)
                    if hasattr(policy, "behind_rows"):  # the SLO phase: how often it had a row to serve first
                        s.update(behind_row_steps=policy.behind_rows, slo_phase1_nodes=policy.slo_nodes)
                    runs.append(s)
                    bc, gc = s["attainment_by_class"], s["goodput_by_class"]
                    row = (f"| {rate:.2f} | {name} | {s['attainment']:.2f} | {bc['tight']:.2f} | {bc['loose']:.2f} "
                           f"| {s['goodput']:.1f} | {gc['tight']:.1f} / {gc['loose']:.1f} |")
                    print(row)
                    lines.append(row)
            result["runs"][key] = {"classes": classes, "capacity_req_s": capacity, "rows": runs,
                                   "goals": goals(runs)}
            print(json.dumps(result["runs"][key]["goals"], indent=1))
            lines.append("\n" + json.dumps(result["runs"][key]["goals"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "simulate_serving" + ("_gamma" if args.arrival == "gamma" else "") + (
        f"_budget{args.budget}" if args.budget != GpuShapedCost.budget else "")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(f"# {stem}\n" + "\n".join(lines) + "\n")
    print(f"\nwrote {out / stem}.json, {stem}.md")


def goals(runs: list[dict]) -> dict:
    """At the lowest rate where no speculation attains below 80%: slo vs adaptive on the tight class,
    total goodput of slo / adaptive, and slo / max(no speculation, best static k)."""
    by = {(r["fraction"], r["system"]): r for r in runs}
    fracs = sorted({r["fraction"] for r in runs})
    goal = next((f for f in fracs if by.get((f, "static-0"), {}).get("attainment", 1.0) < 0.8), None)
    if goal is None or (goal, "slo") not in by or (goal, "adaptive") not in by:
        return {"goal_fraction": goal}
    slo, ada = by[(goal, "slo")], by[(goal, "adaptive")]
    statics = [r for (f, n), r in by.items() if f == goal and n.startswith("static-")]
    best = max(statics, key=lambda r: r["goodput"])
    out = {"goal_fraction": goal, "goal_rate": slo["rate"],
           "tight_slo": slo["attainment_by_class"]["tight"], "tight_adaptive": ada["attainment_by_class"]["tight"],
           "goodput_slo_vs_adaptive": slo["goodput"] / ada["goodput"] if ada["goodput"] else None,
           "goodput_slo_vs_best_static_or_none": slo["goodput"] / best["goodput"] if best["goodput"] else None,
           "best_static_or_none": best["system"]}
    if (goal, "slo-tree") in by and (goal, "adaptive-tree") in by:
        st, at = by[(goal, "slo-tree")], by[(goal, "adaptive-tree")]
        out.update(tight_slo_tree=st["attainment_by_class"]["tight"],
                   tight_adaptive_tree=at["attainment_by_class"]["tight"],
                   goodput_slo_tree_vs_adaptive_tree=st["goodput"] / at["goodput"] if at["goodput"] else None)
    return out


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
