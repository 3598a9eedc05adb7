"""adaspec-hf demo (Gradio; runs locally and as a Hugging Face Space).

    python space/app.py                        # the built-in pair (built on first use, ~15 min on 2 CPU cores)
    python space/app.py --quick                # the small quick pair (~1-2 min to build)
    python space/app.py --target ID --draft ID # any HF ids/paths sharing a tokenizer (or ADASPEC_TARGET/ADASPEC_DRAFT)
    python space/app.py --pair-dir DIR         # a pair directory with target/ and draft/ (or ADASPEC_PAIR_DIR)
    python space/app.py --tiny                 # two tiny random models, instant (tests, UI work)

Tab "Generate": the same prompt through plain ``generate``, HF assisted generation and
``generate(..., assistant_model=draft, adaptive=True)``, one after the other on the same machine, each
streamed live through an HF streamer. Tokens accepted from the draft and tokens produced by the target
are coloured differently; tokens/s, speed-up and the draft length (tree size) chosen at every step are
shown. Tab "Serving": simulated users with different latency SLOs submit requests at a chosen rate to
``adaspec_hf.Engine``, with and without speculation (attainment and goodput).
"""
from __future__ import annotations

import argparse
import copy
import html
import logging
import os
import queue
import random
import string
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

try:
    import adaspec_hf
except ImportError:  # a checkout without `pip install -e .`, or a Space with src/adaspec_hf copied next to app.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    import adaspec_hf

import gradio as gr
import torch
from matplotlib.figure import Figure
from transformers.generation.streamers import BaseStreamer

logger = logging.getLogger("adaspec_hf.space")

POLICIES = ["adaptive", "adaptive-tree", "static-4", "heuristic"]
METHODS = ("plain", "hf", "ours")
TITLES = {"plain": "Plain generation", "hf": "HF assisted generation", "ours": "adaspec-hf (adaptive=True)"}
DRAFT, TARGET = "accepted from draft", "produced by target"
COLORS = {DRAFT: "#86efac", TARGET: "#bfdbfe"}  # plots; the token CSS uses the same hues
LINE_COLORS = {"plain": "#64748b", "hf": "#f59e0b", "ours": "#16a34a"}
FALLBACK_PROMPTS = [
    'def read_config(path):\n    """Read a configuration file and return a dict."""\n',
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "import os\n\n\ndef list_files(directory):\n",
]


# ------------------------------------------------------------------------------------------ models
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
    from adaspec_hf.pair.build import build_pair, load_models

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
    import json

    try:
        lines = (pair_dir / "prompts.jsonl").read_text().splitlines()
        return [json.loads(x)["prompt"] for x in lines[:n] if x.strip()]
    except (OSError, ValueError, KeyError):
        return []


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


def warm_up(target, draft, tok) -> float:
    """One short run of every method (also takes the planner's latency profile); returns plain TPOT (ms)."""
    ids = tok("def f(x):\n    return", return_tensors="pt")["input_ids"][:, :8]
    ids = ids.to(target.device)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=tok.pad_token_id)
    target.generate(ids, max_new_tokens=4, **kw)
    _hf_assisted(target, draft, ids, max_new_tokens=4, **kw)
    for policy in ("adaptive", "adaptive-tree"):
        target.generate(ids, max_new_tokens=4, assistant_model=draft, adaptive=True, draft_policy=policy, **kw)
    t0 = time.perf_counter()
    n = 16
    out = target.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
    return (time.perf_counter() - t0) * 1e3 / max(out.shape[1] - ids.shape[1], 1)


def _hf_assisted(target, draft, ids, **kw):
    """HF's own assisted generation with its defaults (the draft's generation config is restored)."""
    saved = copy.deepcopy(draft.generation_config)
    try:
        return target.generate(ids, assistant_model=draft, **kw)
    finally:
        draft.generation_config = saved


