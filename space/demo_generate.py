"""The Generate tab: one prompt through plain, HF assisted and adaptive generation, streamed live.

Each column runs the benchmark's own method (:func:`adaspec_hf.bench.methods.resolve_method`), so the
page and ``adaspec-hf bench`` time the very same calls; an HF streamer hands over each step's tokens.
"""
from __future__ import annotations

import html
import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field

import torch
from transformers.generation.streamers import BaseStreamer

from adaspec_hf.bench.methods import resolve_method
from demo_models import Loaded, Store

logger = logging.getLogger("adaspec_hf.space")

POLICIES = ["adaptive", "adaptive-chain", "adaptive-tree", "static-4", "heuristic"]
METHODS = ("plain", "hf", "ours")
TITLES = {"plain": "Plain generation", "hf": "HF assisted generation", "ours": "adaspec-hf (adaptive=True)"}
DRAFT, TARGET = "accepted from draft", "produced by target"


def _method_name(method: str, policy: str) -> str:
    """The benchmark method (:func:`adaspec_hf.bench.methods.resolve_method`) behind a column."""
    return {"plain": "vanilla", "hf": "hf-assisted"}.get(method, policy)

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


def _start(L: Loaded, method: str, prompt_ids: list[int], gen_kw: dict, policy: str) -> tuple[Run, ChunkStreamer, threading.Thread]:
    run = Run(method, prompt_ids)
    streamer = ChunkStreamer()
    ids = torch.tensor([prompt_ids], device=L.target.device)
    mask = torch.ones_like(ids)
    kw = dict(gen_kw, streamer=streamer, pad_token_id=L.tokenizer.pad_token_id)
    bench_method = resolve_method(_method_name(method, policy))  # the benchmark's own method: same calls

    def work():
        try:
            if gen_kw.get("do_sample"):
                torch.manual_seed(0)
            run.t0 = time.perf_counter()
            bench_method.fn(L.target, L.draft, ids, mask, kw)
            if method == "ours":
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
