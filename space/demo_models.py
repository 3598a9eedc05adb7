"""The demo's models: which pair to load, loading it in the background, and warming it up.

Loading goes through :mod:`adaspec_hf.pair` (the built-in pair, a pair directory, any HF ids), so the
page shows exactly the pair that ``adaspec-hf demo`` and the benchmarks use.
"""
from __future__ import annotations

import logging
import string
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

import adaspec_hf
from adaspec_hf.bench.methods import resolve_method
from adaspec_hf.pair import build_pair, load_models, load_prompts, read_report

logger = logging.getLogger("adaspec_hf.space")

FALLBACK_PROMPTS = [
    'def read_config(path):\n    """Read a configuration file and return a dict."""\n',
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "import os\n\n\ndef list_files(directory):\n",
]


@dataclass
class ModelSpec:
    """Which pair to load: HF ids/paths, a pair directory, the quick pair, tiny random models, or
    (all empty) the built-in pair."""

    target: str | None = None
    draft: str | None = None
    pair_dir: str | None = None
    quick: bool = False
    tiny: bool = False
    dtype: str = "float32"
    device: str = "cpu"

    def describe(self) -> str:
        if self.tiny:
            return "tiny random models (UI/test mode: the text is noise)"
        if self.target or self.draft:
            return f"target `{self.target}`, draft `{self.draft}`"
        if self.pair_dir:
            return f"pair in `{self.pair_dir}`"
        return "the built-in quick pair" if self.quick else "the built-in pair"


def char_tokenizer(vocab_size: int = 101):
    """A character-level fast tokenizer (no download) for the tiny models."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    chars = (string.ascii_letters + string.digits + string.punctuation + " \n")[: vocab_size - 3]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>")


def tiny_pair(vocab_size: int = 101, seed: int = 0):
    """(target, draft, tokenizer): a random 4-layer Llama and, as its draft, its own first layer
    (same embeddings and head), so that the draft agrees with the target often. Built in < 1 s."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kw = dict(vocab_size=vocab_size, hidden_size=96, intermediate_size=192, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
              pad_token_id=0, tie_word_embeddings=False)
    target = LlamaForCausalLM(LlamaConfig(num_hidden_layers=4, **kw)).eval()
    with torch.no_grad():
        target.lm_head.weight.mul_(4.0)  # sharper random logits: stable greedy paths
        for layer in target.model.layers[1:]:  # the layers the draft skips change the output a little
            layer.self_attn.o_proj.weight.mul_(0.25)
            layer.mlp.down_proj.weight.mul_(0.25)
    draft = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, **kw)).eval()
    draft.load_state_dict(target.state_dict(), strict=False)
    for m in (target, draft):  # random text: no end-of-sequence, every run goes to max_new_tokens
        m.generation_config.eos_token_id = None
    return target, draft, char_tokenizer(vocab_size)


def load_spec(spec: ModelSpec):
    """(target, draft, tokenizer, prompts) for ``spec``; raises with a readable message."""
    dtype = getattr(torch, spec.dtype)
    prompts: list[str] = []
    if spec.tiny:
        target, draft, tok = tiny_pair()
        target, draft = target.to(spec.device, dtype), draft.to(spec.device, dtype)
        prompts = ["def add(a, b):\n    return", "The quick brown fox", "for i in range(10):"]
    elif spec.target or spec.draft:
        if not (spec.target and spec.draft):
            raise ValueError("give both a target and a draft (HF ids or local paths), or neither for the built-in pair")
        target, draft, tok = load_models(spec.target, spec.draft, dtype=dtype, device=spec.device)
    else:
        d = Path(spec.pair_dir).expanduser() if spec.pair_dir else build_pair(quick=spec.quick)
        if spec.pair_dir and not (d / "target" / "config.json").is_file():
            raise FileNotFoundError(f"{d} has no target/config.json (a pair directory holds target/ and draft/)")
        target, draft, tok = load_models(d / "target", d / "draft", dtype=dtype, device=spec.device)
        prompts = _pair_prompts(d)
    for m in (target, draft):
        if getattr(m.config, "use_cache", True) is False:  # a training leftover in a saved config
            logger.warning("%s was saved with use_cache=False; generation needs the KV cache: turning it on",
                           getattr(m, "name_or_path", type(m).__name__))
            m.config.use_cache = True
    adaspec_hf.check_vocab(target, draft)
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return target, draft, tok, prompts or list(FALLBACK_PROMPTS)