# -------------------------------------------------------------------------------------- streaming
class ChunkStreamer(BaseStreamer):
    """HF streamer that hands every chunk of new token ids to a queue with its arrival time.

    ``generate`` first puts the prompt, then one chunk per step: plain generation one token, assisted
    and adaptive generation the accepted draft tokens followed by one token of the target."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.queue.put((time.perf_counter(), [int(t) for t in value.reshape(-1).tolist()]))

    def end(self):
        self.queue.put(None)


@dataclass
class Run:
    """One method's run: the chunks as they arrived, and what it cost."""

    method: str
    prompt_ids: list[int]
    t0: float = 0.0
    chunks: list[tuple[float, list[int]]] = field(default_factory=list)
    elapsed: float | None = None
    steps: list | None = None  # adaspec StepRecords (ours only)
    error: str | None = None
    _pieces: list = field(default_factory=list, repr=False)  # decoded text: (piece, first token, last token)
    _next: int = 0  # next token to decode

    @property
    def ids(self) -> list[int]:
        return [t for _, c in self.chunks for t in c]

    @property
    def n_tokens(self) -> int:
        return sum(len(c) for _, c in self.chunks)

    @property
    def done(self) -> bool:
        return self.elapsed is not None

    def tokens_per_s(self) -> float:
        return self.n_tokens / self.elapsed if self.elapsed else float("nan")

    def ttft_ms(self) -> float:
        return (self.chunks[0][0] - self.t0) * 1e3 if self.chunks else float("nan")

    def tpot_ms(self) -> float:
        """Mean time per output token after the first one (the SLO's metric)."""
        if self.n_tokens < 2 or not self.done:
            return float("nan")
        return (self.t0 + self.elapsed - self.chunks[0][0]) * 1e3 / (self.n_tokens - 1)

    def labels(self) -> list[str]:
        """Per token: accepted from the draft, or produced by the target."""
        out: list[str] = []
        # adaspec: the first chunk is the prefill's token, then one chunk per StepRecord
        skip = len(self.chunks) - len(self.steps) if self.steps is not None else -1
        for i, (_, c) in enumerate(self.chunks):
            if self.method == "plain" or i < skip:
                out += [TARGET] * len(c)
                continue
            # exact from the engine's step records where they line up with the chunks, else by position
            acc = self.steps[i - skip].accepted[0] if skip in (0, 1) else len(c) - 1
            acc = max(0, min(acc, len(c)))
            out += [DRAFT] * acc + [TARGET] * (len(c) - acc)
        return out


def _decode_pieces(run: Run, tok, window: int = 8) -> None:
    """Decode the run's new tokens into text pieces, incrementally (cached on the run): each token is
    decoded after a few tokens of left context, so the pieces join up exactly; a token that ends inside
    a UTF-8 character is grouped with the next ones (at most 4)."""
    ids = run.ids
    allids = run.prompt_ids + ids
    p = len(run.prompt_ids)
    while run._next < len(ids):
        j = k = run._next
        ctx = allids[max(0, p + j - window): p + j]
        base = tok.decode(ctx, skip_special_tokens=True)
        while True:
            text = tok.decode(ctx + ids[j: k + 1], skip_special_tokens=True)
            piece = text[len(base):] if text.startswith(base) else text
            if not piece.endswith("\ufffd") or k - j >= 3:
                break
            if k + 1 >= len(ids):
                if not run.done:
                    return  # wait for the rest of the character
                break
            k += 1
        run._pieces.append((piece, j, k))
        run._next = k + 1


def highlighted(run: Run | None, tok) -> list[tuple[str, str]]:
    """(text, label) spans, one per token (or per multi-token character)."""
    if run is None or not run.chunks or tok is None:
        return []
    _decode_pieces(run, tok)
    labels = run.labels()
    return [(piece, DRAFT if DRAFT in labels[j: k + 1] else labels[k]) for piece, j, k in run._pieces if piece]


def stats_md(run: Run | None, plain: Run | None, slo_ms: float | None, running: bool) -> str:
    if run is None:
        return "*waiting*" if running else ""
    if run.error:
        return f"**error:** {html.escape(run.error)}"
    if not run.done:
        el = time.perf_counter() - run.t0
        return f"⏳ {run.n_tokens} tokens, {el:.1f} s ..."
    parts = [f"**{run.tokens_per_s():.1f} tokens/s**"]
    if run.method != "plain" and plain is not None and plain.done and plain.tokens_per_s() > 0:
        parts.append(f"**{run.tokens_per_s() / plain.tokens_per_s():.2f}×** plain")
    steps = len(run.chunks)
    parts.append(f"{run.n_tokens} tokens in {run.elapsed:.2f} s, {steps} target passes "
                 f"({run.n_tokens / max(steps, 1):.2f} tokens/pass)")
    tpot = run.tpot_ms()
    line = f"TTFT {run.ttft_ms():.0f} ms · TPOT {tpot:.1f} ms"
    if slo_ms:
        line += f" · SLO {slo_ms:g} ms {'✅ met' if tpot <= slo_ms else '❌ missed'}"
    parts.append(line)
    return " · ".join(parts[:2]) + "  \n" + "  \n".join(parts[2:])


