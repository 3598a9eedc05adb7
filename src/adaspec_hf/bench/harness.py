"""Benchmark harness: compare decoding methods side by side on one pair, one machine, one run.

Methods come from :mod:`adaspec_hf.bench.methods`. Every method's greedy output is checked against
vanilla's and a mismatch fails loudly (:class:`BenchmarkMismatch`): a speed-up of a method that
changes the output is no speed-up. Results: JSON + a markdown table (+ PNG plots) under
``benchmarks/results/``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import transformers
from tqdm.auto import tqdm

from adaspec_hf.bench.methods import resolve_method
from adaspec_hf.machine import load_averages

RESULTS_DIR = Path("benchmarks") / "results"
PLOT_DPI = 120


class BenchmarkMismatch(AssertionError):
    """A speculative method's greedy output differs from the target's own."""


def _count_new(seq: torch.Tensor, prompt_len: int, eos) -> int:
    """Generated tokens: a row counts up to and including its first EOS (padding follows it)."""
    gen = seq[:, prompt_len:]
    eos_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    if not eos_ids:
        return int(gen.numel())
    is_eos = torch.isin(gen, torch.tensor(eos_ids))
    first = torch.where(is_eos.any(1), is_eos.to(torch.int8).argmax(1) + 1, gen.shape[1])
    return int(first.sum())


def _gen_kwargs(do_sample: bool, temperature: float, max_new: int) -> dict:
    kw = dict(max_new_tokens=max_new, do_sample=do_sample)
    if do_sample:
        kw.update(temperature=temperature, top_k=0, top_p=1.0)
    return kw


@dataclass
class Row:
    method: str
    batch: int
    tokens_per_s: float  # median over repeats of the repeat's new tokens / its time
    times: list[float]
    new_tokens: int  # the last repeat's (the one whose outputs are checked)
    speedup: float | None = None
    accepted_per_step: float | None = None
    mean_draft_len: float | None = None
    target_forwards: float | None = None
    decision_share: float | None = None  # share of step time in the policy's calls (adaspec methods)
    idle_levels: float | None = None  # draft levels per step past the deepest verified node
    matches_vanilla: bool | None = None
    note: str = ""
    config: dict | None = None  # the AdaptiveConfig of an adaspec method, as it ran
    # new tokens per repeat (empty: ``new_tokens`` every time). Sampled texts differ from repeat to
    # repeat (each has its own seed) and end at EOS at different lengths, so a repeat's rate is its
    # own tokens over its own time; dividing the last repeat's count by the median time misstated
    # every sampled rate by the ratio of the two texts' lengths
    tokens: list[int] = field(default_factory=list)

    def rates(self) -> list[float]:
        """Tokens per second of each repeat."""
        counts = self.tokens or [self.new_tokens] * len(self.times)
        return [n / max(t, 1e-9) for n, t in zip(counts, self.times)]


@dataclass
class BenchResult:
    name: str
    config: dict
    rows: list[Row] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"name": self.name, "config": self.config, "rows": [asdict(r) for r in self.rows]}

    def table(self) -> str:
        head = ("| method | batch | tokens/s | speed-up vs vanilla | accepted/step | draft len | target passes | "
                "decision % | idle levels/step | greedy == vanilla |")
        lines = [head, "|" + "---|" * 10]
        for r in self.rows:
            def f(x, fmt):
                return "" if x is None else format(x, fmt)
            eq = "" if r.matches_vanilla is None else ("yes" if r.matches_vanilla else "NO")
            lines.append(
                f"| {r.method} | {r.batch} | {r.tokens_per_s:.1f} | {f(r.speedup, '.2f')} | "
                f"{f(r.accepted_per_step, '.2f')} | {f(r.mean_draft_len, '.2f')} | {f(r.target_forwards, '.0f')} | "
                f"{f(None if r.decision_share is None else 100 * r.decision_share, '.1f')} | {f(r.idle_levels, '.2f')} | {eq}"
                + (f" ({r.note})" if r.note else "") + " |"
            )
        return "\n".join(lines)


def machine_info() -> dict:
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()}
    info["transformers"] = transformers.__version__
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    else:
        info["device"] = platform.processor() or platform.machine()
    return info


def batches_of(prompts: list[list[int]], batch: int, pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Left-padded batches of token-id prompts."""
    out = []
    for i in range(0, len(prompts) - batch + 1, batch):
        chunk = prompts[i: i + batch]
        width = max(len(p) for p in chunk)
        ids = torch.full((batch, width), pad_id, dtype=torch.long)
        mask = torch.zeros(batch, width, dtype=torch.long)
        for j, p in enumerate(chunk):
            ids[j, width - len(p):] = torch.tensor(p)
            mask[j, width - len(p):] = 1
        out.append((ids, mask))
    return out


