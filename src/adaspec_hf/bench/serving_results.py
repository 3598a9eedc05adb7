"""Serving benchmark results: one row per run, pooled over workload seeds, written as JSON, a
Markdown table and a plot (attainment and goodput against the request rate)."""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from adaspec_hf.bench.harness import RESULTS_DIR


def _f(x, fmt=".1f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def pool_runs(rows: Sequence[dict]) -> list[dict]:
    """One row per (rate, system) over its runs (one per workload seed): attainment as met requests
    over all requests (overall and per SLO class), goodput and throughput as the mean of the runs,
    and each run's tight-class attainment and goodput, to show the spread. Why pool: at one rate
    and seed, one run of a system differed from the next by more than the systems differed from
    each other (tight-class attainment 0.47-0.93 for one system over three runs); a ratio between
    systems is only worth writing down over several workloads."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["rate"], r["system"]), []).append(r)
    out = []
    for (rate, system), runs in groups.items():
        n = sum(r["requests"] for r in runs)
        classes = list(dict.fromkeys(c for r in runs for c in r.get("requests_by_class", {})))
        by_class = {}
        for c in classes:
            n_c = sum(r["requests_by_class"].get(c, 0) for r in runs)
            met_c = sum(r["attainment_by_class"].get(c, 0.0) * r["requests_by_class"].get(c, 0) for r in runs)
            by_class[c] = met_c / n_c if n_c else None
        out.append({
            "rate": rate, "system": system, "runs": len(runs), "seeds": [r.get("seed") for r in runs],
            "requests": n, "finished": sum(r["finished"] for r in runs),
            "slo_attainment": sum(r["slo_attainment"] * r["requests"] for r in runs) / max(n, 1),
            "attainment_by_class": by_class,
            "goodput": statistics.fmean(r["goodput"] for r in runs),
            "goodput_by_class": {c: statistics.fmean(r["goodput_by_class"].get(c, 0.0) for r in runs) for c in classes},
            "throughput": statistics.fmean(r["throughput"] for r in runs),
            "accepted_per_step": statistics.fmean(r["accepted_per_step"] for r in runs),
            "tight_by_run": [r["attainment_by_class"].get("tight") for r in runs],
            "goodput_by_run": [r["goodput"] for r in runs],
        })
    return out


@dataclass
class ServingBenchResult:
    name: str
    config: dict
    rows: list[dict] = field(default_factory=list)
    requests: dict = field(default_factory=dict)

    @property
    def pooled(self) -> list[dict]:
        return pool_runs(self.rows)

    @property
    def n_seeds(self) -> int:
        return len({r.get("seed") for r in self.rows}) or 1

    def to_json(self) -> dict:
        out = {"name": self.name, "config": self.config, "rows": self.rows, "requests": self.requests}
        if self.n_seeds > 1:
            out["pooled"] = self.pooled
        return out

    def table(self) -> str:
        """One line per run; with several workload seeds, the pooled table follows."""
        seeds = self.n_seeds > 1
        head = ("| rate (req/s) | " + ("seed | " if seeds else "") + "system | SLO attainment | tight | loose "
                "| goodput (tok/s) | tight/loose goodput | throughput (tok/s) | TTFT p50/p99 (ms) | TPOT p50/p99 (ms) "
                "| accepted/step | finished |")
        lines = [head, "|" + "---|" * (13 if seeds else 12)]
        for r in self.rows:
            bc, gc = r.get("attainment_by_class", {}), r.get("goodput_by_class", {})
            lines.append(
                f"| {r['rate']:.2f} | " + (f"{r.get('seed')} | " if seeds else "")
                + f"{r['system']} | {_f(r['slo_attainment'], '.2f')} | {_f(bc.get('tight'), '.2f')} "
                f"| {_f(bc.get('loose'), '.2f')} | {_f(r['goodput'])} "
                f"| {_f(gc.get('tight'))}/{_f(gc.get('loose'))} | {_f(r['throughput'])} "
                f"| {_f(r['ttft_p50'], '.0f')}/{_f(r['ttft_p99'], '.0f')} | {_f(r['tpot_p50'])}/{_f(r['tpot_p99'])} "
                f"| {_f(r['accepted_per_step'], '.2f')} | {r['finished']}/{r['requests']} |")
        if seeds:
            lines += ["", f"Pooled over {self.n_seeds} workload seeds (attainment: met / all requests; goodput: "
                      "mean of the runs; per run: tight attainment and goodput)", "",
                      "| rate (req/s) | system | SLO attainment | tight | loose | goodput (tok/s) | throughput (tok/s) "
                      "| accepted/step | tight per run | goodput per run |", "|" + "---|" * 10]
            for p in self.pooled:
                bc = p["attainment_by_class"]
                lines.append(
                    f"| {p['rate']:.2f} | {p['system']} | {_f(p['slo_attainment'], '.2f')} "
                    f"| {_f(bc.get('tight'), '.2f')} "
                    f"| {_f(bc.get('loose'), '.2f')} | {_f(p['goodput'])} | {_f(p['throughput'])} "
                    f"| {_f(p['accepted_per_step'], '.2f')} | {' / '.join(_f(x, '.2f') for x in p['tight_by_run'])} "
                    f"| {' / '.join(_f(x) for x in p['goodput_by_run'])} |")
        return "\n".join(lines)


def write_serving_results(result: ServingBenchResult, out_dir: Path | str = RESULTS_DIR, plot: bool = True
                          ) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{result.name}.json", "md": out_dir / f"{result.name}.md"}
    paths["json"].write_text(json.dumps(result.to_json(), indent=2, default=str))
    cfg = result.config
    notes = [f"- {k}: {cfg[k]}" for k in ("command", "machine", "load_before", "load_after", "calibration", "slo_classes",
                                         "workload")
             if k in cfg]
    paths["md"].write_text(f"# {result.name}\n\n{result.table()}\n\n" + "\n".join(notes) + "\n")
    rates = sorted({r["rate"] for r in result.rows})
    if plot and rates:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        pooled = result.pooled  # one point per rate and system (the runs' pool when there are several seeds)
        for system in dict.fromkeys(r["system"] for r in pooled):
            pts = sorted((r["rate"], r["slo_attainment"], r["goodput"]) for r in pooled if r["system"] == system)
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=system)
            axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=system)
        axes[0].set_ylabel("SLO attainment")
        axes[0].set_ylim(-0.02, 1.02)
        axes[1].set_ylabel("goodput (tokens/s of SLO-meeting requests)")
        for ax in axes:
            ax.set_xlabel("request rate (req/s)")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(result.name)
        fig.tight_layout()
        paths["png"] = out_dir / f"{result.name}.png"
        fig.savefig(paths["png"], dpi=120)
        plt.close(fig)
    return paths
