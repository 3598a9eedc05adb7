"""The project's own offline target/draft pair, and loading of any HF pair.

No model can be downloaded where this project is developed and benchmarked, so it builds a pair
itself from local text (by default the Python standard library sources):

1. read the corpus and split it BY FILE into train and held-out parts (seeded);
2. train a byte-level BPE tokenizer (vocab 4096) and tokenize with `datasets` (batched ``.map``);
3. train the target (``LlamaForCausalLM``) with HF ``Trainer`` under bf16 autocast on CPU, while the
   draft learns jointly from the target's (detached) logits by KL (``_JointTrainer.compute_loss``);
4. distill the draft further on the frozen target's logits (``_DistillTrainer.compute_loss``);
5. measure greedy agreement on held-out text and the target/draft forward cost at a 256-token
   context; if the target is not expensive enough relative to the draft, *grow* it function-
   preservingly: append pre-norm decoder layers whose ``o_proj`` and ``down_proj`` are zero (exact
   identities that still cost real compute), verify the logits are unchanged, and record it in
   ``report.json`` and in the saved ``config.json`` (``adaspec_identity_layers``);
6. save ``target/``, ``draft/`` (``save_pretrained`` + tokenizer), ``prompts.jsonl`` (held-out prompts
   with reference continuations) and ``report.json`` (measured budgets and quality; written last,
   it marks the pair as complete).

Training is budgeted in wall-clock seconds (the LR schedule follows elapsed time, a callback stops
each phase when its time is up, and the thread count follows whichever of 2 or 1 threads is faster
at the moment), so the build stays within its budget on a slow or busy shared machine.
Initialisation and data order are seeded; the number of steps, hence the weights, depend on the
machine's speed during the build (both are recorded in ``report.json``).
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

from .hf_compat import cache_kwargs, output_cache

logger = logging.getLogger(__name__)

Path = pathlib.Path
RECIPE_VERSION = 1
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
    """Sizes and budgets of a pair build (``FULL`` or ``QUICK``)."""

    name: str
    target: ModelShape
    draft: ModelShape
    vocab_size: int = 4096
    block_size: int = 256
    batch_size: int = 8
    max_chars: int | None = None          # corpus slice (seeded subset of files)
    joint_s: float = 480.0                # target training (+ draft KL on its logits), seconds
    distill_s: float = 320.0              # draft distillation on the frozen target, seconds
    joint_max_steps: int = 100_000
    distill_max_steps: int = 100_000
    target_lr: float = 1.5e-3
    draft_lr: float = 3e-3
    kd_weight: float = 1.0                # weight of the draft's KL term in the joint phase
    hard_weight: float = 0.0              # + CE on the target's argmax (both KD phases)
    bf16: bool = True                     # bf16 autocast for training (CPU: ~2.7x faster)
    total_budget_s: float = 900.0         # whole build, checked
    reserve_s: float = 60.0               # kept for evaluation / growth / saving
    eval_blocks: int = 64                 # held-out blocks for agreement
    n_prompts: int = 64
    cost_context: int = 256
    cost_repeats: int = 100
    min_ratio: float = 8.0                # required target/draft forward cost ratio
    aim_ratio: float = 12.0               # grow the target until this (margin for timing noise)
    max_grow_factor: float = 4.0          # at most this many times the trained layers in total
    min_agreement: float = 0.6


FULL = Recipe(
    name="full",
    target=ModelShape(hidden=384, layers=6, heads=6, intermediate=1024),
    draft=ModelShape(hidden=128, layers=2, heads=4, intermediate=512),
)
QUICK = Recipe(
    name="quick",
    target=ModelShape(hidden=128, layers=2, heads=4, intermediate=352),
    draft=ModelShape(hidden=64, layers=1, heads=2, intermediate=176),
    block_size=128,
    max_chars=1_500_000,
    joint_s=25.0,
    distill_s=12.0,
    joint_max_steps=200,
    distill_max_steps=100,
    total_budget_s=90.0,
    reserve_s=20.0,
    eval_blocks=16,
    n_prompts=16,
    cost_repeats=10,
    aim_ratio=4.0,
    max_grow_factor=2.0,
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
def build_pair(out_dir=None, *, corpus=None, quick=False, seed=0, force=False, progress=True) -> pathlib.Path:
    """Build (or find cached) the built-in target/draft pair; returns the pair directory.

    The directory holds ``target/`` and ``draft/`` (``save_pretrained``, tokenizer in both),
    ``prompts.jsonl`` (held-out ``{"prompt", "reference"}``) and ``report.json`` (measured budgets
    and quality). A complete pair with the same settings is returned at once unless ``force``.
    ``quick=True`` builds a tiny pair in about a minute (for tests; no quality targets).
    """
    out = Path(out_dir).expanduser() if out_dir is not None else default_pair_dir(quick=quick, seed=seed,
                                                                                    corpus=corpus)
    want = {"quick": bool(quick), "seed": int(seed), "corpus": _corpus_key(corpus)}

    def cached() -> bool:
        rep = _read_report(out)
        if rep is None:
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
            _build(tmp, recipe=QUICK if quick else FULL, corpus=corpus, seed=seed, progress=progress,
                   settings=want)
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


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)  # other processes competing for the CPU during the build
    except (AttributeError, OSError):
        return None


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, flush=True)
    else:
        logger.info(msg)


def _build(out: Path, *, recipe: Recipe, corpus, seed: int, progress: bool, settings: dict) -> dict:
    import transformers
    from transformers import GenerationConfig, set_seed

    from . import corpus as C

    t_start = time.perf_counter()
    load_start = _loadavg()
    deadline = t_start + recipe.total_budget_s
    timing: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        timing[name] = round(now - clock[0], 2)
        clock[0] = now

    _say(progress, f"[adaspec-hf pair] building the {recipe.name} pair into {out} "
                   f"(budget {recipe.total_budget_s / 60:.0f} min)")
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

    # phase 1: target LM + draft KL on the target's logits ---------------------------------------
    joint = _Joint(target, draft)
    joint_s = min(recipe.joint_s, max(5.0, deadline - time.perf_counter() - recipe.reserve_s
                                      - 0.3 * recipe.distill_s))
    j = _run_phase("joint: target LM + draft KL", "joint", joint, train_ds, recipe=recipe,
                   budget_s=joint_s, max_steps=recipe.joint_max_steps, seed=seed, progress=progress,
                   param_groups=[(target, recipe.target_lr), (draft, recipe.draft_lr)],
                   extra={"kd_weight": recipe.kd_weight, "hard_weight": recipe.hard_weight})
    lap("train_joint_s")
    target.eval()
    draft.eval()
    agreement_joint = greedy_agreement(target, draft, held)["agreement"]

    # phase 2: draft distillation on the frozen target --------------------------------------------
    target.eval().requires_grad_(False)
    distill_s = min(recipe.distill_s, max(5.0, deadline - time.perf_counter() - recipe.reserve_s))
    d = _run_phase("distill: draft KL on frozen target", "distill", draft, train_ds, recipe=recipe,
                   budget_s=distill_s, max_steps=recipe.distill_max_steps, seed=seed + 1, progress=progress,
                   param_groups=[(draft, recipe.draft_lr / 2)],
                   extra={"teacher": target, "hard_weight": recipe.hard_weight})
    lap("train_distill_s")
    target.eval()
    draft.eval().requires_grad_(False)

    # quality (fp32, teacher-forced on held-out text) --------------------------------------------
    q = greedy_agreement(target, draft, held)
    lap("eval_s")

    # cost, and growth of the target if it is too cheap -----------------------------------------
    ctx = held[0, : recipe.cost_context].unsqueeze(0) if held.shape[1] >= recipe.cost_context else \
        torch.randint(3, len(tok), (1, recipe.cost_context), generator=torch.Generator().manual_seed(seed))
    cost0 = measure_cost(target, draft, ctx, repeats=recipe.cost_repeats)
    cost, growth = cost0, {"grown": False, "trained_layers": recipe.target.layers,
                           "total_layers": recipe.target.layers}
    trained_layers = recipe.target.layers
    max_layers = int(recipe.max_grow_factor * trained_layers)
    ref_logits = _logits(target, held[: min(4, len(held))])
    while cost["ratio"] < recipe.aim_ratio and target.config.num_hidden_layers < max_layers \
            and time.perf_counter() < deadline - 10:
        # grow in whole multiples of the trained depth (6 -> 12 -> 18 ...), so that the architecture
        # does not depend on the exact timing noise of this machine
        extra = min(trained_layers, max_layers - target.config.num_hidden_layers)
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
                  "joint_steps": j["steps"], "distill_steps": d["steps"],
                  "distill_tokens": d["steps"] * recipe.batch_size * recipe.block_size},
        "quality": {"heldout_agreement": q["agreement"], "agreement_after_joint": agreement_joint,
                    "eval_tokens": q["tokens"],
                    "definition": "teacher-forced on held-out blocks, fp32: fraction of positions where "
                                  "argmax(draft) == argmax(target)"},
        "cost": cost | {"definition": "median forward time (ms) for 1 new token with a "
                                      f"{recipe.cost_context}-token KV cache, fp32, batch 1, "
                                      f"{torch.get_num_threads()} threads, interleaved repeats"},
        "growth": growth,
        "training": {"joint": j, "distill": d, "batch": [recipe.batch_size, recipe.block_size],
                     "bf16_autocast": recipe.bf16,
                     "schedule": "AdamW; LR warm-up then cosine over each phase's wall-time budget"},
        "prompts": {"n": len(prompts), "file": PROMPTS, "prompt_tokens": [32, 96], "reference_tokens": 64},
        "timing": timing,
        "budgets": {
            "build_s_max": recipe.total_budget_s,
            "build_s": round(total, 1),
            "build_ok": total <= recipe.total_budget_s,
            "agreement_min": recipe.min_agreement,
            "agreement_ok": q["agreement"] >= recipe.min_agreement,
            "ratio_min": recipe.min_ratio,
            "ratio_ok": cost["ratio"] >= recipe.min_ratio,
            "applies": recipe.name == "full",
        },
        "environment": {"python": sys.version.split()[0], "torch": torch.__version__,
                        "transformers": transformers.__version__, "threads": torch.get_num_threads(),
                        "cpus": os.cpu_count(), "loadavg_1m_start": load_start, "loadavg_1m_end": _loadavg(),
                        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S")},
    }
    (out / REPORT).write_text(json.dumps(report, indent=2))
    _say(progress, summarize(report))
    return report


def summarize(report: dict) -> str:
    """A few lines describing a pair's report."""
    b, t, d, c, g = report["budgets"], report["target"], report["draft"], report["cost"], report["growth"]
    ok = lambda x: "ok" if x else ("MISSED" if b.get("applies") else "n/a (quick)")  # noqa: E731
    lines = [
        f"pair ({report['recipe']['name']}, seed {report['settings']['seed']}, corpus "
        f"{report['corpus']['source']}: {report['corpus']['files_train']} train / "
        f"{report['corpus']['files_heldout']} held-out files)",
        f"  build time        {b['build_s']:.0f} s  (max {b['build_s_max']:.0f})  {ok(b['build_ok'])}",
        f"  greedy agreement  {report['quality']['heldout_agreement']:.3f} on {report['quality']['eval_tokens']} "
        f"held-out tokens  (min {b['agreement_min']})  {ok(b['agreement_ok'])}",
        f"  cost ratio        {c['ratio']:.1f}x  (target {c['target_ms']:.2f} ms / draft {c['draft_ms']:.2f} ms, "
        f"1 token @ {c['context']} ctx, median of {c['repeats']}; p10 ratio {c.get('ratio_p10', float('nan')):.1f}x; "
        f"min {b['ratio_min']})  {ok(b['ratio_ok'])}",
        f"  target            {t['params'] / 1e6:.2f}M params, {t['layers']} layers "
        f"({t['trained_layers']} trained), held-out loss {t['heldout_loss']:.3f}, {t['train_steps']} steps",
        f"  draft             {d['params'] / 1e6:.2f}M params, held-out loss {d['heldout_loss']:.3f}, "
        f"{d['joint_steps']} joint + {d['distill_steps']} distill steps",
    ]
    if g["grown"]:
        lines.append(f"  growth            {g['trained_layers']} -> {g['total_layers']} layers with zero "
                     f"o_proj/down_proj (identity blocks); ratio before {g['ratio_before_growth']:.1f}x; "
                     f"logits bit-identical: {g['logits_bit_identical']} (max diff {g['logits_max_abs_diff']:.1e})")
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