# ------------------------------------------------------------------------------------------ figures
def fig_progress(runs: dict[str, Run], slo_ms: float | None) -> Figure:
    fig = Figure(figsize=(6.4, 3.4), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for m, r in runs.items():
        if r is None or not r.chunks:
            continue
        ts, ns, n = [0.0], [0], 0
        for t, c in r.chunks:
            n += len(c)
            ts.append(t - r.t0)
            ns.append(n)
        if r.done:
            ts.append(r.elapsed)
            ns.append(n)
        ax.step(ts, ns, where="post", color=LINE_COLORS[m], lw=2, label=TITLES[m])
    if slo_ms:
        xmax = max((ax.get_xlim()[1], 0.1))
        ax.plot([0, xmax], [0, xmax * 1e3 / slo_ms], "--", color="#dc2626", lw=1, label=f"SLO pace ({slo_ms:g} ms/token)")
        ax.set_xlim(0, xmax)
        ax.set_ylim(0, max((r.n_tokens for r in runs.values() if r), default=1) * 1.08 + 1)
    ax.set_xlabel("seconds")
    ax.set_ylabel("tokens generated")
    ax.set_title("Tokens over time")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(loc="upper left", fontsize=8)
    return fig


def fig_steps(run: Run | None, hf: Run | None, policy: str) -> Figure:
    fig = Figure(figsize=(6.4, 3.4), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    if run is not None and run.steps:
        x = list(range(1, len(run.steps) + 1))
        drafted = [s.drafted[0] for s in run.steps]
        accepted = [s.accepted[0] for s in run.steps]
        tree = policy.endswith("tree")
        ax.bar(x, drafted, color="#cbd5e1", label="tree size (nodes verified)" if tree else "draft length chosen")
        ax.bar(x, accepted, color=COLORS[DRAFT], edgecolor="#16a34a", lw=0.5, label="accepted")
        if hf is not None and hf.chunks:
            hx = list(range(1, len(hf.chunks) + 1))
            ax.plot(hx, [len(c) - 1 for _, c in hf.chunks], ".", color=LINE_COLORS["hf"], ms=5,
                    label="HF assisted: accepted")
        ax.legend(loc="upper right", fontsize=8)
        ax.set_xlim(0.3, max(len(x), len(hf.chunks) if hf else 0) + 0.7)
    else:
        ax.text(0.5, 0.5, "run a prompt to see the draft length chosen at every step", ha="center",
                va="center", transform=ax.transAxes, color="#64748b")
    ax.set_xlabel("step (one target forward pass)")
    ax.set_ylabel("draft tokens")
    ax.set_title(f"Draft chosen per step — policy {policy}")
    ax.grid(alpha=0.3, axis="y")
    return fig


# -------------------------------------------------------------------------------------- generation
def _start(L: Loaded, method: str, prompt_ids: list[int], gen_kw: dict, policy: str) -> tuple[Run, ChunkStreamer, threading.Thread]:
    run = Run(method, prompt_ids)
    streamer = ChunkStreamer()
    ids = torch.tensor([prompt_ids], device=L.target.device)
    kw = dict(gen_kw, attention_mask=torch.ones_like(ids), streamer=streamer, pad_token_id=L.tokenizer.pad_token_id)

    def work():
        try:
            if gen_kw.get("do_sample"):
                torch.manual_seed(0)
            run.t0 = time.perf_counter()
            if method == "plain":
                L.target.generate(ids, **kw)
            elif method == "hf":
                _hf_assisted(L.target, L.draft, ids, **kw)
            else:
                L.target.generate(ids, assistant_model=L.draft, adaptive=True, draft_policy=policy, **kw)
                run.steps = list(L.target.adaspec_stats.steps)
            run.elapsed = time.perf_counter() - run.t0
        except Exception as e:  # noqa: BLE001 - shown in the page
            logger.warning("%s generation failed:\n%s", method, traceback.format_exc())
            run.error = f"{type(e).__name__}: {e}"
            run.elapsed = time.perf_counter() - run.t0
            streamer.end()

    run.t0 = time.perf_counter()
    th = threading.Thread(target=work, daemon=True, name=f"adaspec-space-{method}")
    return run, streamer, th


def compare(store: Store, prompt: str, temperature: float, max_new_tokens: int, policy: str,
            slo_ms: float | None, with_hf: bool = True, refresh_s: float = 0.15):
    """Generator of UI states: dicts with ``runs``, ``status``, ``error``, ``final``."""
    state = {"runs": dict.fromkeys(METHODS), "status": "", "error": None, "final": False, "tokenizer": None}
    if not prompt or not prompt.strip():
        state["error"] = "Enter a prompt first (an empty prompt cannot be continued)."
        state["final"] = True
        yield state
        return
    if policy not in POLICIES:
        state["error"] = f"Unknown draft policy {policy!r}; choose one of {', '.join(POLICIES)}."
        state["final"] = True
        yield state
        return
    while store.loading:
        state["status"] = "⏳ " + store.status
        yield state
        store.wait(1.0)
    if store.loaded is None:
        state["error"] = store.error or "No models are loaded."
        state["final"] = True
        yield state
        return
    L = store.loaded  # a pair loaded meanwhile is used from the next run on
    state["tokenizer"] = L.tokenizer
    ids = L.tokenizer(prompt)["input_ids"]
    if not ids:
        state["error"] = "The prompt has no tokens for this tokenizer."
        state["final"] = True
        yield state
        return
    do_sample = temperature is not None and temperature > 0
    gen_kw = dict(max_new_tokens=int(max_new_tokens), do_sample=do_sample)
    if do_sample:
        gen_kw.update(temperature=float(temperature), top_k=0, top_p=1.0)
    methods = [m for m in METHODS if with_hf or m != "hf"]
    with store.busy:
        for m in methods:
            state["status"] = f"running {TITLES[m]} ..."
            run, streamer, th = _start(L, m, ids, gen_kw, policy)
            state["runs"][m] = run
            th.start()
            last = 0.0
            try:
                while True:
                    try:
                        item = streamer.queue.get(timeout=refresh_s)
                    except queue.Empty:
                        if not th.is_alive() and streamer.queue.empty():
                            break  # ended without streamer.end()
                        item = False
                    if item is None:
                        break
                    if item:
                        run.chunks.append(item)
                    if time.perf_counter() - last >= refresh_s:
                        last = time.perf_counter()
                        yield state
            finally:  # also when the page goes away mid-run: keep runs from overlapping
                th.join()
            yield state
    runs = state["runs"]
    errs = [f"{TITLES[m]}: {r.error}" for m, r in runs.items() if r is not None and r.error]
    if errs:
        state["error"] = "  \n".join(errs)
    state["status"] = summary_md(runs, do_sample)
    state["final"] = True
    yield state


def summary_md(runs: dict[str, Run], sampled: bool) -> str:
    plain, hf, ours = runs.get("plain"), runs.get("hf"), runs.get("ours")
    ok = lambda r: r is not None and r.done and not r.error and r.elapsed  # noqa: E731
    if not (ok(plain) and ok(ours)):
        return ""
    s = f"**adaspec-hf: {ours.tokens_per_s() / plain.tokens_per_s():.2f}× plain generation**"
    if ok(hf):
        s += f", {ours.tokens_per_s() / hf.tokens_per_s():.2f}× HF assisted generation"
    acc = sum(s_.accepted[0] for s_ in ours.steps or []) / max(len(ours.steps or []), 1)
    s += f"; {acc:.2f} draft tokens accepted per target pass."
    if not sampled:
        same = ours.ids == plain.ids
        s += " Greedy output identical to plain generation ✅" if same else " ⚠️ output differs from plain generation"
    else:
        s += " (sampling: each method draws its own sample from the target's distribution)"
    return s


# ----------------------------------------------------------------------------------------- serving
DEFAULT_USERS = [["chat", 100.0, 1000.0, 50.0], ["code assistant", 200.0, 2000.0, 30.0],
                 ["batch summariser", 1000.0, 10000.0, 20.0]]
USER_HEADERS = ["user", "TPOT SLO (ms)", "TTFT SLO (ms)", "share of requests (%)"]
SERVING_POLICIES = ["slo", "slo-tree", "adaptive", "adaptive-tree", "static-4", "heuristic"]
BASELINE = "static-0"


def serving_api():
    """(Engine, SLO, None) from adaspec_hf, or (None, None, why the serving tab cannot run)."""
    Engine, SLO = getattr(adaspec_hf, "Engine", None), getattr(adaspec_hf, "SLO", None)
    if Engine is None or SLO is None:
        try:
            from adaspec_hf.serving import engine as serving

            Engine, SLO = serving.Engine, serving.SLO
        except Exception as e:  # noqa: BLE001
            return None, None, (f"The serving engine is not available in this version of adaspec-hf "
                                f"(`adaspec_hf.Engine`: {type(e).__name__}: {e}). The Generate tab works without it.")
    return Engine, SLO, None


@dataclass
class SimRequest:
    user: str
    tpot_slo: float | None
    ttft_slo: float | None
    arrival: float  # seconds after the start of the workload
    prompt_ids: list[int]
    result: object | None = None  # adaspec_hf.serving.engine.RequestResult
    error: str | None = None

    @property
    def tokens(self) -> int:
        return len(self.result.token_ids) if self.result is not None else 0

    def met(self) -> bool:
        r = self.result
        if r is None or self.error or r.error is not None:
            return False
        return bool(r.slo_met) if r.slo_met is not None else True


def _ms(v) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if v > 0 else None


def make_workload(users: list[list], rate: float, n_requests: int, prompts: list[list[int]], seed: int = 0) -> list[SimRequest]:
    """Poisson arrivals at ``rate`` requests/s; each request's user drawn by share (seeded)."""
    rows = [u for u in (users or []) if u is not None and len(u) >= 4 and str(u[0]).strip()]
    if not rows:
        raise ValueError("add at least one user (name, TPOT SLO ms, TTFT SLO ms, share %)")
    weights = [max(_ms(u[3]) or 0.0, 0.0) for u in rows]
    if sum(weights) <= 0:
        raise ValueError("the users' shares of requests must add up to more than 0")
    if not rate or rate <= 0:
        raise ValueError("the request rate must be > 0")
    if not prompts:
        raise ValueError("no prompts to send")
    rng = random.Random(seed)
    t, reqs = 0.0, []
    for i in range(int(n_requests)):
        u = rng.choices(rows, weights)[0]
        reqs.append(SimRequest(str(u[0]), _ms(u[1]), _ms(u[2]), t, list(prompts[i % len(prompts)])))
        t += rng.expovariate(rate)
    return reqs


def simulate(store: Store, users, rate: float, n_requests: int, max_new_tokens: int, policy: str,
             max_rows: int = 8) -> dict:
    """The same seeded workload through ``Engine`` with ``policy`` and with ``static-0``;
    returns {policy: (requests, makespan seconds)}."""
    Engine, SLO, why = serving_api()
    if why:
        raise RuntimeError(why)
    L = store.loaded
    prompts = [L.tokenizer(p)["input_ids"] for p in L.prompts if p]
    make_workload(users, rate, n_requests, prompts)  # validate before taking the machine
    results = {}
    with store.busy:
        for pol in (policy, BASELINE):
            reqs = make_workload(users, rate, n_requests, prompts)
            with Engine(L.target, L.draft, L.tokenizer, policy=pol, max_rows=max_rows, seed=0) as engine:
                results[pol] = (reqs, _drive(engine, SLO, reqs, max_new_tokens))
    return results


def _drive(engine, SLO, reqs: list[SimRequest], max_new_tokens: int) -> float:
    """Submit each request at its arrival time, wait for all; returns the makespan in seconds."""
    t0 = time.perf_counter()
    handles = []
    for r in reqs:
        delay = r.arrival - (time.perf_counter() - t0)
        if delay > 0:
            time.sleep(delay)
        slo = SLO(tpot_ms=r.tpot_slo, ttft_ms=r.ttft_slo) if (r.tpot_slo or r.ttft_slo) else None
        try:
            handles.append((r, engine.submit(r.prompt_ids, max_new_tokens=max_new_tokens, slo=slo, eos_token_id=[])))
        except Exception as e:  # noqa: BLE001 - a refused request counts as missed
            r.error = f"{type(e).__name__}: {e}"
    for r, h in handles:
        try:
            r.result = h.result()
        except Exception as e:  # noqa: BLE001
            r.error = f"{type(e).__name__}: {e}"
    return time.perf_counter() - t0


def _agg(reqs: list[SimRequest], total: float) -> dict:
    met = [r for r in reqs if r.met()]
    done = [r.result for r in reqs if r.result is not None and r.result.tpot is not None]
    return {"n": len(reqs), "attain": 100 * len(met) / max(len(reqs), 1),
            "goodput": sum(r.tokens for r in met) / total, "throughput": sum(r.tokens for r in reqs) / total,
            "tpot": 1e3 * sum(d.tpot for d in done) / len(done) if done else float("nan"),
            "ttft": 1e3 * sum(r.result.ttft for r in reqs if r.result and r.result.ttft is not None)
                    / max(sum(1 for r in reqs if r.result and r.result.ttft is not None), 1)}


def serving_table(results) -> list[list]:
    rows = []
    for pol, (reqs, total) in results.items():
        groups = [(u, [r for r in reqs if r.user == u]) for u in dict.fromkeys(r.user for r in reqs)]
        for user, rs in groups + [("all users", reqs)]:
            a = _agg(rs, total)
            rows.append([pol, user, a["n"], f"{a['attain']:.0f}%", round(a["goodput"], 1), round(a["throughput"], 1),
                         round(a["ttft"]), round(a["tpot"], 1)])
    return rows


SERVE_HEADERS = ["policy", "user", "requests", "SLO attainment", "goodput (tok/s)", "throughput (tok/s)",
                 "mean TTFT (ms)", "mean TPOT (ms)"]


def serving_md(results) -> str:
    (pol, (r1, t1)), (_, (r0, t0)) = list(results.items())[:2]
    a1, a0 = _agg(r1, t1), _agg(r0, t0)
    ratio = f"{a1['goodput'] / a0['goodput']:.2f}×" if a0["goodput"] > 0 else "∞×" if a1["goodput"] > 0 else "—"
    return (f"**{pol}: SLO attainment {a1['attain']:.0f}% vs {a0['attain']:.0f}% without speculation; goodput "
            f"{a1['goodput']:.1f} vs {a0['goodput']:.1f} tokens/s ({ratio}).**")


def fig_serving(results) -> Figure:
    fig = Figure(figsize=(9.6, 3.2), dpi=100, layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    pols = list(results)
    users = list(dict.fromkeys(r.user for reqs, _ in results.values() for r in reqs)) + ["all users"]
    width = 0.8 / len(pols)
    colors = {pols[0]: LINE_COLORS["ours"], BASELINE: LINE_COLORS["plain"]}
    for i, pol in enumerate(pols):
        reqs, total = results[pol]
        att = [_agg([r for r in reqs if r.user == u] if u != "all users" else reqs, total)["attain"] for u in users]
        ax1.bar([x + i * width for x in range(len(users))], att, width, label=pol, color=colors.get(pol))
    ax1.set_xticks([x + width * (len(pols) - 1) / 2 for x in range(len(users))], users, fontsize=8)
    ax1.set_ylabel("SLO attainment (%)")
    ax1.set_ylim(0, 105)
    ax1.legend(fontsize=8)
    good = [_agg(*results[p])["goodput"] for p in pols]
    thr = [_agg(*results[p])["throughput"] for p in pols]
    ax2.bar(pols, thr, color="#e2e8f0", label="throughput")
    ax2.bar(pols, good, color=[colors.get(p) for p in pols], width=0.5, label="goodput (within SLO)")
    ax2.set_ylabel("tokens/s")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3, axis="y")
    return fig


# ---------------------------------------------------------------------------------------------- UI
CSS = """
#error-box {border: 1px solid #dc2626; border-radius: 8px; padding: 2px 12px; background: #fef2f2; color: #7f1d1d}
.tokstream {font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px; line-height: 1.55;
  white-space: pre-wrap; word-break: break-word; min-height: 16em; max-height: 30em; overflow-y: auto; padding: 8px 10px;
  border: 1px solid var(--border-color-primary); border-radius: 8px; background: var(--background-fill-primary)}
.tokstream .pr {color: #94a3b8}
.tokstream .tk {color: #0f172a; border-radius: 2px; box-shadow: inset -1px 0 0 rgba(15, 23, 42, .18)}
.tokstream .tk.d {background: #bbf7d0}
.tokstream .tk.t {background: #dbeafe}
.tokstream .empty {color: #94a3b8; font-style: italic}
.legend span {padding: 1px 6px; border-radius: 3px; margin-right: 6px; color: #0f172a}
.method-title {font-weight: 600; margin: 2px 0 4px 2px}
"""
LEGEND = (f"<span class='legend'><span style='background:#bbf7d0'>{DRAFT}</span>"
          f"<span style='background:#dbeafe'>{TARGET}</span></span>")


def tokens_html(run: Run | None, tok, prompt_tail: int = 400) -> str:
    """The prompt (grey) and the generated tokens, each coloured by who produced it."""
    if run is None or tok is None:
        return "<div class='tokstream'><span class='empty'>—</span></div>"
    prompt = tok.decode(run.prompt_ids, skip_special_tokens=True)
    if len(prompt) > prompt_tail:
        prompt = "…" + prompt[-prompt_tail:]
    parts = [f"<span class='pr'>{html.escape(prompt)}</span>"]
    for text, label in highlighted(run, tok):
        cls = "d" if label == DRAFT else "t"
        parts.append(f"<span class='tk {cls}'>{html.escape(text)}</span>")
    return "<div class='tokstream'>" + "".join(parts) + "</div>"


def build_app(store: Store, spec: ModelSpec | None = None) -> gr.Blocks:
    spec = spec or ModelSpec()
    with gr.Blocks(title="adaspec-hf: adaptive speculative decoding") as demo:
        gr.Markdown(
            "# adaspec-hf: adaptive, lossless speculative decoding for Transformers\n"
            "The same prompt through plain `generate`, HF assisted generation and "
            "`model.generate(..., assistant_model=draft, adaptive=True)`, one after the other on this machine, "
            "streamed live. " + LEGEND)
        status = gr.Markdown(store.status, elem_id="model-status")
        with gr.Accordion("Models", open=False, elem_id="models-acc"):
            with gr.Row():
                target_box = gr.Textbox(label="Target (HF id or path)", value=spec.target or "",
                                        placeholder="empty: the built-in pair", elem_id="target-id")
                draft_box = gr.Textbox(label="Draft (HF id or path, same tokenizer)", value=spec.draft or "",
                                       placeholder="empty: the built-in pair", elem_id="draft-id")
            load_btn = gr.Button("Load models", elem_id="load-btn")
        timer = gr.Timer(1.0, active=store.loading)

        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=3):
                    prompt = gr.Textbox(label="Prompt", lines=7, max_lines=14, elem_id="prompt",
                                        value=store.loaded.prompts[0] if store.loaded else spec_prompt(spec))
                    examples_ds = gr.Dataset(components=[prompt], samples=[[p] for p in FALLBACK_PROMPTS],
                                             label="Examples (held-out text)", elem_id="examples", samples_per_page=6)
                with gr.Column(scale=2):
                    with gr.Row():
                        temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature (0 = greedy)",
                                                elem_id="temperature")
                        max_new = gr.Slider(8, 512, value=96, step=8, label="Max new tokens", elem_id="max-new")
                    with gr.Row():
                        policy = gr.Dropdown(POLICIES, value="adaptive", label="Draft policy", elem_id="policy",
                                             info="adaptive: efficiency model · adaptive-tree: token trees · "
                                                  "static-4 · heuristic: HF's +2/−1")
                        slo = gr.Number(value=50, label="SLO: TPOT (ms)", minimum=0, elem_id="slo",
                                        info="time per output token; 0 = none")
                    with_hf = gr.Checkbox(value=True, label="also run HF assisted generation (its defaults)")
                    run_btn = gr.Button("Generate", variant="primary", elem_id="run-btn")
            error_box = gr.Markdown(visible=False, elem_id="error-box")
            summary = gr.Markdown(elem_id="summary")
            outs, stats = {}, {}
            with gr.Row(equal_height=False):
                for m in METHODS:
                    with gr.Column(min_width=280):
                        gr.HTML(f"<div class='method-title'>{TITLES[m]}</div>")
                        outs[m] = gr.HTML(tokens_html(None, None), elem_id=f"out-{m}")
                        stats[m] = gr.Markdown(elem_id=f"stats-{m}")
            with gr.Row():
                plot_progress = gr.Plot(show_label=False, elem_id="plot-progress", format="png")
                plot_steps = gr.Plot(show_label=False, elem_id="plot-steps", format="png")

        with gr.Tab("Serving"):
            _, _, why = serving_api()
            gr.Markdown("Simulated users with different SLOs send requests at a chosen rate (Poisson arrivals) "
                        "to `adaspec_hf.Engine` (continuous batching, per-request SLOs). The same seeded workload "
                        f"runs with the chosen policy and with no speculation (`{BASELINE}`): **SLO attainment** "
                        "(share of requests meeting their TTFT and TPOT objectives) and **goodput** (tokens/s of "
                        "requests that met them).")
            serving_note = gr.Markdown(("⚠️ " + why) if why else "", elem_id="serving-note")
            users = gr.Dataframe(value=DEFAULT_USERS, headers=USER_HEADERS,
                                 datatype=["str", "number", "number", "number"], label="Simulated users",
                                 interactive=True, elem_id="users", type="array")
            with gr.Row():
                rate = gr.Slider(0.1, 20, value=2.0, step=0.1, label="Request rate (requests/s)", elem_id="rate")
                n_req = gr.Slider(2, 64, value=12, step=1, label="Requests", elem_id="n-req")
                s_max_new = gr.Slider(8, 256, value=48, step=8, label="Max new tokens per request", elem_id="s-max-new")
                s_policy = gr.Dropdown(SERVING_POLICIES, value="slo", label="Draft policy", elem_id="s-policy",
                                       info="slo: AdaServe-style SLO-aware selection")
            serve_btn = gr.Button("Run workload", variant="primary", elem_id="serve-btn", interactive=why is None)
            serve_err = gr.Markdown(visible=False, elem_id="serving-error")
            serve_summary = gr.Markdown(elem_id="serve-summary")
            serve_table = gr.Dataframe(headers=SERVE_HEADERS, label="Results", elem_id="serve-table",
                                       interactive=False)
            serve_plot = gr.Plot(show_label=False, elem_id="plot-serving", format="png")
        del serving_note

        # ---- events
        def on_status():
            L = store.loaded
            samples = [[p] for p in (L.prompts if L else FALLBACK_PROMPTS)]
            return store.status, gr.Timer(active=store.loading), gr.Dataset(samples=samples)

        timer.tick(on_status, None, [status, timer, examples_ds], show_progress="hidden")
        demo.load(on_status, None, [status, timer, examples_ds], show_progress="hidden")
        examples_ds.click(lambda x: x[0] if x else "", examples_ds, prompt, show_progress="hidden")

        def on_load(t, d):
            t, d = (t or "").strip(), (d or "").strip()
            new = ModelSpec(target=t or None, draft=d or None, pair_dir=None if (t or d) else spec.pair_dir,
                            quick=spec.quick, tiny=spec.tiny and not (t or d), dtype=spec.dtype, device=spec.device)
            try:
                store.start(new)
            except RuntimeError as e:
                gr.Warning(str(e))
                return store.status, gr.Timer(active=store.loading)
            store.wait(30)  # short loads finish here; long ones go on (the timer shows progress)
            if store.error and not store.loading:
                gr.Warning(store.error)
            return store.status, gr.Timer(active=store.loading)

        load_btn.click(on_load, [target_box, draft_box], [status, timer], concurrency_limit=1)

        gen_outputs = [error_box, summary, *outs.values(), *stats.values(), plot_progress, plot_steps]

        def on_run(p, temp, mx, pol, slo_ms, hf_on):
            slo_v = float(slo_ms) if slo_ms else None
            plotted = -1  # figures are redrawn only when a method finishes (drawing costs CPU time)
            try:
                for st in compare(store, p, temp, mx, pol, slo_v, with_hf=bool(hf_on)):
                    runs, tok = st["runs"], st["tokenizer"]
                    if st["error"] and st["final"]:
                        gr.Warning(st["error"].split("  \n")[0])
                    err = (gr.Markdown(value="**Error:** " + st["error"], visible=True) if st["error"]
                           else gr.Markdown(visible=False))
                    running = not st["final"]
                    vals = [err, st["status"]]
                    vals += [tokens_html(runs[m], tok) for m in METHODS]
                    vals += [stats_md(runs[m], runs["plain"], slo_v, running and (m != "hf" or hf_on)) for m in METHODS]
                    n_done = sum(r is not None and r.done for r in runs.values())
                    if n_done > 0 and (n_done != plotted or st["final"]):
                        plotted = n_done
                        vals += [fig_progress({m: r for m, r in runs.items() if r is not None}, slo_v),
                                 fig_steps(runs["ours"], runs["hf"], pol)]
                    else:
                        vals += [gr.skip(), gr.skip()]
                    yield vals
            except Exception as e:  # noqa: BLE001 - shown in the page, never a crash
                logger.warning("generation failed:\n%s", traceback.format_exc())
                msg = f"{type(e).__name__}: {e}"
                gr.Warning(msg)
                yield [gr.Markdown("**Error:** " + html.escape(msg), visible=True)] + [gr.skip()] * (len(gen_outputs) - 1)

        gen_inputs = [prompt, temperature, max_new, policy, slo, with_hf]
        run_btn.click(on_run, gen_inputs, gen_outputs, concurrency_limit=1, concurrency_id="models",
                      show_progress="minimal")
        prompt.submit(on_run, gen_inputs, gen_outputs, concurrency_limit=1, concurrency_id="models",
                      show_progress="minimal")

        def on_serve(u, r, n, mx, pol):
            try:
                if store.loading or store.loaded is None:
                    raise RuntimeError(store.error or "models are not loaded yet: " + store.status)
                rows = u.values.tolist() if hasattr(u, "values") else u
                res = simulate(store, rows, float(r), int(n), int(mx), pol)
                return gr.Markdown(visible=False), serving_md(res), serving_table(res), fig_serving(res)
            except Exception as e:  # noqa: BLE001 - shown in the page
                logger.warning("serving run failed:\n%s", traceback.format_exc())
                msg = f"{type(e).__name__}: {e}"
                gr.Warning(msg)
                return gr.Markdown("**Error:** " + html.escape(msg), visible=True), "", gr.skip(), gr.skip()

        serve_btn.click(on_serve, [users, rate, n_req, s_max_new, s_policy],
                        [serve_err, serve_summary, serve_table, serve_plot], concurrency_limit=1,
                        concurrency_id="models")
    return demo


