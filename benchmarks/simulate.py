"""Planners vs every fixed draft length, offline: traces of the built-in pair replayed on its profiled
cost curve (no timing noise), plus the oracle bound.

For each draft (built-in, "perfect": the target without its identity layers, "random": fresh
weights) and each mode (greedy, T=0.7), the target's outputs are generated once, the draft's
candidates at every position recorded, and every policy replayed at every batch size:

    python benchmarks/simulate.py                       # results in benchmarks/results/simulate.*
    python benchmarks/simulate.py --n-prompts 8 --batch-sizes 1,4 --drafts built-in

Reported per (draft, mode, batch): tokens/s on the cost curve, ratio to vanilla, accepted tokens
per target pass, mean draft length, decision time share; ours / best static and ours / oracle
(batch 1; the oracle chooses chain lengths, so trees may pass it); a mixed batch (rows the draft
predicts well next to rows it does not). Each policy is replayed twice: the reported (warm) pass
keeps what the cold first pass learnt about the pair, as a session's later calls do; the cold
figures are reported next to it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from adaspec_hf.bench.drafts import perfect_draft, random_draft
from adaspec_hf.bench.harness import machine_info, simulation_arguments
from adaspec_hf.bench.methods import our_methods, planner_shapes
from adaspec_hf.bench.prompts import load_prompt_ids
from adaspec_hf.machine import is_busy, load_average
from adaspec_hf.pair import load_models
from adaspec_hf.policies.build import fresh_state
from adaspec_hf.sim import GpuShapedCost, ProfileCost, Trace, oracle_chain, policy_on, record_trace, simulate

STATIC = list(range(0, 11))
BASELINES = ["heuristic", "confidence", "smartspec", "tree-4x2", "tree-3x3"]
OURS = {*our_methods(False), *our_methods(True)}


def run_policies(names, trace: Trace, cost, target, draft, batch: int) -> dict[str, dict]:
    """Each policy replayed twice on one object: a cold pass (a fresh pair state, as a process's first
    call) and the reported warm pass, where what the policy learnt about the pair carries over, as it
    does across a session's calls and in the timed benchmark (which warms up first). At 16 rows the
    trace is one call of ~8 steps, and the cold pass is mostly the calibration's warm-up."""
    out = {}
    for name in names:
        policy = policy_on(name, cost, target, draft, sampling=trace.sampling)
        cold = simulate(policy, trace, cost, batch=batch)
        res = cold if name.startswith("static-") else simulate(policy, trace, cost, batch=batch)
        out[name] = res.summary()
        out[name]["cold_tokens_per_s"] = round(cold.tokens_per_s, 3)
        if batch == 1 and name in OURS:  # per-step series for the plot (kept small: batch 1, ours)
            out[name].update(chosen=res.chosen, accepted_per_step=res.accepted_per_step)
    return out


def table(rows: dict[str, dict], vanilla: float) -> str:
    lines = [f"  {'method':<14} {'tok/s':>8} {'x van':>6} {'tok/pass':>8} {'draft':>6} {'decide':>7}"]
    for name, r in rows.items():
        lines.append(f"  {name:<14} {r['tokens_per_s']:>8.1f} {r['tokens_per_s'] / vanilla:>6.2f} "
                     f"{r['tokens_per_pass']:>8.2f} {r['mean_draft']:>6.2f} {100 * r['decision_fraction']:>6.1f}%")
    return "\n".join(lines)


def mixed_trace(trace: Trace, n: int) -> Trace:
    """Rows the draft predicts best next to rows it predicts worst, interleaved: each batch of an
    even size holds both halves."""
    rows = sorted(trace.rows, key=lambda r: r.acceptance_rate())
    lo, hi = rows[: n // 2], rows[-(n // 2):]
    mixed = [r for pair in zip(hi, lo) for r in pair]
    return Trace(mixed, trace.sampling, {**trace.meta, "mixed": True})


def main() -> None:
    ap = simulation_arguments(__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    ap.add_argument("--drafts", default="built-in,perfect,random")
    ap.add_argument("--cost", choices=["profile", "gpu"], default="profile",
                    help="charge steps with the pair's profile on this machine, or a GPU-shaped curve (verify "
                         "flat up to 256 tokens then linear, 2 ms per draft level; planners plan with it)")
    ap.add_argument("--draft-level-ms", type=float, default=0.0,
                    help="with --cost profile: charge each draft level this many ms beyond its bare forward "
                         "(the real loop's per-level work; see the planner's measured draft cost per level)")
    ap.add_argument("--verify-scale", type=float, default=1.0,
                    help="with --cost profile: charge each verify this multiple of the profile's (the loop's "
                         "measured verify time over the profile's; see benchmarks/step_breakdown.py)")
    args = ap.parse_args()
    if not args.verify_scale > 0:
        ap.error(f"--verify-scale must be > 0, got {args.verify_scale}")

    load = load_average()
    if is_busy(load):
        print(f"warning: load average {load:.1f}: decision-time shares are inflated (simulated times are not)")
    target, draft, tok = load_models(args.target, args.draft, allow_weak_pair=args.allow_weak_pair)
    prompts = load_prompt_ids(tok, args.n_prompts)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    drafts = {"built-in": draft}
    if "perfect" in args.drafts:
        drafts["perfect"] = perfect_draft(target)
    if "random" in args.drafts:
        drafts["random"] = random_draft(draft)
    drafts = {k: v for k, v in drafts.items() if k in args.drafts.split(",")}
    result: dict = {"machine": machine_info(), "load_average": load, "args": vars(args), "runs": {}}
    summary: dict = {}
    for mode in args.modes.split(","):
        sampling = mode == "sampling"
        outputs = None
        for dname, d in drafts.items():
            t0 = time.perf_counter()
            trace = record_trace(target, d, prompts, args.max_new_tokens, do_sample=sampling,
                                 temperature=args.temperature, seed=0, pad_token_id=tok.pad_token_id or 0,
                                 eos_token_id=tok.eos_token_id, outputs=outputs)
            outputs = [r.tokens for r in trace.rows]  # the target's outputs do not depend on the draft
            cost = GpuShapedCost() if args.cost == "gpu" else ProfileCost(fresh_state(target, d).latency,
                                                                          level_extra=args.draft_level_ms / 1e3,
                                                                          verify_scale=args.verify_scale)
            print(f"\n== {dname} draft, {mode}: trace of {len(trace.rows)} rows in {time.perf_counter() - t0:.0f} s; "
                  f"draft argmax = output at {sum(r.acceptance_rate() for r in trace.rows) / len(trace.rows):.2f} "
                  "of positions")
            for b in batches:
                ours = our_methods(sampling)
                tree_m, chain_m = planner_shapes(sampling)
                names = [f"static-{k}" for k in STATIC] + (BASELINES if b == 1 else []) + ours
                rows = run_policies(names, trace, cost, target, d, b)
                van = rows["static-0"]["tokens_per_s"]
                best_k = max(STATIC, key=lambda k: rows[f"static-{k}"]["tokens_per_s"])
                best = rows[f"static-{best_k}"]["tokens_per_s"]
                key = f"{dname}/{mode}/b{b}"
                entry = {"rows": rows, "best_static": best_k, "vanilla_tok_s": van,
                         "adaptive_vs_best_static": rows["adaptive"]["tokens_per_s"] / best,
                         "adaptive_vs_max_vanilla_static": rows["adaptive"]["tokens_per_s"] / max(best, van),
                         "adaptive_is": "trees" if sampling else "chains",
                         "tree_vs_chain": rows[tree_m]["tokens_per_s"] / rows[chain_m]["tokens_per_s"],
                         "cold_adaptive_vs_best_static": rows["adaptive"]["cold_tokens_per_s"] / best,
                         "cold_tree_vs_chain": (rows[tree_m]["cold_tokens_per_s"]
                                                / rows[chain_m]["cold_tokens_per_s"])}
                if b == 1:
                    tok_, sec = oracle_chain(trace, cost)
                    entry["oracle_tok_s"] = tok_ / sec
                    entry["adaptive_vs_oracle"] = rows["adaptive"]["tokens_per_s"] * sec / tok_
                print(f"-- batch {b}: best static-{best_k}; adaptive / best static {entry['adaptive_vs_best_static']:.3f}"
                      f" (cold {entry['cold_adaptive_vs_best_static']:.3f})"
                      + (f", / oracle {entry['adaptive_vs_oracle']:.3f}" if b == 1 else ""))
                shown = {n: r for n, r in rows.items() if n in ("static-0", f"static-{best_k}", *BASELINES, *ours)}
                print(table(shown, van))
                result["runs"][key] = entry
                summary[key] = {k: round(v, 4) if isinstance(v, float) else v for k, v in entry.items() if k != "rows"}
            if dname == "built-in" and len(trace.rows) >= 4:
                mix = mixed_trace(trace, min(len(trace.rows), 8))
                for b in [x for x in batches if 2 <= x <= len(mix.rows)][:3]:
                    rows = run_policies([f"static-{k}" for k in STATIC] + ["adaptive"], mix, cost, target, d, b)
                    best_k = max(STATIC, key=lambda k: rows[f"static-{k}"]["tokens_per_s"])
                    ratio = rows["adaptive"]["tokens_per_s"] / rows[f"static-{best_k}"]["tokens_per_s"]
                    cold = rows["adaptive"]["cold_tokens_per_s"] / rows[f"static-{best_k}"]["tokens_per_s"]
                    key = f"mixed/{mode}/b{b}"
                    result["runs"][key] = {"rows": rows, "best_static": best_k, "adaptive_vs_best_uniform": ratio,
                                           "cold_adaptive_vs_best_uniform": cold}
                    summary[key] = {"best_static": best_k, "adaptive_vs_best_uniform": round(ratio, 4),
                                    "cold_adaptive_vs_best_uniform": round(cold, 4)}
                    print(f"-- mixed batch {b}: adaptive / best uniform static-{best_k} = {ratio:.3f} (cold {cold:.3f})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "simulate" if args.cost == "profile" else f"simulate_{args.cost}"
    if args.draft_level_ms:
        stem += f"_level{args.draft_level_ms:g}ms"
    if args.verify_scale != 1.0:
        stem += f"_verify{args.verify_scale:g}x"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}_summary.json").write_text(json.dumps(summary, indent=1))
    plot(result, out / f"{stem}.png")
    print(f"\nwrote {out / stem}.json, {stem}_summary.json, {stem}.png")


def plot(result: dict, path: Path) -> None:
    """Chosen draft length and accepted tokens over steps, adaptive at batch 1, per draft and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in result["runs"] if k.endswith("/b1") and not k.startswith("mixed")]
    if not keys:
        return
    fig, axes = plt.subplots(len(keys), 1, figsize=(9, 2.2 * len(keys)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        r = result["runs"][key]["rows"]["adaptive"]
        ax.plot(r["chosen"], label="drafted (verified nodes)", lw=0.8)
        ax.plot(r["accepted_per_step"], label="accepted", lw=0.8)
        ax.axhline(result["runs"][key]["best_static"], color="grey", ls=":", label="best static k")
        ax.set_title(key, fontsize=9)
        ax.set_ylabel("tokens")
    axes[0, 0].legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