def _trainer_classes():
    from transformers import Trainer

    class _JointTrainer(Trainer):
        """Target: next-token CE. Draft: KL to the target's detached logits (same batch)."""

        def __init__(self, *a, kd_weight=1.0, hard_weight=0.0, **kw):
            super().__init__(*a, **kw)
            self.kd_weight, self.hard_weight = kd_weight, hard_weight

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids = inputs["input_ids"]
            out = model.target(input_ids=ids, labels=ids)
            kd = _kd_loss(model.draft(input_ids=ids).logits, out.logits.detach(), self.hard_weight)
            loss = out.loss + self.kd_weight * kd
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

    return _JointTrainer, _DistillTrainer


def _collate(features):
    return {"input_ids": torch.tensor([f["input_ids"] for f in features], dtype=torch.long)}


def _time_schedule(optimizer, budget_s: float, max_steps: int, warmup_steps: int, floor: float = 0.1):
    """LR factor: linear warm-up over the first steps, then cosine over the *elapsed wall time* of
    the phase (down to ``floor``), so the schedule completes within the time budget whatever the
    machine's speed (busy shared CPUs slow down by several times, in bursts)."""
    from torch.optim.lr_scheduler import LambdaLR

    t0 = [None]

    def factor(step: int) -> float:
        now = time.perf_counter()
        if t0[0] is None:
            t0[0] = now
        frac = min(1.0, max((now - t0[0]) / budget_s, step / max_steps))
        warm = min(1.0, (step + 1) / warmup_steps)
        return warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))

    return LambdaLR(optimizer, factor)


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


