"""One request's own bookkeeping: its tokens, how many it keeps (the shared
:class:`~adaspec_hf.core.CommitRule`), the text streamed so far, and the :class:`RequestResult` it
resolves to. Nothing here knows about the batch around the request."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from adaspec_hf.core import CommitRule
from adaspec_hf.core.processing import Processing
from adaspec_hf.serving.handle import Chunk, RequestHandle, RequestResult
from adaspec_hf.slo import SLO

# finish reasons under which a request ran to its own end (an SLO can only be met by those)
COMPLETED = ("eos", "length", "stop")


@dataclass
class Request:
    id: int
    handle: RequestHandle
    prompt: list[int]
    buf: torch.Tensor  # prompt, then generated tokens (capacity prompt + max_new + 1)
    max_new: int
    do_sample: bool
    processing: Processing | None
    rule: CommitRule  # EOS / min_new_tokens / stop strings: the meaning HF generate gives them
    slo: SLO | None
    arrival: float
    reserve: int  # cache slots the request can need: prompt + max_new_tokens
    n_gen: int = 0
    t_first: float | None = None
    t_last: float | None = None
    drafted: int = 0
    accepted: int = 0
    steps: int = 0
    text: str = ""  # text streamed so far (never retracted)
    failed: BaseException | None = None
    admitted: bool = False
    key: int = 0  # sampling key: its tokens are position-keyed draws (same text whatever the batch)
    merge_failures: int = 0

    @property
    def n(self) -> int:
        return len(self.prompt) + self.n_gen

    @property
    def deadline(self) -> float:
        return self.arrival + (self.slo.ttft if self.slo else math.inf)

    @property
    def generated(self) -> list[int]:
        return self.buf[len(self.prompt): self.n].tolist()

    def cut(self, toks: list[int]) -> tuple[list[int], str | None]:
        """The leading tokens of ``toks`` this request keeps, and why it finishes (None: it goes on).
        Stop strings are HF's stopping criteria over the prompt and tokens so far, token by token, so
        a request stops where ``generate(stop_strings=...)`` would."""
        if not toks:
            return toks, None
        emitted = torch.tensor([toks], dtype=torch.long)
        n = self.n  # read only by stopping criteria (so a request without stop strings copies nothing)
        cut = self.rule.cut(emitted, torch.tensor([len(toks)]), torch.tensor([self.n_gen]), self.max_new,
                            lambda i: self.buf[:n].cpu())
        return toks[: int(cut.keep[0])], cut.reasons()[0]


def stable_text(text: str) -> str:
    """The part of a partial decode that later tokens cannot change under HF's
    ``clean_up_tokenization_spaces`` (which deletes the space before punctuation and around a
    quote, e.g. "a ' b" -> "a'b"): everything before the last whitespace, backed off past a
    trailing quote or space."""
    cut = max(text.rfind(" "), text.rfind("\n"), text.rfind("\t"))
    stable = text[:cut] if cut >= 0 else ""
    while stable:
        stable = stable.rstrip()
        if not stable.endswith("'"):
            break
        stable = stable[: max(stable.rfind(" "), 0)]
    return stable


def text_delta(r: Request, tokenizer, cleans_up: bool, final: bool) -> str:
    """New streamed text: only ever an extension of what was streamed, so the chunks add up to
    the result's text (a decode that rewrites earlier text is held back until it settles)."""
    text = tokenizer.decode(r.generated, skip_special_tokens=True)
    if not final:
        if cleans_up:
            text = stable_text(text)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character
            return ""
    if len(text) <= len(r.text) or not text.startswith(r.text):
        return ""
    delta, r.text = text[len(r.text):], text
    return delta


def commit(r: Request, toks: list[int], now: float, tokenizer, cleans_up: bool) -> tuple[int, str | None]:
    """Keep what the commit rule allows of ``toks`` and stream it; (tokens kept, finish reason)."""
    toks, reason = r.cut(toks)
    if toks:
        r.buf[r.n: r.n + len(toks)] = torch.tensor(toks, dtype=torch.long)
        r.n_gen += len(toks)
        if r.t_first is None:
            r.t_first = now
        r.t_last = now
        delta = text_delta(r, tokenizer, cleans_up, final=reason is not None) if tokenizer is not None else ""
        r.handle._push(Chunk(toks, delta, now))
    return len(toks), reason


def result(r: Request, reason: str, tokenizer) -> RequestResult:
    """What ``r``'s handle resolves to; streams any text held back until the end."""
    if reason == "error" and r.failed is None:
        r.failed = RuntimeError("request failed")
    ttft = r.t_first - r.arrival if r.t_first is not None else None
    tpot = (r.t_last - r.t_first) / (r.n_gen - 1) if r.n_gen > 1 else None
    latency = r.t_last - r.arrival if r.t_last is not None else None
    text = None
    if tokenizer is not None:
        text = tokenizer.decode(r.generated, skip_special_tokens=True)
        if text.startswith(r.text) and len(text) > len(r.text) and r.n_gen:
            r.handle._push(Chunk([], text[len(r.text):], time.perf_counter()))  # held-back text
            r.text = text
    met = None
    if r.slo is not None:
        met = reason in COMPLETED and r.slo.met(ttft, tpot)
    return RequestResult(
        request_id=r.id, prompt_ids=list(r.prompt), token_ids=r.generated, text=text,
        finish_reason=reason, arrival=r.arrival, ttft=ttft, tpot=tpot, latency=latency,
        drafted_tokens=r.drafted, accepted_tokens=r.accepted, steps=r.steps, slo=r.slo, slo_met=met,
        error=r.failed if reason == "error" else None, first_token_at=r.t_first, last_token_at=r.t_last,
    )


def resolve(r: Request, reason: str, tokenizer) -> None:
    """Resolve ``r``'s handle; never raises (a failure here must not leave a handle hanging)."""
    try:
        res = result(r, reason, tokenizer)
    except Exception as e:  # noqa: BLE001 - e.g. the tokenizer's decode raised
        r.failed = r.failed or e
        res = RequestResult(request_id=r.id, prompt_ids=list(r.prompt), token_ids=r.generated, text=None,
                            finish_reason="error", arrival=r.arrival, ttft=None, tpot=None, latency=None,
                            slo=r.slo, error=r.failed)
    r.handle._finish(res)
