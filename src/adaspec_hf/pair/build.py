"""The project's own offline target/draft pair, and loading of any HF pair.

No model can be downloaded where this project is developed and benchmarked, so it builds a pair
itself from local text (by default the Python standard library sources):

1. read the corpus and split it BY FILE into train and held-out parts (seeded);
2. train a byte-level BPE tokenizer (vocab 4096) and tokenize with `datasets` (batched ``.map``);
3. time a few training steps in fp32 and in bf16 autocast, with all threads and with one, and train
   with the fastest (bf16 is native on some CPUs and emulated, 10-25x slower, on others);
4. train the target (``LlamaForCausalLM``) with HF ``Trainer`` while the draft learns jointly from the
   target's (detached) logits by KL (``_JointTrainer.compute_loss``);
5. distill the draft further on the frozen target's logits, plus cross-entropy on the target's argmax
   (``_DistillTrainer.compute_loss``);
6. measure the quality gates on held-out files (:mod:`adaspec_hf.pair.gates`: target loss, greedy
   agreement, ROC AUC of the draft's confidence, distinct 4-grams of the target's greedy text) and the
   target/draft forward cost at a 256-token context; if the target is not expensive enough relative to
   the draft, *grow* it function-preservingly: append pre-norm decoder layers whose ``o_proj`` and
   ``down_proj`` are zero (exact identities that still cost real compute), verify the logits are
   unchanged, and record it in ``report.json`` and in the saved ``config.json``
   (``adaspec_identity_layers``);
7. save ``target/``, ``draft/`` (``save_pretrained`` + tokenizer), ``prompts.jsonl`` (held-out prompts
   with reference continuations) and ``report.json`` (measured quality, gates, timings; written last,
   it marks the pair as complete).

Training is budgeted in optimizer steps (tokens), not seconds: every machine trains the same recipe and
gets the same weights up to floating-point differences of the chosen precision; a slow or busy machine
only takes longer (the ETA from the timing probe is printed before training starts).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adaspec_hf.compat import cache_kwargs, output_cache
from adaspec_hf.machine import is_busy, load_average
from adaspec_hf.pair.gates import (
    Gates, WeakPairError, check_gates, distinct_ngrams, evaluate_gates, failed_gates, greedy_continuations,
    teacher_forced_stats,
)
from adaspec_hf.pair.setup import PROBE_ROWS, TrainingSetup, candidates, choose_training_setup

logger = logging.getLogger(__name__)

Path = pathlib.Path
RECIPE_VERSION = 2  # 2: step budget, measured precision/threads, quality gates
REPORT = "report.json"
PROMPTS = "prompts.jsonl"


# ------------------------------------------------------------------------------------------ recipe
@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    kv_heads: int | None = None


@dataclass(frozen=True)
class Recipe:
    """Sizes and training budget of a pair build (``FULL`` or ``QUICK``).

    The budget is in optimizer steps (tokens = steps x batch x block), never in seconds: every machine
    trains the same recipe, a slow or busy one just takes longer (its ETA is printed up front).
    """

    name: str
    target: ModelShape
    draft: ModelShape
    vocab_size: int = 4096
    block_size: int = 256
    batch_size: int = 4                   # target phase: small batches = more updates per token (measured better)
    distill_batch_size: int = 8
    max_chars: int | None = None          # corpus slice (seeded subset of files)
    target_steps: int = 640               # target LM training (with the draft's KL on its logits when joint);
                                          # 480 measured distinct-4grams 0.36 (loops), 640 gave 0.44
    distill_steps: int = 280              # draft distillation on the frozen target
    joint: bool = True                    # the draft learns from the target's logits while it trains
    target_lr: float = 2e-3                # 3e-3 at batch 4 measured worse (held-out loss 5.15 vs ~4.9)
    draft_lr: float = 3e-3
    warmup_steps: int = 20
    min_lr_rate: float = 0.1              # cosine decay down to this fraction of the peak LR
    kd_weight: float = 1.0                # weight of the draft's KL term in the joint phase
    joint_hard_weight: float = 0.0        # + CE on the target's argmax, joint phase (1.0 measured worse)
    distill_hard_weight: float = 1.0      # + CE on the target's argmax, distill phase: raises greedy agreement
                                          # and makes the draft's confidence rank agreement (AUC 0.66 -> 0.78)
    build_budget_s: float = 900.0         # the whole build on the reference machine (2 cores, fp32): reported
    eval_blocks: int = 64                 # held-out blocks for loss / agreement / AUC
    n_prompts: int = 64
    continuation_tokens: int = 64         # greedy continuations for the distinct-4-gram gate
    cost_context: int = 256
    cost_repeats: int = 100
    aim_ratio: float = 12.0               # grow the target until this (margin over the gate's 8x)
    max_grow_factor: float = 10.0         # at most this many times the trained layers in total
    gates: Gates = Gates()
    gates_apply: bool = True

    @property
    def tokens(self) -> dict:
        return {"target": self.target_steps * self.batch_size * self.block_size,
                "distill": self.distill_steps * self.distill_batch_size * self.block_size}


FULL = Recipe(
    name="full",
    target=ModelShape(hidden=256, layers=4, heads=4, intermediate=672),
    draft=ModelShape(hidden=128, layers=2, heads=2, intermediate=320),
)
QUICK = Recipe(
    name="quick",
    target=ModelShape(hidden=128, layers=2, heads=4, intermediate=352),
    draft=ModelShape(hidden=64, layers=1, heads=2, intermediate=176),
    block_size=128,
    batch_size=8,
    max_chars=1_500_000,
    target_steps=40,
    distill_steps=20,
    warmup_steps=5,
    eval_blocks=16,
    n_prompts=16,
    continuation_tokens=24,
    cost_repeats=10,
    aim_ratio=4.0,
    max_grow_factor=2.0,
    gates_apply=False,
)


# ------------------------------------------------------------------------------------------- paths
def default_cache_dir() -> pathlib.Path:
    """``$ADASPEC_HF_CACHE`` or ``~/.cache/adaspec_hf``."""
    env = os.environ.get("ADASPEC_HF_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "adaspec_hf"


def _corpus_key(corpus) -> list[str] | None:
    if corpus is None:
        return None
    paths = [corpus] if isinstance(corpus, (str, os.PathLike)) else list(corpus)
    return sorted(str(Path(p).expanduser().resolve()) for p in paths)


def default_pair_dir(*, quick: bool = False, seed: int = 0, corpus=None) -> pathlib.Path:
    name = "pair" + ("-quick" if quick else "") + (f"-seed{seed}" if seed else "")
    key = _corpus_key(corpus)
    if key is not None:
        name += "-" + hashlib.sha1("\n".join(key).encode()).hexdigest()[:10]
    return default_cache_dir() / name


def _read_report(pair_dir: Path) -> dict | None:
    try:
        rep = json.loads((pair_dir / REPORT).read_text())
    except (OSError, ValueError):
        return None
    if not rep.get("complete") or rep.get("recipe_version") != RECIPE_VERSION:
        return None
    if not all((pair_dir / m / "config.json").is_file() for m in ("target", "draft")):
        return None
    return rep


@contextlib.contextmanager
def _lock(path: Path):
    """Exclusive file lock next to ``path`` (two processes never build the same pair at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f".{path.name}.lock"
    with open(lock, "w") as fh:
        try:
            import fcntl
            fcntl.flock(fh, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - non-POSIX
            pass
        yield


# --------------------------------------------------------------------------------------- build API
def build_pair(out_dir=None, *, corpus=None, quick=False, seed=0, force=False, progress=True,
               precision: str = "auto") -> pathlib.Path:
    """Build (or find cached) the built-in target/draft pair; returns the pair directory.

    The directory holds ``target/`` and ``draft/`` (``save_pretrained``, tokenizer in both),
    ``prompts.jsonl`` (held-out ``{"prompt", "reference"}``) and ``report.json`` (measured budgets
    and quality). A complete pair with the same settings is returned at once unless ``force``.
    ``quick=True`` builds a tiny pair in about a minute (for tests; no quality gates). A full pair is
    saved even when it misses a quality gate (``report["gates_passed"]`` is False; loading it then
    needs ``allow_weak_pair=True``, and ``adaspec-hf pair build`` exits with status 1).
    ``precision``: ``"auto"`` (time fp32 and bf16 autocast here and keep the faster), ``"fp32"`` or
    ``"bf16"`` (the thread count is still measured).
    """
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    out = Path(out_dir).expanduser() if out_dir is not None else default_pair_dir(quick=quick, seed=seed,
                                                                                    corpus=corpus)
    want = {"quick": bool(quick), "seed": int(seed), "corpus": _corpus_key(corpus)}

    recipe = QUICK if quick else FULL
    told: list[bool] = []

    def cached() -> bool:
        rep = _read_report(out)
        if rep is None:
            return False
        if rep.get("recipe") != json.loads(json.dumps(asdict(recipe))):
            if not told:
                _say(progress, f"[adaspec-hf pair] {out} holds a pair of an older recipe: rebuilding it")
                told.append(True)
            return False
        have = {k: rep.get("settings", {}).get(k) for k in want}
        if have != want:
            raise FileExistsError(f"{out} holds a pair built with {have}, not {want}; pass force=True "
                                  "(CLI: --force) to rebuild it, or choose another directory")
        return True

    if not force and cached():
        return out
    with _lock(out):
        if not force and cached():  # another process finished it while we waited
            return out
        if out.exists() and any(out.iterdir()) and not (out / REPORT).exists() \
                and not (out / "target").exists():
            raise FileExistsError(f"{out} exists and is not a pair directory; refusing to overwrite it")
        _remove_stale_builds(out)
        tmp = out.parent / f".{out.name}.building-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            _build(tmp, recipe=recipe, corpus=corpus, seed=seed, progress=progress,
                   settings=want, precision=precision)
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _remove_stale_builds(out: Path) -> None:
    """Remove half-built ``.<name>.building-<pid>`` dirs of processes that no longer run."""
    for d in out.parent.glob(f".{out.name}.building-*"):
        try:
            pid = int(d.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, flush=True)
    else:
        logger.info(msg)


def _build(out: Path, *, recipe: Recipe, corpus, seed: int, progress: bool, settings: dict,
           precision: str = "auto") -> dict:
    import transformers
    from transformers import GenerationConfig, set_seed

    from adaspec_hf.pair import corpus as C

    t_start = time.perf_counter()
    load_start = load_average()
    timing: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        timing[name] = round(now - clock[0], 2)
        clock[0] = now

    _say(progress, f"[adaspec-hf pair] building the {recipe.name} pair into {out} "
                   f"(machine load {load_start})")
    if is_busy(load_start):
        _say(progress, f"[adaspec-hf pair] warning: the machine is busy (load {load_start} on {os.cpu_count()} "
                       "cores): training will be slower and the cost ratio noisier")
    set_seed(seed)
    data = C.load_corpus(corpus, seed=seed, max_chars=recipe.max_chars, progress=progress)
    lap("read_corpus_s")
    tok = C.train_tokenizer(data.train_texts, recipe.vocab_size, progress=progress)
    lap("tokenizer_s")
    train_ds = C.tokenize_blocks(data.train_texts, tok, recipe.block_size, progress=progress, desc="train")
    held_ds = C.tokenize_blocks(data.heldout_texts, tok, recipe.block_size, progress=progress,
                                desc="held-out")
    prompts = C.make_prompts(data.heldout_names, data.heldout_texts, tok, recipe.n_prompts, seed=seed)
    lap("tokenize_s")
    if len(train_ds) < recipe.batch_size or len(held_ds) < 1:
        raise ValueError(f"corpus too small: {len(train_ds)} train and {len(held_ds)} held-out blocks of "
                         f"{recipe.block_size} tokens")
    held = torch.tensor(held_ds.select(range(min(recipe.eval_blocks, len(held_ds))))["input_ids"])

    # models ------------------------------------------------------------------------------------
    set_seed(seed)
    target = _new_llama(recipe.target, tok, max_pos=2048)
    draft = _new_llama(recipe.draft, tok, max_pos=2048)

    # precision and threads: timed here, on this machine --------------------------------------------
    probe_batch = torch.tensor(train_ds.select(range(min(8, len(train_ds))))["input_ids"])
    options = [c for c in candidates("cpu") if precision in ("auto", c.precision)]
    setup = choose_training_setup(_probe_step if recipe.joint else _probe_step_target_only, target, draft,
                                  probe_batch, options=options)
    lap("setup_probe_s")
    eta = _eta_s(recipe, setup)
    _say(progress, f"[adaspec-hf pair] training with {setup.precision} on {setup.threads} thread(s) "
                   f"({setup.reason}); {recipe.tokens['target']:,} target + {recipe.tokens['distill']:,} "
                   f"distill tokens; ETA ~{eta / 60:.1f} min of training")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(setup.threads)
    try:
        # phase 1: target LM (+ the draft's KL on the target's logits) -------------------------------
        if recipe.joint:
            j = _run_phase("target LM + draft KL", "joint", _Joint(target, draft), train_ds, recipe=recipe,
                           setup=setup, max_steps=recipe.target_steps, seed=seed, progress=progress,
                           param_groups=[(target, recipe.target_lr), (draft, recipe.draft_lr)],
                           extra={"kd_weight": recipe.kd_weight, "hard_weight": recipe.joint_hard_weight})
        else:
            j = _run_phase("target LM", "target", target, train_ds, recipe=recipe, setup=setup,
                           max_steps=recipe.target_steps, seed=seed, progress=progress,
                           param_groups=[(target, recipe.target_lr)], extra={})
        lap("train_target_s")
        target.eval()
        draft.eval()
        agreement_joint = teacher_forced_stats(target, draft, held)["agreement"]

        # phase 2: draft distillation on the frozen target ------------------------------------------
        target.eval().requires_grad_(False)
        d = _run_phase("draft KL on frozen target", "distill", draft, train_ds, recipe=recipe, setup=setup,
                       max_steps=recipe.distill_steps, seed=seed + 1, progress=progress,
                       batch_size=recipe.distill_batch_size,
                       param_groups=[(draft, recipe.draft_lr)],
                       extra={"teacher": target, "hard_weight": recipe.distill_hard_weight})
        lap("train_distill_s")
        target.eval()
        draft.eval().requires_grad_(False)

        # quality gates (fp32, held-out files; still on the measured thread count) --------------------
        q = teacher_forced_stats(target, draft, held)
        prompt_ids = [tok(p["prompt"], add_special_tokens=False)["input_ids"] for p in prompts]
        continuations = greedy_continuations(target, prompt_ids, tok.pad_token_id, recipe.continuation_tokens)
        distinct4 = distinct_ngrams(continuations, 4)
        sample = {"prompt": prompts[0]["prompt"], "continuation": tok.decode(continuations[0])} if prompts else None
        lap("eval_s")
    finally:
        torch.set_num_threads(threads_before)  # the cost ratio is measured with the user's thread count

    # cost, and growth of the target if it is too cheap -----------------------------------------
    ctx = held[0, : recipe.cost_context].unsqueeze(0) if held.shape[1] >= recipe.cost_context else \
        torch.randint(3, len(tok), (1, recipe.cost_context), generator=torch.Generator().manual_seed(seed))
    cost0 = measure_cost(target, draft, ctx, repeats=recipe.cost_repeats)
    cost, growth = cost0, {"grown": False, "trained_layers": recipe.target.layers,
                           "total_layers": recipe.target.layers}
    trained_layers = recipe.target.layers
    max_layers = int(recipe.max_grow_factor * trained_layers)
    ref_logits = _logits(target, held[: min(4, len(held))])
    while cost["ratio"] < recipe.aim_ratio and target.config.num_hidden_layers < max_layers:
        # grow in whole multiples of the trained depth (4 -> 8 -> 12 ...), so that the architecture
        # does not depend on the exact timing noise of this machine; after one growth, jump straight
        # to the depth that the measured per-layer cost says is needed (fewer slow cost measurements)
        layers = target.config.num_hidden_layers
        extra = trained_layers
        if layers > trained_layers:
            per_layer = (cost["target_ms"] - cost0["target_ms"]) / (layers - trained_layers)
            if per_layer > 0:
                need = (recipe.aim_ratio * cost["draft_ms"] - cost["target_ms"]) / per_layer
                extra = trained_layers * max(1, math.ceil(need / trained_layers))
        extra = min(extra, max_layers - layers)
        target = grow_identity_layers(target, extra)
        cost = measure_cost(target, draft, ctx, repeats=recipe.cost_repeats)
    if target.config.num_hidden_layers > trained_layers:
        new_logits = _logits(target, held[: min(4, len(held))])
        diff = (new_logits - ref_logits).abs().max().item()
        growth = {
            "grown": True,
            "trained_layers": trained_layers,
            "total_layers": target.config.num_hidden_layers,
            "identity_layers": list(target.config.adaspec_identity_layers),
            "method": "appended pre-norm LlamaDecoderLayers (weights copied from trained layers) whose "
                      "self_attn.o_proj and mlp.down_proj weights are zero: each adds exactly 0 to the "
                      "residual stream, so the function is unchanged, but its attention, MLP and KV cache "
                      "are computed for real (weights are not sparse-aware)",
            "logits_max_abs_diff": diff,
            "logits_bit_identical": bool(torch.equal(new_logits, ref_logits)),
            "ratio_before_growth": cost0["ratio"],
        }
        if diff > 1e-5:
            raise RuntimeError(f"grown target changed the logits (max abs diff {diff})")
    lap("cost_s")
    gates = evaluate_gates(q, distinct4, cost["ratio"], recipe.gates)

    # save ----------------------------------------------------------------------------------------
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    for name, m in (("target", target), ("draft", draft)):
        for k, v in ids.items():
            setattr(m.config, k, v)
        m.config.use_cache = True  # training turned it off; inference wants the KV cache
        m.generation_config = GenerationConfig(**ids)
        m.save_pretrained(out / name)
        tok.save_pretrained(out / name)
    with open(out / PROMPTS, "w") as fh:
        for p in prompts:
            fh.write(json.dumps(p) + "\n")
    lap("save_s")

    total = time.perf_counter() - t_start
    timing["total_s"] = round(total, 2)
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    report = {
        "complete": True,
        "recipe_version": RECIPE_VERSION,
        "settings": settings,
        "recipe": asdict(recipe),
        "corpus": {k: v for k, v in data.info.items()} | {
            "train_blocks": len(train_ds), "heldout_blocks": len(held_ds), "block_size": recipe.block_size,
            "train_tokens": len(train_ds) * recipe.block_size,
            "heldout_tokens": len(held_ds) * recipe.block_size},
        "tokenizer": {"type": "byte-level BPE (tokenizers), PreTrainedTokenizerFast", "vocab_size": len(tok),
                      **ids},
        "target": {"shape": asdict(recipe.target), "params": n_params(target),
                   "params_trained": _params_of_layers(target, trained_layers),
                   "layers": target.config.num_hidden_layers, "trained_layers": trained_layers,
                   "heldout_loss": q["target_loss"], "train_steps": j["steps"],
                   "train_tokens": j["steps"] * recipe.batch_size * recipe.block_size},
        "draft": {"shape": asdict(recipe.draft), "params": n_params(draft), "heldout_loss": q["draft_loss"],
                  "joint_steps": j["steps"] if recipe.joint else 0, "distill_steps": d["steps"],
                  "distill_tokens": d["steps"] * recipe.distill_batch_size * recipe.block_size},
        "quality": {"heldout_agreement": q["agreement"], "agreement_after_target_phase": agreement_joint,
                    "draft_confidence_auc": q["draft_conf_auc"], "distinct_4grams": distinct4,
                    "eval_tokens": q["tokens"], "continuations": len(continuations),
                    "continuation_tokens": recipe.continuation_tokens, "sample": sample,
                    "definition": "held-out files, fp32. agreement: teacher-forced fraction of positions where "
                                  "argmax(draft) == argmax(target); AUC: ROC AUC of the draft's top-1 softmax "
                                  "probability as a predictor of that agreement; distinct_4grams: mean over the "
                                  "held-out prompts of distinct/total 4-grams in the target's greedy continuation"},
        "gates": gates,
        "gates_passed": not failed_gates(gates),
        "gates_apply": recipe.gates_apply,
        "cost": cost | {"definition": "median forward time (ms) for 1 new token with a "
                                      f"{recipe.cost_context}-token KV cache, fp32, batch 1, "
                                      f"{torch.get_num_threads()} threads, interleaved repeats"},
        "growth": growth,
        "training": {"target_phase": j, "distill": d, "block_size": recipe.block_size,
                     "setup": setup.to_dict(), "eta_s": round(eta, 1),
                     "schedule": f"AdamW; {recipe.warmup_steps} warm-up steps, then cosine over each phase's "
                                 f"steps down to {recipe.min_lr_rate:g}x the peak LR"},
        "prompts": {"n": len(prompts), "file": PROMPTS, "prompt_tokens": [32, 96], "reference_tokens": 64},
        "timing": timing,
        "budgets": {
            "build_s_reference_max": recipe.build_budget_s,
            "build_s": round(total, 1),
            "build_within_reference_budget": total <= recipe.build_budget_s,
        },
        "environment": {"python": sys.version.split()[0], "torch": torch.__version__,
                        "transformers": transformers.__version__, "threads": torch.get_num_threads(),
                        "cpus": os.cpu_count(), "loadavg_1m_start": load_start, "loadavg_1m_end": load_average(),
                        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S")},
    }
    (out / REPORT).write_text(json.dumps(report, indent=2))
    _say(progress, summarize(report))
    return report


def summarize(report: dict) -> str:
    """A few lines describing a pair's report: gates first."""
    t, d, c, g = report["target"], report["draft"], report["cost"], report["growth"]
    applies = report.get("gates_apply", True)
    ok = lambda x: "ok" if x else ("MISSED" if applies else "n/a (quick)")  # noqa: E731
    setup = report["training"]["setup"]
    lines = [
        f"pair ({report['recipe']['name']}, seed {report['settings']['seed']}, corpus "
        f"{report['corpus']['source']}: {report['corpus']['files_train']} train / "
        f"{report['corpus']['files_heldout']} held-out files)",
        f"  built in {report['budgets']['build_s']:.0f} s with {setup['precision']} on {setup['threads']} "
        f"thread(s) (chosen by timing: {setup['timings']}); machine load {report['environment']['loadavg_1m_start']}",
    ]
    for name, gate in report["gates"].items():
        sign = "<=" if gate["kind"] == "max" else ">="
        lines.append(f"  {name:<22}{gate['value']:>9.3f}  (gate {sign} {gate['threshold']})  {ok(gate['passed'])}")
    lines += [
        f"  cost                  target {c['target_ms']:.2f} ms / draft {c['draft_ms']:.2f} ms, 1 token @ "
        f"{c['context']} ctx, median of {c['repeats']}; p10 ratio {c.get('ratio_p10', float('nan')):.1f}x",
        f"  target                {t['params'] / 1e6:.2f}M params, {t['layers']} layers ({t['trained_layers']} "
        f"trained), {t['train_steps']} steps ({t['train_tokens']:,} tokens)",
        f"  draft                 {d['params'] / 1e6:.2f}M params, held-out loss {d['heldout_loss']:.3f}, "
        f"{d['joint_steps']} joint + {d['distill_steps']} distill steps",
    ]
    if g["grown"]:
        lines.append(f"  growth                {g['trained_layers']} -> {g['total_layers']} layers with zero "
                     f"o_proj/down_proj (identity blocks); ratio before {g['ratio_before_growth']:.1f}x; "
                     f"logits bit-identical: {g['logits_bit_identical']} (max diff {g['logits_max_abs_diff']:.1e})")
    sample = report["quality"].get("sample")
    if sample:
        lines.append(f"  sample                {sample['prompt'][-60:]!r} -> {sample['continuation'][:80]!r}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ models
def _new_llama(shape: ModelShape, tok, max_pos: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads or shape.heads, max_position_embeddings=max_pos,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(cfg)


def _params_of_layers(model, n_layers: int) -> int:
    total = sum(p.numel() for p in model.parameters())
    layers = model.model.layers
    return total - sum(p.numel() for layer in layers[n_layers:] for p in layer.parameters())


def grow_identity_layers(model, extra: int):
    """Return a copy of a pre-norm Llama-style model with ``extra`` decoder layers appended.

    The new layers copy the weights of trained layers (so activations and cost are realistic), except
    ``self_attn.o_proj`` and ``mlp.down_proj``, which are zero: each new block adds exactly 0 to the
    residual stream, so logits are unchanged while the compute (and KV cache) is real. The indices of
    these layers are recorded as ``config.adaspec_identity_layers``.
    """
    if extra <= 0:
        return model
    cfg = copy.deepcopy(model.config)
    n = cfg.num_hidden_layers
    cfg.num_hidden_layers = n + extra
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = list(cfg.layer_types) + [cfg.layer_types[-1]] * extra
    done = list(getattr(cfg, "adaspec_identity_layers", []) or [])
    cfg.adaspec_identity_layers = done + list(range(n, n + extra))
    trained = [i for i in range(n) if i not in done] or list(range(n))
    grown = type(model)(cfg).to(dtype=next(model.parameters()).dtype)
    sd = model.state_dict()
    missing, unexpected = grown.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    layers = grown.model.layers
    with torch.no_grad():
        for k, i in enumerate(range(n, n + extra)):
            src = layers[trained[-1 - (k % len(trained))]]
            layers[i].load_state_dict(src.state_dict())
            for lin in (layers[i].self_attn.o_proj, layers[i].mlp.down_proj):
                lin.weight.zero_()
                if lin.bias is not None:
                    lin.bias.zero_()
    grown.generation_config = copy.deepcopy(model.generation_config)
    return grown.eval() if not model.training else grown


class _Joint(nn.Module):
    """Container so that one Trainer optimises target (LM loss) and draft (KL to target) together."""

    def __init__(self, target, draft):
        super().__init__()
        self.target, self.draft = target, draft

    def forward(self, input_ids):  # pragma: no cover - compute_loss does the work
        raise NotImplementedError


def _kd_loss(student_logits, teacher_logits, hard_weight: float = 0.0):
    """Forward KL(p_teacher || p_student) per token (+ optional CE on the teacher's argmax)."""
    s = F.log_softmax(student_logits.float(), dim=-1)
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    loss = (t.exp() * (t - s)).sum(-1).mean()
    if hard_weight:
        loss = loss + hard_weight * F.nll_loss(s.flatten(0, -2), t.argmax(-1).flatten())
    return loss


def _joint_loss(target, draft, ids, kd_weight: float = 1.0, hard_weight: float = 0.0):
    """Target: next-token CE; draft: KL to the target's detached logits on the same batch."""
    out = target(input_ids=ids, labels=ids)
    return out.loss + kd_weight * _kd_loss(draft(input_ids=ids).logits, out.logits.detach(), hard_weight), out


def _trainer_classes():
    from transformers import Trainer

    class _JointTrainer(Trainer):
        """Target: next-token CE. Draft: KL to the target's detached logits (same batch)."""

        def __init__(self, *a, kd_weight=1.0, hard_weight=0.0, **kw):
            super().__init__(*a, **kw)
            self.kd_weight, self.hard_weight = kd_weight, hard_weight

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, out = _joint_loss(model.target, model.draft, inputs["input_ids"], self.kd_weight, self.hard_weight)
            return (loss, out) if return_outputs else loss

    class _DistillTrainer(Trainer):
        """Draft: KL to a frozen teacher's logits."""

        def __init__(self, *a, teacher=None, hard_weight=0.0, **kw):
            super().__init__(*a, **kw)
            self.teacher, self.hard_weight = teacher, hard_weight

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids = inputs["input_ids"]
            with torch.no_grad():
                t_logits = self.teacher(input_ids=ids).logits
            out = model(input_ids=ids)
            loss = _kd_loss(out.logits, t_logits, self.hard_weight)
            return (loss, out) if return_outputs else loss

    class _TargetTrainer(Trainer):
        """Target alone: next-token CE."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids = inputs["input_ids"]
            out = model(input_ids=ids, labels=ids)
            return (out.loss, out) if return_outputs else out.loss

    return _JointTrainer, _DistillTrainer, _TargetTrainer


def _collate(features):
    return {"input_ids": torch.tensor([f["input_ids"] for f in features], dtype=torch.long)}


def _probe_step(target, draft, ids):
    """One joint training step's loss (what the precision/thread probe times)."""
    return _joint_loss(target, draft, ids)[0]


def _probe_step_target_only(target, draft, ids):
    return target(input_ids=ids, labels=ids).loss


GRAD_CLIP = 1.0  # max gradient norm, per model
DISTILL_COST = 0.55  # a distill step (target forward, draft forward+backward) vs a joint step: measured ~0.5-0.6


def _eta_s(recipe: Recipe, setup: TrainingSetup) -> float:
    """Training time predicted from the probe (rows scale ~linearly at these sizes)."""
    row = setup.probe_step_s / PROBE_ROWS * (recipe.block_size / 256)  # one 256-token row, joint step
    return row * (recipe.target_steps * recipe.batch_size
                  + DISTILL_COST * recipe.distill_steps * recipe.distill_batch_size)


class _ThreadTuner:
    """Follows the faster of ``torch.get_num_threads()`` threads and 1 thread, from measured step times.

    On a shared, busy CPU, 2+ OpenMP threads can be several times slower than 1 (barrier spinning
    while other processes hold the cores); on a quiet machine they are faster. The other setting is
    probed for a few steps (aborted at once if clearly slower); the wait between probes doubles
    after each probe, and a probe comes early when the current setting gets much slower.
    """

    def __init__(self, first: int = 3, period: int = 30, probe: int = 3, max_period: int = 480):
        self.full = torch.get_num_threads()
        self.choices = [self.full, 1] if self.full > 1 else [self.full]
        self.period, self.probe, self.max_period = period, probe, max_period
        self.next_probe = first
        self.current = self.full
        self.recent: list[float] = []   # step times of the current setting
        self.baseline = None            # its median when last decided
        self.probe_times: list[float] | None = None
        self.switches = 0
        self._step, self.t0 = 0, 0.0

    def _ref(self) -> float:
        return statistics.median(self.recent[-self.probe:]) if self.recent else float("inf")

    def begin(self, step: int) -> None:
        self._step = step
        slowed = self.baseline is not None and len(self.recent) >= self.probe and \
            self._ref() > 1.5 * self.baseline
        if len(self.choices) > 1 and self.probe_times is None and (step >= self.next_probe or slowed):
            self.probe_times = []
            torch.set_num_threads(self.choices[1] if self.current == self.choices[0] else self.choices[0])
        elif self.probe_times is None:
            torch.set_num_threads(self.current)
        self.t0 = time.perf_counter()

    def end(self) -> None:
        dt = time.perf_counter() - self.t0
        if self.probe_times is None:
            self.recent = (self.recent + [dt])[-2 * self.probe:]
            return
        self.probe_times.append(dt)
        ref = self._ref()
        lost = dt > 2.0 * ref  # clearly slower (even counting warm-up): stop probing now
        if lost or len(self.probe_times) > self.probe:  # first probe step is a warm-up
            mine = statistics.median(self.probe_times[1:]) if not lost else float("inf")
            if mine < ref:
                self.current = torch.get_num_threads()
                self.recent = self.probe_times[1:]
                self.switches += 1
            torch.set_num_threads(self.current)
            self.baseline = self._ref()
            self.period = min(self.max_period, 2 * self.period)
            self.next_probe = self._step + self.period
            self.probe_times = None

    def restore(self) -> None:
        torch.set_num_threads(self.full)


def _run_phase(desc, kind, model, dataset, *, recipe: Recipe, setup: TrainingSetup, max_steps: int, seed: int,
               progress: bool, param_groups, extra: dict, batch_size: int | None = None) -> dict:
    """One Trainer run of exactly ``max_steps`` optimizer steps (cosine LR over those steps)."""
    from tqdm.auto import tqdm
    from transformers import PrinterCallback, ProgressCallback, TrainerCallback, TrainingArguments

    batch = batch_size or recipe.batch_size
    if max_steps <= 0:
        return {"steps": 0, "seconds": 0.0, "loss": float("nan"), "thread_switches": 0, "batch_size": batch}
    joint_cls, distill_cls, target_cls = _trainer_classes()
    cls = {"joint": joint_cls, "distill": distill_cls, "target": target_cls}[kind]
    model.train()
    if kind == "distill":
        extra["teacher"].eval()
    opt = torch.optim.AdamW(
        [{"params": [p for p in m.parameters() if p.requires_grad], "lr": lr} for m, lr in param_groups],
        betas=(0.9, 0.95), weight_decay=0.05, eps=1e-8)
    tuner = _ThreadTuner()

    clip_groups = [[p for p in m.parameters() if p.requires_grad] for m, _ in param_groups]

    class _Progress(TrainerCallback):
        """A tqdm bar in steps (with its ETA), loss and threads; the thread tuner around each step;
        gradient clipping per model (one global norm over target + draft would let the draft's
        gradients shrink the target's updates)."""

        def on_pre_optimizer_step(self, args, state, control, **kw):
            for group in clip_groups:
                torch.nn.utils.clip_grad_norm_(group, GRAD_CLIP)

        def on_step_begin(self, args, state, control, **kw):
            tuner.begin(state.global_step)

        def on_train_begin(self, args, state, control, **kw):
            self.bar = tqdm(total=max_steps, desc=desc, unit="step", disable=not progress)

        def on_step_end(self, args, state, control, **kw):
            tuner.end()
            self.bar.update(1)
            self.bar.set_postfix_str(f"{tuner.current} thr", refresh=False)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.bar.set_postfix_str(f"{tuner.current} thr, loss {float(logs['loss']):.3f}")

        def on_train_end(self, args, state, control, **kw):
            self.bar.close()

    with tempfile.TemporaryDirectory(prefix="adaspec_pair_trainer_") as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=batch, max_steps=max_steps,
            learning_rate=param_groups[0][1], max_grad_norm=0.0, logging_steps=10, save_strategy="no",
            eval_strategy="no", report_to=[], use_cpu=True, bf16=setup.bf16, seed=seed, data_seed=seed,
            lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": recipe.min_lr_rate},
            warmup_steps=min(recipe.warmup_steps, max(1, max_steps // 10)),
            disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False, log_level="error",
        )
        trainer = cls(model=model, args=args, train_dataset=dataset, data_collator=_collate,
                      optimizers=(opt, None), callbacks=[_Progress()], **extra)
        for cb in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(cb)
        t0 = time.perf_counter()
        try:
            result = trainer.train()
        finally:
            tuner.restore()
        secs = time.perf_counter() - t0
    steps = int(trainer.state.global_step)
    _say(progress, f"[adaspec-hf pair] {desc}: {steps} steps ({steps * batch * recipe.block_size:,} "
                   f"tokens) in {secs:.0f} s, mean loss {result.training_loss:.3f}")
    return {"steps": steps, "seconds": round(secs, 1), "loss": float(result.training_loss),
            "thread_switches": tuner.switches, "batch_size": batch}


# -------------------------------------------------------------------------------------- measuring
@torch.inference_mode()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


@torch.inference_mode()
def measure_cost(target, draft, context_ids: torch.Tensor, repeats: int = 40, warmup: int = 5,
                 max_seconds: float = 20.0) -> dict:
    """Median forward time (ms) of each model for 1 new token on top of a KV cache of
    ``context_ids`` (batch 1); target and draft calls are interleaved so that machine-speed drift
    affects both alike. Stops early (after at least 10 repeats) when ``max_seconds`` are spent."""
    ctx = context_ids.shape[-1]
    state = {}
    for name, m in (("target", target), ("draft", draft)):
        m.eval()
        out = m(input_ids=context_ids, use_cache=True)
        state[name] = (m, output_cache(out))
    nxt = context_ids[:, -1:]
    times = {"target": [], "draft": []}
    t_end = time.perf_counter() + max_seconds
    for r in range(warmup + repeats):
        if r >= warmup + 10 and time.perf_counter() > t_end:
            break
        for name in ("target", "draft"):
            m, cache = state[name]
            t0 = time.perf_counter()
            m(input_ids=nxt, **cache_kwargs(m, cache))
            dt = time.perf_counter() - t0
            cache.crop(-1)  # back to the context length (negative: tokens to remove)
            if r >= warmup:
                times[name].append(dt * 1e3)
    t_ms, d_ms = statistics.median(times["target"]), statistics.median(times["draft"])
    # 10th percentiles: closer to the uncontended cost when other processes share the CPU
    t10, d10 = (sorted(times[k])[len(times[k]) // 10] for k in ("target", "draft"))
    return {"context": ctx, "repeats": len(times["target"]), "target_ms": round(t_ms, 4), "draft_ms": round(d_ms, 4),
            "ratio": round(t_ms / d_ms, 3), "target_ms_p10": round(t10, 4), "draft_ms_p10": round(d10, 4),
            "ratio_p10": round(t10 / d10, 3)}


# ----------------------------------------------------------------------------------------- loading
def _resolve(pair_dir, build: bool) -> Path:
    if pair_dir is None and build:
        return build_pair()  # the built-in pair: returned at once if built with the current recipe
    d = Path(pair_dir).expanduser() if pair_dir is not None else default_pair_dir()
    if _read_report(d) is None:
        if not build:
            raise FileNotFoundError(f"no built pair in {d}; run `adaspec-hf pair build` or build_pair()")
        d = build_pair(d)
    return d


def load_pair(pair_dir=None, *, build=True, dtype=torch.float32, device="cpu", allow_weak_pair=False):
    """``(target, draft, tokenizer)`` of a built pair (default: the built-in full pair, built on first use).

    A full pair that missed a quality gate raises :class:`~adaspec_hf.pair.gates.WeakPairError`
    (speed-ups measured on it would mean nothing) unless ``allow_weak_pair=True``.
    """
    d = _resolve(pair_dir, build)
    rep = _read_report(d)
    if allow_weak_pair:
        if rep is not None and rep.get("gates_apply") and not rep.get("gates_passed", True):
            logger.warning("using the pair in %s although it misses quality gates: %s", d,
                           ", ".join(failed_gates(rep["gates"])))
    else:
        check_gates(rep, str(d))
    return load_models(d / "target", d / "draft", dtype=dtype, device=device)


def load_prompts(pair_dir=None, n=None):
    """The pair's held-out prompts as a `datasets.Dataset` with ``prompt`` and ``reference`` columns."""
    import datasets

    d = _resolve(pair_dir, build=True)
    with tempfile.TemporaryDirectory(prefix="adaspec_prompts_") as cache:
        with contextlib.redirect_stderr(open(os.devnull, "w")) if not logger.isEnabledFor(logging.DEBUG) \
                else contextlib.nullcontext():
            ds = datasets.load_dataset("json", data_files=str(d / PROMPTS), split="train", cache_dir=cache,
                                       keep_in_memory=True)
    if n is not None:
        ds = ds.select(range(min(int(n), len(ds))))
    return ds


def load_models(target=None, draft=None, *, dtype=torch.float32, device="cpu", allow_weak_pair=False):
    """Load a target/draft pair: any HF ids or paths (``AutoModelForCausalLM`` / ``AutoTokenizer``,
    the tokenizer from the target). Both ``None``: the built-in pair (built on first use; see
    :func:`load_pair` for ``allow_weak_pair``)."""
    if target is None and draft is None:
        return load_pair(dtype=dtype, device=device, allow_weak_pair=allow_weak_pair)
    if target is None or draft is None:
        raise ValueError("give both target and draft (HF ids or paths), or neither for the built-in pair")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(target))
    models = []
    for name in (target, draft):
        m = AutoModelForCausalLM.from_pretrained(str(name), dtype=dtype)
        models.append(m.to(device).eval())
    t, d = models
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    if d.get_input_embeddings().num_embeddings < len(tok):
        logger.warning("draft vocabulary (%d) is smaller than the target tokenizer's (%d): the pair must "
                       "share a tokenizer", d.get_input_embeddings().num_embeddings, len(tok))
    return t, d, tok


# --------------------------------------------------------------------------------------------- CLI
def register_cli(subparsers) -> None:
    """``adaspec-hf pair build | info``."""
    p = subparsers.add_parser("pair", help="build or inspect the built-in offline target/draft pair")
    sub = p.add_subparsers(dest="pair_command")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    b = sub.add_parser("build", help="train the pair from local text (default: Python stdlib sources)")
    b.add_argument("--out", default=None, help="pair directory (default: $ADASPEC_HF_CACHE/pair...)")
    b.add_argument("--corpus", nargs="+", default=None, metavar="PATH", help="text files/folders instead of the stdlib")
    b.add_argument("--quick", action="store_true", help="tiny pair in ~1 min (tests)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--force", action="store_true", help="rebuild even if a complete pair exists")
    b.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="training precision (default: time both here and keep the faster)")
    b.set_defaults(func=_cli_build)

    i = sub.add_parser("info", help="print a built pair's report")
    i.add_argument("--dir", default=None, help="pair directory (default: the built-in full pair)")
    i.add_argument("--quick", action="store_true", help="the default quick pair")
    i.add_argument("--json", action="store_true", help="the whole report.json")
    i.set_defaults(func=_cli_info)


def _cli_build(args) -> int:
    d = build_pair(args.out, corpus=args.corpus, quick=args.quick, seed=args.seed, force=args.force,
                   precision=args.precision)
    rep = _read_report(d)
    print(summarize(rep))
    print(d)
    try:
        check_gates(rep, str(d))
    except WeakPairError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _cli_info(args) -> int:
    d = Path(args.dir).expanduser() if args.dir else default_pair_dir(quick=args.quick)
    rep = _read_report(d)
    if rep is None:
        print(f"no built pair in {d} (run `adaspec-hf pair build`)", file=sys.stderr)
        return 1
    print(json.dumps(rep, indent=2) if args.json else summarize(rep))
    print(d)
    return 0
