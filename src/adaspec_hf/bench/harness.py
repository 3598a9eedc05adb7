"""Benchmark harness: compare decoding methods side by side on one pair, one machine, one run.

Methods are registered by name (``vanilla``, ``hf-assisted``, ``hf-assisted-heuristic``,
``hf-assisted-kK``, ``static-K``, ``adaptive``, ``heuristic``, ``confidence``, ``smartspec``,
``adaptive-tree`` ...). Every method's greedy output is checked against vanilla's and a mismatch
fails loudly. Results: JSON + a markdown table (+ PNG plots) under ``benchmarks/results/``.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

logger = logging.getLogger("adaspec_hf")

RESULTS_DIR = Path("benchmarks") / "results"


class BenchmarkMismatch(AssertionError):
    """A speculative method's greedy output differs from the target's own."""


@dataclass
class RunOutput:
    sequences: torch.Tensor
    new_tokens: int
    accepted_per_step: float | None = None
    mean_draft_len: float | None = None
    target_forwards: int | None = None


MethodFn = Callable[..., RunOutput]


@dataclass
class Method:
    name: str
    fn: MethodFn
    batch1_only: bool = False


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


def _vanilla(target, draft, ids, mask, gen_kw) -> RunOutput:
    seq = target.generate(input_ids=ids, attention_mask=mask, **gen_kw)
    return RunOutput(seq, 0, None, None, seq.shape[1] - ids.shape[1])


def _hf_assisted(schedule: str | None, k: int | None):
    def run(target, draft, ids, mask, gen_kw) -> RunOutput:
        saved = copy.deepcopy(draft.generation_config)
        try:
            kw = dict(gen_kw)
            if k is not None:  # isolate overhead: constant k, confidence threshold off
                kw.update(num_assistant_tokens=k, num_assistant_tokens_schedule="constant",
                          assistant_confidence_threshold=0.0)
                draft.generation_config.num_assistant_tokens = k
                draft.generation_config.num_assistant_tokens_schedule = "constant"
                draft.generation_config.assistant_confidence_threshold = 0.0
            elif schedule is not None:
                kw.update(num_assistant_tokens_schedule=schedule)
                draft.generation_config.num_assistant_tokens_schedule = schedule
            seq = _original_generate(target)(input_ids=ids, attention_mask=mask, assistant_model=draft, **kw)
        finally:
            draft.generation_config = saved
        return RunOutput(seq, 0)
    return run


def _ours(policy: str):
    def run(target, draft, ids, mask, gen_kw) -> RunOutput:
        from adaspec_hf.integrations.hf.generate import adaptive_generate

        seq = adaptive_generate(target, input_ids=ids, attention_mask=mask, assistant_model=draft,
                                draft_policy=policy, **gen_kw)
        st = target.adaspec_stats
        return RunOutput(seq, 0, st.accepted_per_step, st.mean_draft_len, st.target_forwards)
    return run


def _original_generate(model):
    return getattr(model, "_adaspec_original_generate", None) or model.generate


def resolve_method(name: str) -> Method:
    if name == "vanilla":
        return Method(name, _vanilla)
    if name == "hf-assisted":
        return Method(name, _hf_assisted(None, None), batch1_only=True)
    if name == "hf-assisted-heuristic":
        return Method(name, _hf_assisted("heuristic", None), batch1_only=True)
    if m := re.fullmatch(r"hf-assisted-k(\d+)", name):
        return Method(name, _hf_assisted("constant", int(m.group(1))), batch1_only=True)
    from adaspec_hf.policies.registry import make_policy

    make_policy(name) if not name.startswith(("adaptive", "smartspec")) else None  # validate early
    return Method(name, _ours(name))


@dataclass
class Row:
    method: str
    batch: int
    tokens_per_s: float
    times: list[float]
    new_tokens: int
    speedup: float | None = None
    accepted_per_step: float | None = None
    mean_draft_len: float | None = None
    target_forwards: float | None = None
    matches_vanilla: bool | None = None
    note: str = ""


@dataclass
class BenchResult:
    name: str
    config: dict
    rows: list[Row] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"name": self.name, "config": self.config, "rows": [asdict(r) for r in self.rows]}

    def table(self) -> str:
        head = "| method | batch | tokens/s | speed-up vs vanilla | accepted/step | draft len | target passes | greedy == vanilla |"
        lines = [head, "|" + "---|" * 8]
        for r in self.rows:
            def f(x, fmt):
                return "" if x is None else format(x, fmt)
            eq = "" if r.matches_vanilla is None else ("yes" if r.matches_vanilla else "NO")
            lines.append(
                f"| {r.method} | {r.batch} | {r.tokens_per_s:.1f} | {f(r.speedup, '.2f')} | "
                f"{f(r.accepted_per_step, '.2f')} | {f(r.mean_draft_len, '.2f')} | {f(r.target_forwards, '.0f')} | {eq}"
                + (f" ({r.note})" if r.note else "") + " |"
            )
        return "\n".join(lines)


def machine_info() -> dict:
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except Exception:  # pragma: no cover
        pass
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
    from tqdm.auto import tqdm

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
    })
    total = sum(len(batch_sizes) for _ in resolved)
    bar = tqdm(total=total, desc=name, disable=not progress)
    for bs in batch_sizes:
        batches = batches_of(prompts, bs, pad_token_id)
        if n_batches is not None:
            batches = batches[:n_batches]
        if not batches:
            raise ValueError(f"not enough prompts ({len(prompts)}) for batch size {bs}")
        vanilla_out: list[torch.Tensor] | None = None
        base_tps = None
        for method in resolved:
            bar.set_postfix_str(f"{method.name} b={bs}")
            if method.batch1_only and bs > 1:
                bar.update(1)
                continue
            times, outs, stats = [], [], []
            for rep in range(warmup + repeats):
                torch.manual_seed(seed + rep)
                rep_outs, rep_stats = [], []
                _sync(target)
                t0 = time.perf_counter()
                for ids, mask in batches:
                    ids, mask = ids.to(target.device), mask.to(target.device)
                    o = method.fn(target, draft, ids, mask, gen_kw)
                    rep_outs.append(o.sequences.cpu())
                    rep_stats.append(o)
                _sync(target)
                dt = time.perf_counter() - t0
                if rep >= warmup:
                    times.append(dt)
                    outs, stats = rep_outs, rep_stats
            new = sum(_count_new(o, b[0].shape[1], eos_token_id) for o, b in zip(outs, batches))
            med = statistics.median(times)
            row = Row(method.name, bs, new / med, [round(t, 4) for t in times], new)
            acc = [s.accepted_per_step for s in stats if s.accepted_per_step is not None]
            if acc:
                row.accepted_per_step = sum(acc) / len(acc)
                row.mean_draft_len = sum(s.mean_draft_len for s in stats) / len(stats)
                row.target_forwards = sum(s.target_forwards for s in stats) / len(stats)
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
    return result


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
        fig.savefig(paths["png"], dpi=120)
        plt.close(fig)
    return paths


# ------------------------------------------------------------------------------------ CLI
def register_cli(subparsers) -> None:
    p = subparsers.add_parser("bench", help="compare decoding methods side by side (tokens/s, speed-up)")
    p.add_argument("--target", help="HF id/path of the target (default: the built-in pair)")
    p.add_argument("--draft", help="HF id/path of the draft (default: the built-in pair)")
    p.add_argument("--methods", default="vanilla,hf-assisted,hf-assisted-heuristic,static-4,adaptive",
                   help="comma-separated method names")
    p.add_argument("--batch-sizes", default="1", help="comma-separated batch sizes")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--n-prompts", type=int, default=8)
    p.add_argument("--sample", action="store_true", help="sampling instead of greedy")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--name", default="bench")
    p.add_argument("--out", default=str(RESULTS_DIR))
    p.add_argument("--allow-weak-pair", action="store_true",
                   help="run on a built-in pair that missed its quality gates (its figures mean little)")
    p.set_defaults(func=_cli)
    from adaspec_hf.bench.serving import register_serve_cli  # `adaspec-hf bench serve ...`

    register_serve_cli(p.add_subparsers(dest="bench_command", title="sub-benchmarks"))


def load_prompt_ids(tokenizer, n: int, pair_dir=None) -> list[list[int]]:
    """Held-out prompts of the built-in pair (a `datasets` Dataset), tokenized."""
    from adaspec_hf.pair.build import load_prompts

    ds = load_prompts(pair_dir, n=n)
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ds["prompt"]]


def _cli(args: argparse.Namespace) -> int:
    from adaspec_hf.pair.build import load_models

    dtype = getattr(torch, args.dtype)
    target, draft, tok = load_models(args.target, args.draft, dtype=dtype, device=args.device,
                                     allow_weak_pair=args.allow_weak_pair)
    prompts = load_prompt_ids(tok, args.n_prompts) if args.target is None else _default_text_prompts(tok, args.n_prompts)
    res = run_benchmark(
        args.name, target, draft, prompts, [m.strip() for m in args.methods.split(",") if m.strip()],
        batch_sizes=[int(b) for b in args.batch_sizes.split(",")], max_new_tokens=args.max_new_tokens,
        do_sample=args.sample, temperature=args.temperature, repeats=args.repeats,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    print(res.table())
    for kind, path in write_results(res, args.out).items():
        print(f"{kind}: {path}")
    return 0


def _default_text_prompts(tok, n: int) -> list[list[int]]:
    """Prompts for arbitrary HF pairs: the built-in held-out prompt texts if present, else fixed text."""
    try:
        from adaspec_hf.pair.build import load_prompts

        texts = load_prompts(None, n=n)["prompt"]
    except Exception:
        texts = [
            "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
            "The history of the Roman Empire begins",
            "import os\nimport sys\n\n\ndef main():\n",
            "Speculative decoding speeds up inference because",
        ] * ((n + 3) // 4)
    return [tok(t, add_special_tokens=False)["input_ids"] for t in list(texts)[:n]]
