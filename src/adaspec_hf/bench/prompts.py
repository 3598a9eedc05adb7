"""Prompts for benchmarks: the built-in pair's held-out prompts, tokenized, or fixed text for other pairs.

Held-out prompts matter: a draft distilled on the corpus agrees with the target far more often on text
like its training data, so benchmark figures are only comparable on the same held-out files.
"""
from __future__ import annotations

from adaspec_hf.pair import load_prompts

FALLBACK_TEXTS = (
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The history of the Roman Empire begins",
    "import os\nimport sys\n\n\ndef main():\n",
    "Speculative decoding speeds up inference because",
)


def load_prompt_ids(tokenizer, n: int, pair_dir=None) -> list[list[int]]:
    """Held-out prompts of the built-in pair (a `datasets` Dataset), tokenized."""
    ds = load_prompts(pair_dir, n=n)
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ds["prompt"]]


def default_text_prompts(tok, n: int) -> list[list[int]]:
    """Prompts for arbitrary HF pairs: the built-in held-out prompt texts if present, else fixed text."""
    try:
        texts = load_prompts(None, n=n)["prompt"]
    except Exception:  # noqa: BLE001 - no built pair (or no datasets): any fixed text will do
        texts = list(FALLBACK_TEXTS) * ((n + len(FALLBACK_TEXTS) - 1) // len(FALLBACK_TEXTS))
    return [tok(t, add_special_tokens=False)["input_ids"] for t in list(texts)[:n]]