def spec_prompt(spec: ModelSpec) -> str:
    return "def add(a, b):\n    return" if spec.tiny else FALLBACK_PROMPTS[0]


# ------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> tuple[ModelSpec, argparse.Namespace]:
    env = os.environ
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default=env.get("ADASPEC_TARGET"), help="HF id/path of the target (env ADASPEC_TARGET)")
    p.add_argument("--draft", default=env.get("ADASPEC_DRAFT"), help="HF id/path of the draft (env ADASPEC_DRAFT)")
    p.add_argument("--pair-dir", default=env.get("ADASPEC_PAIR_DIR"), help="a pair dir with target/ and draft/ (env ADASPEC_PAIR_DIR)")
    p.add_argument("--quick", action="store_true", default=env.get("ADASPEC_QUICK", "") not in ("", "0"),
                   help="the built-in quick pair (env ADASPEC_QUICK=1)")
    p.add_argument("--tiny", action="store_true", default=env.get("ADASPEC_TINY", "") not in ("", "0"),
                   help="tiny random models (env ADASPEC_TINY=1)")
    p.add_argument("--dtype", default=env.get("ADASPEC_DTYPE", "float32"), choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=env.get("ADASPEC_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
    p.add_argument("--host", default=env.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env.get("GRADIO_SERVER_PORT", "7860")))
    p.add_argument("--share", action="store_true")
    a = p.parse_args(argv)
    spec = ModelSpec(target=a.target or None, draft=a.draft or None, pair_dir=a.pair_dir or None,
                     quick=a.quick, tiny=a.tiny, dtype=a.dtype, device=a.device)
    return spec, a


def launch(spec: ModelSpec, *, host="127.0.0.1", port=None, share=False, prevent_thread_lock=False,
           store: Store | None = None):
    """Start loading ``spec`` in the background (unless ``store`` already holds models) and serve the
    page; returns (demo, store)."""
    if store is None:
        store = Store()
        store.start(spec)
    demo = build_app(store, spec)
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=prevent_thread_lock,
                theme=gr.themes.Soft(), css=CSS, show_error=True)
    return demo, store


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    spec, a = parse_args(argv)
    if os.environ.get("SPACE_ID"):  # on a Hugging Face Space: listen on all interfaces
        a.host = "0.0.0.0"
    launch(spec, host=a.host, port=a.port, share=a.share)


if __name__ == "__main__":
    main()
