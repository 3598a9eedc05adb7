"""What a caller holds for a submitted request: a :class:`RequestHandle` that streams
:class:`Chunk` s (``for`` / ``async for``), can be cancelled, and resolves to a :class:`RequestResult`."""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Iterator

from adaspec_hf.slo import SLO

if TYPE_CHECKING:  # pragma: no cover
    from adaspec_hf.serving.engine import Engine


class EngineClosed(RuntimeError):
    """The engine no longer accepts requests (closed, or its step loop died)."""


# --------------------------------------------------------------------------------------- results
@dataclass
class Chunk:
    """Tokens one step committed for a request, and the text they add (``""`` without tokenizer)."""

    token_ids: list[int]
    text: str
    time: float  # time.perf_counter() at commit


@dataclass
class RequestResult:
    request_id: int
    prompt_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str  # "eos" | "length" | "stop" | "cancelled" | "error"
    arrival: float  # time.perf_counter() at submit
    ttft: float | None  # seconds from submit to the first token
    tpot: float | None  # mean seconds per output token after the first
    latency: float | None  # seconds from submit to the last token
    drafted_tokens: int = 0  # draft nodes verified for this request
    accepted_tokens: int = 0  # of which accepted
    steps: int = 0  # verify passes the request took part in
    slo: SLO | None = None
    slo_met: bool | None = None  # None without an SLO
    error: BaseException | None = None
    first_token_at: float | None = None  # time.perf_counter() of the first / last token
    last_token_at: float | None = None

    @property
    def accepted_per_step(self) -> float:
        return self.accepted_tokens / max(self.steps, 1)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / max(self.drafted_tokens, 1)

    def to_dict(self) -> dict:
        return {
            "request_id": self.request_id, "prompt_tokens": len(self.prompt_ids),
            "new_tokens": len(self.token_ids), "finish_reason": self.finish_reason, "ttft": self.ttft,
            "tpot": self.tpot, "latency": self.latency, "drafted_tokens": self.drafted_tokens,
            "accepted_tokens": self.accepted_tokens, "steps": self.steps,
            "tpot_slo_ms": self.slo.tpot_ms if self.slo else None,
            "ttft_slo_ms": self.slo.ttft_ms if self.slo else None, "slo_met": self.slo_met,
            "error": repr(self.error) if self.error else None,
        }


class RequestHandle:
    """A submitted request: stream its chunks (``for`` / ``async for``), cancel it, get its result."""

    def __init__(self, engine: "Engine", request_id: int):
        self._engine = engine
        self.request_id = request_id
        self._cond = threading.Condition()
        self._chunks: list[Chunk] = []
        self._result: RequestResult | None = None
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._cancel = False

    # -- engine side
    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        self._cond.notify_all()
        for loop, ev in waiters:
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:  # loop closed
                pass

    def _push(self, chunk: Chunk) -> None:
        with self._cond:
            self._chunks.append(chunk)
            self._notify()

    def _finish(self, result: RequestResult) -> None:
        with self._cond:
            if self._result is None:
                self._result = result
            self._notify()

    # -- user side
    def done(self) -> bool:
        return self._result is not None

    def cancel(self) -> bool:
        """Ask the engine to stop this request (at the next step boundary). False if already done."""
        with self._cond:
            if self._result is not None:
                return False
            self._cancel = True
        self._engine._poke()
        return True

    @property
    def cancelled(self) -> bool:
        return self._result is not None and self._result.finish_reason == "cancelled"

    def _wait(self, timeout: float | None) -> RequestResult:
        with self._cond:
            if not self._cond.wait_for(lambda: self._result is not None, timeout):
                raise TimeoutError(f"request {self.request_id} not done after {timeout} s")
            return self._result

    def result(self, timeout: float | None = None) -> RequestResult:
        """Block until done; raise the request's error if it failed (cancelled requests return)."""
        res = self._wait(timeout)
        if res.error is not None:
            raise res.error
        return res

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self._wait(timeout).error

    async def aresult(self) -> RequestResult:
        async for _ in self:
            pass
        return self.result(timeout=0)

    def __iter__(self) -> Iterator[Chunk]:
        i = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: i < len(self._chunks) or self._result is not None)
                if i < len(self._chunks):
                    chunk = self._chunks[i]
                else:
                    err = self._result.error
                    break
            i += 1
            yield chunk
        if err is not None:
            raise err

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Chunk]:
        i = 0
        while True:
            ev = None
            with self._cond:
                if i < len(self._chunks):
                    chunk = self._chunks[i]
                elif self._result is not None:
                    break
                else:
                    ev = asyncio.Event()
                    self._waiters.append((asyncio.get_running_loop(), ev))
            if ev is not None:
                await ev.wait()
                continue
            i += 1
            yield chunk
        if self._result.error is not None:
            raise self._result.error

    def tokens(self) -> Iterator[int]:
        """Generated token ids, one by one, as they are committed."""
        for chunk in self:
            yield from chunk.token_ids

    def text(self) -> Iterator[str]:
        """Text deltas as they are committed (needs the engine's tokenizer)."""
        for chunk in self:
            if chunk.text:
                yield chunk.text