def _run_phase(desc, kind, model, dataset, *, recipe: Recipe, budget_s: float, max_steps: int, seed: int,
               progress: bool, param_groups, extra: dict) -> dict:
    """One Trainer run of ``budget_s`` wall-clock seconds (or ``max_steps``, whichever comes first)."""
    from tqdm.auto import tqdm
    from transformers import PrinterCallback, ProgressCallback, TrainerCallback, TrainingArguments

    joint_cls, distill_cls = _trainer_classes()
    cls = joint_cls if kind == "joint" else distill_cls
    model.train()
    if kind != "joint":
        extra["teacher"].eval()
    opt = torch.optim.AdamW(
        [{"params": [p for p in m.parameters() if p.requires_grad], "lr": lr} for m, lr in param_groups],
        betas=(0.9, 0.95), weight_decay=0.05, eps=1e-8)
    sched = _time_schedule(opt, budget_s, max_steps, warmup_steps=30 if max_steps > 1000 else 10)

    tuner = _ThreadTuner()

    class _TimeBudget(TrainerCallback):
        """Stops the phase when its time is up; a tqdm bar in seconds with step and loss; threads."""

        def on_step_begin(self, args, state, control, **kw):
            tuner.begin(state.global_step)

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()
            self.bar = tqdm(total=round(budget_s), desc=desc, unit="s", disable=not progress,
                            bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s{postfix}")
            self.shown = 0

        def on_step_end(self, args, state, control, **kw):
            tuner.end()
            el = time.perf_counter() - self.t0
            step = min(round(el), round(budget_s)) - self.shown
            if step > 0:
                self.bar.update(step)
                self.shown += step
            self.bar.set_postfix_str(f"step {state.global_step}, {tuner.current} thr", refresh=False)
            if el >= budget_s:
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.bar.set_postfix_str(f"step {state.global_step}, {tuner.current} thr, "
                                         f"loss {float(logs['loss']):.3f}")

        def on_train_end(self, args, state, control, **kw):
            self.bar.close()

    with tempfile.TemporaryDirectory(prefix="adaspec_pair_trainer_") as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=recipe.batch_size, max_steps=max_steps,
            learning_rate=param_groups[0][1], max_grad_norm=1.0, logging_steps=10, save_strategy="no",
            eval_strategy="no", report_to=[], use_cpu=True, bf16=recipe.bf16, seed=seed, data_seed=seed,
            disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False, log_level="error",
        )
        trainer = cls(model=model, args=args, train_dataset=dataset, data_collator=_collate,
                      optimizers=(opt, sched), callbacks=[_TimeBudget()], **extra)
        for cb in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(cb)
        t0 = time.perf_counter()
        try:
            result = trainer.train()
        finally:
            tuner.restore()
        secs = time.perf_counter() - t0
    steps = int(trainer.state.global_step)
    _say(progress, f"[adaspec-hf pair] {desc}: {steps} steps ({steps * recipe.batch_size * recipe.block_size} "
                   f"tokens) in {secs:.0f} s, mean loss {result.training_loss:.3f}")
    return {"steps": steps, "seconds": round(secs, 1), "loss": float(result.training_loss),
            "thread_switches": tuner.switches}


