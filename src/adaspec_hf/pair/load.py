"""Loading a target/draft pair: the built-in one (built on first use) or any HF ids/paths.

Loading refuses a built-in pair that missed its quality gates unless asked: speed-ups measured on a
draft that rarely agrees with its target, or on a target barely costlier than the draft, mean
nothing.
"""
from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import tempfile

import torch

from adaspec_hf.pair.build import build_pair, default_pair_dir
from adaspec_hf.pair.gates import check_gates, failed_gates
from adaspec_hf.pair.report import PROMPTS, read_report

logger = logging.getLogger("adaspec_hf.pair")

Path = pathlib.Path


def _resolve(pair_dir, build: bool) -> Path:
    if pair_dir is None and build:
        return build_pair()  # the built-in pair: returned at once if built with the current recipe
    d = Path(pair_dir).expanduser() if pair_dir is not None else default_pair_dir()
    if read_report(d) is None:
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
    rep = read_report(d)
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