def _pair_prompts(pair_dir: Path, n: int = 6) -> list[str]:
    """A built pair's held-out prompts; none for a directory that only holds target/ and draft/."""
    if read_report(pair_dir) is None:
        return []
    return [p for p in load_prompts(pair_dir, n=n)["prompt"] if p]


@dataclass
class Loaded:
    spec: ModelSpec
    target: torch.nn.Module
    draft: torch.nn.Module
    tokenizer: object
    prompts: list[str]
    plain_tpot_ms: float = float("nan")


class Store:
    """The models in use. Loading runs in a background thread; a failed load keeps the old pair."""

    def __init__(self):
        self.loaded: Loaded | None = None
        self.status = "no models loaded yet"
        self.error: str | None = None
        self.busy = threading.Lock()  # one generation/serving run at a time (timings must not overlap)
        self._thread: threading.Thread | None = None
        self._done = threading.Event()

    @property
    def loading(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, spec: ModelSpec) -> None:
        if self.loading:
            raise RuntimeError("models are still loading; wait for that to finish")
        self._done.clear()
        self.error = None
        self.status = f"loading {spec.describe()} ..."
        self._thread = threading.Thread(target=self._load, args=(spec,), daemon=True, name="adaspec-space-load")
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def _load(self, spec: ModelSpec) -> None:
        try:
            target, draft, tok, prompts = load_spec(spec)
            adaspec_hf.enable(target)
            self.status = f"warming up {spec.describe()} (first run profiles the latency of the pair) ..."
            with self.busy:
                tpot = warm_up(target, draft, tok)
            self.loaded = Loaded(spec, target, draft, tok, prompts, tpot)
            n_t = sum(p.numel() for p in target.parameters()) / 1e6
            n_d = sum(p.numel() for p in draft.parameters()) / 1e6
            self.status = (f"✅ {spec.describe()}: target {n_t:.1f}M, draft {n_d:.1f}M parameters on "
                           f"{spec.device} ({spec.dtype}); plain TPOT here ≈ {tpot:.1f} ms")
        except Exception as e:  # noqa: BLE001 - shown in the page
            logger.warning("loading %s failed:\n%s", spec, traceback.format_exc())
            self.error = f"could not load {spec.describe()}: {type(e).__name__}: {e}"
            keep = f" Still using {self.loaded.spec.describe()}." if self.loaded else ""
            self.status = "❌ " + self.error + keep
        finally:
            self._done.set()

WARMUP_PROMPT_TOKENS = 8
WARMUP_NEW_TOKENS = 4
TPOT_PROBE_TOKENS = 16  # plain tokens timed for the status line's TPOT: enough to average out the first one

def warm_up(target, draft, tok) -> float:
    """One short run of every method (also takes the planner's latency profile); returns plain TPOT (ms)."""
    ids = tok("def f(x):\n    return", return_tensors="pt")["input_ids"][:, :WARMUP_PROMPT_TOKENS]
    ids = ids.to(target.device)
    mask = torch.ones_like(ids)
    gen_kw = dict(max_new_tokens=WARMUP_NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
    for name in ("vanilla", "hf-assisted", "adaptive", "adaptive-tree"):
        resolve_method(name).fn(target, draft, ids, mask, gen_kw)
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=tok.pad_token_id)
    t0 = time.perf_counter()
    n = TPOT_PROBE_TOKENS
    out = target.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
    return (time.perf_counter() - t0) * 1e3 / max(out.shape[1] - ids.shape[1], 1)
