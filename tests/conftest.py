"""Tiny random models built from configs (no downloads), shared by the tests."""
from __future__ import annotations

import atexit
import functools
import os
import random
import shutil
import tempfile

import pytest
import torch
from transformers import (
    GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
    Qwen2Config, Qwen2ForCausalLM,
)

# the tests' latency profiles and pairs go to a throw-away folder, not the user's cache (a run of the
# suite left ~40 profiles of temporary models there); tests of the cache location set it themselves
os.environ["ADASPEC_HF_CACHE"] = _TEST_CACHE = tempfile.mkdtemp(prefix="adaspec_hf_tests_")
atexit.register(shutil.rmtree, _TEST_CACHE, True)

VOCAB = 101
ARCHS = ("llama", "qwen2", "mistral", "gpt2")


def _build(arch: str, hidden: int, layers: int, seed: int, attn: str):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "gpt2":
        cfg = GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=512, **common)
        model = GPT2LMHeadModel(cfg)
    else:
        kw = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **common)
        if arch == "llama":
            model = LlamaForCausalLM(LlamaConfig(**kw))
        elif arch == "qwen2":
            model = Qwen2ForCausalLM(Qwen2Config(**kw))
        elif arch == "mistral":  # sliding window much shorter than the sequences we generate
            model = MistralForCausalLM(MistralConfig(sliding_window=8, **kw))
        else:
            raise ValueError(arch)
    model.config._attn_implementation = attn
    # sharpen the random logits so greedy paths are stable and drafts sometimes agree
    with torch.no_grad():
        head = model.get_output_embeddings()
        head.weight.mul_(4.0)
    return model.eval()


@functools.lru_cache(maxsize=None)
def pair(arch: str = "llama", attn: str = "sdpa", same: bool = False):
    """(target, draft); ``same=True`` drafts with a copy of the target (everything accepted)."""
    target = _build(arch, 64, 2, 0, attn)
    if same:
        return target, target
    draft = _build(arch, 32, 1, 1, attn)
    # make the draft agree often: share the target's embeddings/head where shapes allow
    return target, draft


def ragged_batch(batch: int, max_len: int, seed: int, min_len: int = 1):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, max_len + 1, (batch,), generator=g)
    p = int(lens.max())
    ids = torch.randint(3, VOCAB, (batch, p), generator=g)
    mask = torch.zeros(batch, p, dtype=torch.long)
    for i, n in enumerate(lens.tolist()):
        mask[i, p - n:] = 1
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


@pytest.fixture
def llama_pair():
    return pair("llama")


def random_shapes(seed: int, max_depth: int = 5, max_width: int = 3, p_empty: float = 0.2, p_chain: float = 0.3):
    """A draft policy with random per-row, per-step chain/tree shapes, including nothing drafted."""
    from adaspec_hf.policies import ShapeFunction, TreeShape

    def fn(step: int, row: int):
        r = random.Random(seed * 1_000_003 + step * 1009 + row)
        kind = r.random()
        if kind < p_empty:
            return 0
        if kind < p_empty + p_chain:
            return r.randint(1, max_depth)
        depth = r.randint(1, max_depth)
        adds = [r.randint(1, max_width) for _ in range(depth)]
        return TreeShape(adds, [r.randint(1, a) for a in adds[:-1]])
    return ShapeFunction(fn, max_children=max_width)


def char_tokenizer(**kwargs):
    """A character-level tokenizer over the tiny vocabulary (so stop strings and streams have real text)."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    chars = (string.ascii_letters + string.digits + string.punctuation + " ")[: VOCAB - 3]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                   **kwargs)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster and far steadier on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------- a synthetic latency profile
PROFILE_ROWS, PROFILE_TOKENS, PROFILE_CTXS = (1, 2, 4, 8), (1, 2, 3, 4, 8), (16, 64, 256)


def roofline(r, t, c):
    return 1e-3 + 2e-5 * r * t + 1e-8 * r * t * c + 3e-8 * r * c


def synthetic_profile(kink: bool = True):
    """A roofline cost on a small grid, with a CPU-like kink (2 tokens slower than 4) if asked."""
    import itertools

    from adaspec_hf.profiling import Profile

    pts = []
    for r, t, c in itertools.product(PROFILE_ROWS, PROFILE_TOKENS, PROFILE_CTXS):
        s = roofline(r, t, c) * (1.6 if (kink and t == 2) else 1.0)
        pts.append([r, t, c, s])
    draft = [[r, t, c, s / 10] for r, t, c, s in pts]
    return Profile(key={}, target=pts, draft=draft, overhead=2e-4)


def run_example(script: str, cache_dir) -> str:
    """Run ``examples/<script>`` offline (a fresh cache: no built pair, so tiny random models) and
    return its stdout; fails with the script's stderr if it exits non-zero."""
    import subprocess
    import sys
    from pathlib import Path

    examples = Path(__file__).resolve().parents[1] / "examples"
    env = dict(os.environ, ADASPEC_HF_CACHE=str(cache_dir), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, script], cwd=examples, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout
