"""Where emitted tokens go, and the one rule deciding how many of them a row keeps.

A verify pass emits up to ``depth + 1`` tokens per row, but a row may have to stop part-way: at an
EOS token, at its ``max_new_tokens``, or where a stopping criterion (e.g. a stop string) fires.
:class:`CommitRule` decides that for ``generate`` and the serving engine alike, so "stop string"
or "EOS" means the same thing in both: the HF ``generate`` meaning, checked token by token.
:class:`TokenBuffer` stores the kept tokens, allocated as they arrive.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, StopStringCriteria

INITIAL_CAPACITY = 256  # generated tokens per row allocated up front; the buffer doubles on demand

# why a row finished (Cut.reason); at one cut point a stop criterion outranks EOS, EOS the length
NOT_DONE, LENGTH, EOS, STOP = 0, 1, 2, 3
REASON_NAMES = {LENGTH: "length", EOS: "eos", STOP: "stop"}

# the committed tokens of batch row i (prompt, then generated: what stopping criteria see)
HistoryFn = Callable[[int], torch.Tensor]


def stop_string_criteria(tokenizer, stop_strings: str | Sequence[str]) -> StoppingCriteriaList:
    """HF's stop-string criterion as a list :class:`CommitRule` takes (a string must end exactly
    at an emitted token's text, as in ``generate(stop_strings=...)``)."""
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    stop_strings = list(stop_strings)
    if not stop_strings or not all(isinstance(s, str) and s for s in stop_strings):
        raise ValueError(f"stop strings must be non-empty strings, got {stop_strings!r}")
    if tokenizer is None:
        raise ValueError("stop strings need a tokenizer")
    return StoppingCriteriaList([StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings)])


@dataclass
class Cut:
    """What :meth:`CommitRule.cut` decided per row."""

    keep: torch.Tensor  # (B,) long: leading emitted tokens to commit
    done: torch.Tensor  # (B,) bool: the row finished with its last kept token
    reason: torch.Tensor  # (B,) int8: NOT_DONE, LENGTH, EOS or STOP

    def reasons(self) -> list[str | None]:
        """Per row: "length", "eos", "stop", or None while the row goes on."""
        return [REASON_NAMES.get(r) for r in self.reason.tolist()]


class CommitRule:
    """EOS, length and stopping criteria of a set of rows (one ``generate`` call, or one request).

    * ``eos_token_id``: emitting one of these ends the row (the EOS token is kept), unless fewer
      than ``min_new_tokens`` tokens came before it. HF bans EOS there anyway
      (``MinNewTokensLengthLogitsProcessor``), so this never stops a row earlier than HF would.
    * ``max_new_tokens`` (given per call, as rows may differ): tokens beyond it are dropped.
    * ``stopping``: HF stopping criteria called on each row's committed tokens plus each emitted
      token in turn, as ``generate`` calls them after every token; the first that fires ends the
      row there (the tokens completing a stop string are kept). Not gated by ``min_new_tokens``,
      as in HF. Token ids only, so a stop string has HF's meaning (:func:`stop_string_criteria`).
    """

    def __init__(self, eos_token_id: int | Iterable[int] | None = None, *, min_new_tokens: int = 0,
                 stopping: StoppingCriteriaList | Sequence[StoppingCriteria] | None = None,
                 device: torch.device | str | None = None):
        if eos_token_id is None:
            eos = []
        elif isinstance(eos_token_id, numbers.Integral):
            eos = [int(eos_token_id)]
        else:
            eos = [int(e) for e in eos_token_id]
        if any(e < 0 for e in eos):
            raise ValueError(f"eos_token_id must be non-negative token ids, got {eos_token_id!r}")
        if isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, numbers.Integral) or min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be an integer >= 0, got {min_new_tokens!r}")
        self.eos = torch.tensor(eos, dtype=torch.long, device=device)
        self.min_new_tokens = int(min_new_tokens)
        if stopping is None:
            stopping = StoppingCriteriaList()
        elif not isinstance(stopping, StoppingCriteriaList):
            stopping = StoppingCriteriaList(list(stopping))
        self.stopping = stopping

    def cut(self, emitted: torch.Tensor, n_emit: torch.Tensor, n_gen: torch.Tensor,
            max_new: torch.Tensor | int, history: HistoryFn | None = None) -> Cut:
        """``emitted`` (B, m) tokens of which the first ``n_emit[b]`` are real, ``n_gen`` (B,) tokens
        each row generated before them, ``max_new`` (B,) or one bound for all rows. ``history(i)``
        gives row i's committed tokens (needed only with stopping criteria)."""
        dev = emitted.device
        bsz, m = emitted.shape
        n_emit, n_gen = n_emit.to(dev), n_gen.to(dev)
        ar = torch.arange(m, device=dev)
        remaining = (torch.as_tensor(max_new, device=dev) - n_gen).clamp(min=0)
        keep = torch.minimum(n_emit, remaining)
        reason = torch.where(n_emit >= remaining, LENGTH, NOT_DONE).to(torch.int8)
        if self.eos.numel():
            eos = self.eos.to(dev)
            is_eos = torch.isin(emitted, eos) & (ar[None, :] < n_emit[:, None])
            if self.min_new_tokens:
                # token j is the row's (n_gen + j)-th new token, counting from 0
                is_eos &= (n_gen[:, None] + ar[None, :]) >= self.min_new_tokens
            first = is_eos.to(torch.int8).argmax(1) + 1
            hit = is_eos.any(1) & (first <= keep)
            keep = torch.where(hit, first, keep)
            reason = torch.where(hit, EOS, reason).to(torch.int8)
        if len(self.stopping):
            if history is None:
                raise ValueError("stopping criteria need the rows' committed tokens (history=)")
            keep, reason = keep.clone(), reason.clone()
            for i in range(bsz):
                k = self._first_stop(history(i).to(dev), emitted[i], int(keep[i]))
                if k is not None:
                    keep[i], reason[i] = k, STOP
        return Cut(keep=keep, done=reason != NOT_DONE, reason=reason)

    def _first_stop(self, base: torch.Tensor, emitted: torch.Tensor, upto: int) -> int | None:
        """Tokens to keep when a criterion fires within the first ``upto`` emitted tokens, else None."""
        for k in range(upto):
            seq = torch.cat([base, emitted[: k + 1]])[None]
            if bool(torch.as_tensor(self.stopping(seq, None)).reshape(-1)[0]):
                return k + 1
        return None


class TokenBuffer:
    """Prompts (left-padded as given) and then each row's generated tokens: a (B, P + T) tensor
    grown by doubling as tokens arrive, because ``max_new_tokens`` may be far beyond where the
    rows stop."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int,
                 pad_token_id: int, initial_capacity: int = INITIAL_CAPACITY):
        if input_ids.dim() != 2:
            raise ValueError("input_ids must be a (batch, length) tensor")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
        b, p = input_ids.shape
        dev = input_ids.device
        self.p, self.max_new, self.pad_token_id = p, int(max_new_tokens), int(pad_token_id)
        self.out = torch.full((b, p + min(self.max_new, initial_capacity) + 1), self.pad_token_id,
                              dtype=torch.long, device=dev)
        self.out[:, :p] = input_ids
        self.n_gen = torch.zeros(b, dtype=torch.long, device=dev)
        real = attention_mask.sum(1).to(dev) if attention_mask is not None else torch.full((b,), p, device=dev)
        self.pad = p - real  # left padding per row

    @property
    def rows(self) -> int:
        return int(self.out.shape[0])

    def ensure_capacity(self, columns: int) -> None:
        """Grow (doubling, up to prompt + max_new + 1 columns) to hold ``columns``."""
        have = self.out.shape[1]
        if columns <= have:
            return
        width = min(max(columns, 2 * have), self.p + self.max_new + 1)
        grown = torch.full((self.out.shape[0], width), self.pad_token_id, dtype=torch.long, device=self.out.device)
        grown[:, :have] = self.out
        self.out = grown

    def history(self, rid: torch.Tensor) -> HistoryFn:
        """Row ``i`` of ``rid``'s tokens so far, left padding included (what HF's criteria see)."""
        rows = rid.tolist()
        return lambda i: self.out[rows[i], : self.p + int(self.n_gen[rows[i]])]

    def committed(self, rid: torch.Tensor, start: torch.Tensor, width: int) -> torch.Tensor:
        """(B, width) tokens from position ``start[b]`` of each row's real text (0 = first prompt
        token, padding skipped); columns past the buffer repeat its last column."""
        ar = torch.arange(width, device=rid.device)
        cols = ((start + self.pad[rid])[:, None] + ar[None, :]).clamp(max=self.out.shape[1] - 1)
        return self.out[rid[:, None], cols]

    def append(self, rid: torch.Tensor, emitted: torch.Tensor, keep: torch.Tensor) -> None:
        """Store the first ``keep[b]`` tokens of ``emitted[b]`` after row ``rid[b]``'s tokens."""
        bsz, m = emitted.shape
        ar = torch.arange(m, device=emitted.device)
        mask = ar[None, :] < keep[:, None]
        if bool(mask.any()):
            cols = (self.p + self.n_gen[rid])[:, None] + ar[None, :]
            self.ensure_capacity(int(cols[mask].max()) + 2)
            self.out[rid[:, None].expand(bsz, m)[mask], cols[mask]] = emitted[mask]
        self.n_gen[rid] += keep

    def commit(self, rule: CommitRule, rid: torch.Tensor, emitted: torch.Tensor, n_emit: torch.Tensor) -> Cut:
        """Apply ``rule`` to the emitted tokens of rows ``rid`` and store what it keeps."""
        cut = rule.cut(emitted, n_emit, self.n_gen[rid], self.max_new, self.history(rid))
        self.append(rid, emitted, cut.keep)
        return cut

    def sequences(self) -> torch.Tensor:
        """(B, P + longest generation): prompts then generated tokens, pad-filled."""
        return self.out[:, : self.p + int(self.n_gen.max())]

    def generated(self, row: int) -> list[int]:
        return self.out[row, self.p: self.p + int(self.n_gen[row])].tolist()