# -------------------------------------------------------------------------------------- measuring
@torch.inference_mode()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


@torch.inference_mode()
def greedy_agreement(target, draft, blocks: torch.Tensor, batch_size: int = 8) -> dict:
    """Teacher-forced greedy agreement on token blocks: fraction of positions where the argmax of
    the draft equals the argmax of the target; also both models' next-token CE loss."""
    agree = n = 0
    tl = dl = 0.0
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i:i + batch_size]
        t = target(input_ids=ids).logits.float()
        d = draft(input_ids=ids).logits.float()
        agree += (t.argmax(-1) == d.argmax(-1)).sum().item()
        n += ids.numel()
        tgt = ids[:, 1:].flatten()
        tl += F.cross_entropy(t[:, :-1].flatten(0, 1), tgt, reduction="sum").item()
        dl += F.cross_entropy(d[:, :-1].flatten(0, 1), tgt, reduction="sum").item()
    m = len(blocks) * (blocks.shape[1] - 1)
    return {"agreement": agree / n, "tokens": n, "target_loss": tl / m, "draft_loss": dl / m}


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
    d = Path(pair_dir).expanduser() if pair_dir is not None else default_pair_dir()
    if _read_report(d) is None:
        if not build:
            raise FileNotFoundError(f"no built pair in {d}; run `adaspec-hf pair build` or build_pair()")
        d = build_pair(d)
    return d


def load_pair(pair_dir=None, *, build=True, dtype=torch.float32, device="cpu"):
    """``(target, draft, tokenizer)`` of a built pair (default: the built-in full pair, built on first use)."""
    d = _resolve(pair_dir, build)
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


def load_models(target=None, draft=None, *, dtype=torch.float32, device="cpu"):
    """Load a target/draft pair: any HF ids or paths (``AutoModelForCausalLM`` / ``AutoTokenizer``,
    the tokenizer from the target). Both ``None``: the built-in pair (built on first use)."""
    if target is None and draft is None:
        return load_pair(dtype=dtype, device=device)
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
    b.set_defaults(func=_cli_build)

    i = sub.add_parser("info", help="print a built pair's report")
    i.add_argument("--dir", default=None, help="pair directory (default: the built-in full pair)")
    i.add_argument("--quick", action="store_true", help="the default quick pair")
    i.add_argument("--json", action="store_true", help="the whole report.json")
    i.set_defaults(func=_cli_info)


def _cli_build(args) -> int:
    d = build_pair(args.out, corpus=args.corpus, quick=args.quick, seed=args.seed, force=args.force)
    rep = _read_report(d)
    print(summarize(rep))
    print(d)
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