def _sync(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def run_benchmark(
    name: str,
    target,
    draft,
    prompts: Sequence[Sequence[int]],
    methods: Sequence[str],
    batch_sizes: Sequence[int] = (1,),
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 0.7,
    repeats: int = 3,
    warmup: int = 1,
    n_batches: int | None = None,
    seed: int = 0,
    pad_token_id: int = 0,
    eos_token_id=None,
    check: bool = True,
    progress: bool = True,
) -> BenchResult:
    """Time every method on the same batches; median over ``repeats`` of the whole batch set."""
    prompts = [list(p) for p in prompts]
    gen_kw = _gen_kwargs(do_sample, temperature, max_new_tokens)
    gen_kw.update(pad_token_id=pad_token_id, eos_token_id=eos_token_id)
    resolved = [resolve_method(m) for m in methods]
    result = BenchResult(name, {
        "methods": list(methods), "batch_sizes": list(batch_sizes), "max_new_tokens": max_new_tokens,
        "do_sample": do_sample, "temperature": temperature if do_sample else None, "repeats": repeats,
        "n_prompts": len(prompts), "target": getattr(target.config, "_name_or_path", "") or type(target).__name__,
        "draft": getattr(draft.config, "_name_or_path", "") or type(draft).__name__,
        "target_params": sum(p.numel() for p in target.parameters()),
        "draft_params": sum(p.numel() for p in draft.parameters()),
        "dtype": str(target.dtype), "machine": machine_info(),
        # 1/5/15-minute load averages: a busy machine slows 2-thread torch several-fold (the 1-minute
        # figure lags: a process that ended seconds ago still shows in it)
        "load_before": load_averages(),
    })
    total = sum(len(batch_sizes) for _ in resolved)
    bar = tqdm(total=total, desc=name, disable=not progress)
    for bs in batch_sizes:
        batches = batches_of(prompts, bs, pad_token_id)
        if n_batches is not None:
            batches = batches[:n_batches]
        if not batches:
            raise ValueError(f"not enough prompts ({len(prompts)}) for batch size {bs}")
        # methods take turns on each batch (rotated, so none always runs after the same one) and
        # repeats go round again: this CPU's speed drifts by +-20% over a few seconds, and a method
        # timed over all batches at once met a different machine than the next one (the same run
        # of static-7 measured 4.9 s and 5.6 s minutes apart)
        todo = [m for m in resolved if not (m.batch1_only and bs > 1)]
        bar.update(len(resolved) - len(todo))
        times: dict[str, list[float]] = {m.name: [] for m in todo}
        counts: dict[str, list[int]] = {m.name: [] for m in todo}
        last: dict[str, tuple[list, list]] = {}
        for rep in range(warmup + repeats):
            took = {m.name: 0.0 for m in todo}
            made = {m.name: 0 for m in todo}
            runs: dict[str, tuple[list, list]] = {m.name: ([], []) for m in todo}
            for bi, (ids, mask) in enumerate(batches):
                ids, mask = ids.to(target.device), mask.to(target.device)
                shift = (rep * len(batches) + bi) % len(todo)
                for method in todo[shift:] + todo[:shift]:
                    bar.set_postfix_str(f"{method.name} b={bs} rep {rep + 1}/{warmup + repeats}")
                    torch.manual_seed(seed + rep * len(batches) + bi)
                    _sync(target)
                    t0 = time.perf_counter()
                    o = method.fn(target, draft, ids, mask, gen_kw)
                    _sync(target)
                    took[method.name] += time.perf_counter() - t0
                    seq = o.sequences.cpu()
                    made[method.name] += _count_new(seq, ids.shape[1], eos_token_id)
                    runs[method.name][0].append(seq)
                    runs[method.name][1].append(o)
            if rep >= warmup:
                for m in todo:
                    times[m.name].append(took[m.name])
                    counts[m.name].append(made[m.name])
                last = runs
        vanilla_out: list[torch.Tensor] | None = None
        base_tps = None
        for method in todo:
            outs, stats = last[method.name]
            row = Row(method.name, bs, 0.0, [round(t, 6) for t in times[method.name]], counts[method.name][-1],
                      tokens=counts[method.name])
            row.tokens_per_s = statistics.median(row.rates())
            acc = [s.accepted_per_step for s in stats if s.accepted_per_step is not None]
            if acc:
                row.accepted_per_step = sum(acc) / len(acc)
                row.mean_draft_len = sum(s.mean_draft_len for s in stats) / len(stats)
                row.target_forwards = sum(s.target_forwards for s in stats) / len(stats)
                row.config = stats[-1].config
                if stats[-1].decision_share is not None:
                    row.decision_share = sum(s.decision_share for s in stats) / len(stats)
                    row.idle_levels = sum(s.idle_levels for s in stats) / len(stats)
            if method.name == "vanilla":
                vanilla_out, base_tps = outs, row.tokens_per_s
            if base_tps:
                row.speedup = row.tokens_per_s / base_tps
            if vanilla_out is not None and not do_sample and method.name != "vanilla":
                row.matches_vanilla = all(torch.equal(a, b) for a, b in zip(outs, vanilla_out))
                if check and not row.matches_vanilla:
                    bar.close()
                    raise BenchmarkMismatch(
                        f"{method.name} at batch {bs}: greedy output differs from vanilla generate")
            result.rows.append(row)
            bar.update(1)
    bar.close()
    result.config["load_after"] = load_averages()
    return result


def speed_ratios(rows: Sequence[Row], ours: str, others: Sequence[str]) -> dict:
    """``ours`` against the fastest of ``others``, three ways, so a reader can tell a real gap from
    this CPU's noise (its speed drifts by +-20% over seconds):

    * ``hindsight``: ratio of median tokens/s to the best of ``others`` by median (the headline);
    * ``paired``: the median over repeats of the same ratio within each repeat (methods took turns
      on every batch, so a repeat's drift falls on all of them alike), with its min and max;
    * ``held_out``: per repeat, the best of ``others`` is chosen on the *other* repeats, then
      compared within this one; the best of eight noisy timings is biased fast (the max of noisy
      estimates overshoots the true max), and choosing on separate data removes that bias.
    """
    by = {r.method: r for r in rows}
    rates = {m: by[m].rates() for m in [ours, *others]}
    best = max(others, key=lambda m: by[m].tokens_per_s)
    paired = [a / b for a, b in zip(rates[ours], rates[best])]
    out = {"best": best, "hindsight": by[ours].tokens_per_s / by[best].tokens_per_s,
           "paired": statistics.median(paired), "paired_min": min(paired), "paired_max": max(paired),
           "repeats": len(paired)}
    n = len(paired)
    if n >= 2:
        held = []
        for r in range(n):
            pick = max(others, key=lambda m: statistics.median(x for i, x in enumerate(rates[m]) if i != r))
            held.append(rates[ours][r] / rates[pick][r])
        out["held_out"] = statistics.median(held)
    return out


def write_results(result: BenchResult, out_dir: Path | str = RESULTS_DIR, plot: bool = True) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{result.name}.json", "md": out_dir / f"{result.name}.md"}
    paths["json"].write_text(json.dumps(result.to_json(), indent=2))
    paths["md"].write_text(f"# {result.name}\n\n{result.table()}\n")
    batch_sizes = sorted({r.batch for r in result.rows})
    if plot and len(batch_sizes) > 1:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for m in dict.fromkeys(r.method for r in result.rows):
            pts = [(r.batch, r.tokens_per_s) for r in result.rows if r.method == m]
            if len(pts) > 1:
                ax.plot(*zip(*pts), marker="o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("tokens/s")
        ax.set_title(result.name)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths["png"] = out_dir / f"{result.name}.png"
        fig.savefig(paths["png"], dpi=PLOT_DPI)
        plt.close(fig)
    return paths


def pair_arguments(description: str) -> argparse.ArgumentParser:
    """The arguments every benchmark script shares: which pair, and where results go."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--target", help="HF id/path of the target (default: the built-in pair)")
    ap.add_argument("--draft", help="HF id/path of the draft (default: the built-in pair)")
    ap.add_argument("--allow-weak-pair", action="store_true", help="use a built-in pair that missed its gates")
    ap.add_argument("--out", default="benchmarks/results")
    return ap


def simulation_arguments(description: str, n_prompts: int = 32) -> argparse.ArgumentParser:
    """:func:`pair_arguments` plus what the offline simulations share: the traces' prompts, length,
    modes and sampling temperature."""
    ap = pair_arguments(description)
    ap.add_argument("--n-prompts", type=int, default=n_prompts)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--modes", default="greedy,sampling")
    ap.add_argument("--temperature", type=float, default=0.7)
    return ap


def open_pair(args, what: str | None = "timings will be disturbed"):
    """(target, draft, tokenizer) from :func:`pair_arguments`' options, after warning when the
    machine is busy (``what``: what a busy machine spoils in this benchmark; None: nothing is timed)."""
    from adaspec_hf.machine import is_busy, load_average
    from adaspec_hf.pair import load_models

    load = load_average()
    if what is not None and is_busy(load):
        print(f"WARNING: the machine is busy (load average {load}): {what}")
    return load_models(args.target, args.draft, allow_weak_pair=args.allow_weak_pair)
