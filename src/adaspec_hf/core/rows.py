"""The running rows of a speculative step and what the step asks of their owner.

:class:`RowBatch` is the model side (both caches plus each row's committed length);
:class:`RowSource` is the token side (committed text, processors, sampling mode, commit), so one
step serves ``generate`` (a fixed batch) and the serving engine (requests joining and leaving).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from transformers import PreTrainedModel

from adaspec_hf.core.context import StepContext
from adaspec_hf.core.kv import KVState
from adaspec_hf.core.processing import ProcessFn


class RowBatch:
    """The running rows: target and draft caches plus, per row, its key, committed length and how
    many committed tokens the draft cache has seen. ``length`` counts real tokens (prompt and
    generated) including the *pending* one: the last emitted token, not yet fed to the target.
    ``draft=None``: no draft model (prompt lookup alone); ``dkv`` is then None."""

    def __init__(self, target: PreTrainedModel, draft: PreTrainedModel | None):
        self.tkv = KVState(target)
        self.dkv = KVState(draft) if draft is not None else None
        dev = self.tkv.device
        # where the draft computes (accelerate disk offload: not .device)
        self.draft_device = self.dkv.device if self.dkv is not None else dev
        self.rid = torch.zeros(0, dtype=torch.long, device=dev)
        self.length = torch.zeros(0, dtype=torch.long, device=dev)
        self.draft_seen = torch.zeros(0, dtype=torch.long, device=dev)

    @property
    def rows(self) -> int:
        return int(self.rid.shape[0])

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rid: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Prefill both caches with left-padded prompts; return the target's last logits (B, V) float32.
        The caller commits the first token (``length`` already counts it as pending)."""
        logits = self.tkv.prefill(input_ids, attention_mask, token_type_ids).float()
        if self.dkv is not None:
            dtt = None if token_type_ids is None else token_type_ids.to(self.draft_device)
            self.dkv.prefill(input_ids.to(self.draft_device), attention_mask.to(self.draft_device), dtt)
        real = attention_mask.sum(1).to(self.rid.device)
        self.rid = rid.to(self.rid.device)
        self.draft_seen = real.clone()
        self.length = real + 1
        return logits

    def keep(self, idx: torch.Tensor) -> None:
        """Keep only rows ``idx`` (others leave the batch and stop costing compute)."""
        self.rid, self.length, self.draft_seen = self.rid[idx], self.length[idx], self.draft_seen[idx]
        self.tkv.select_rows(idx)
        if self.dkv is not None:
            self.dkv.select_rows(idx.to(self.draft_device))

    def extend(self, other: "RowBatch") -> None:
        """Append another batch's rows (continuous batching; caches are left-padded to align)."""
        self.tkv.append_rows(other.tkv)
        if self.dkv is not None:
            self.dkv.append_rows(other.dkv)
        self.rid = torch.cat([self.rid, other.rid])
        self.length = torch.cat([self.length, other.length])
        self.draft_seen = torch.cat([self.draft_seen, other.draft_seen])

    def maybe_compact(self, threshold: float) -> None:
        self.tkv.maybe_compact(threshold)
        if self.dkv is not None:
            self.dkv.maybe_compact(threshold)

    def force_compact(self) -> None:
        """Compact both caches now (holes and left padding go), e.g. to stay within a slot bound."""
        self.tkv.compact()
        if self.dkv is not None:
            self.dkv.compact()

    @property
    def cached_slots(self) -> int:
        """Slots held by the target cache (rows x length, holes and padding included)."""
        return self.tkv.rows * self.tkv.length

    @contextlib.contextmanager
    def atomic(self) -> Iterator[None]:
        """All or nothing: if the body raises (e.g. out of memory half-way through merging rows or
        compacting), the batch and both caches are put back as they were, and the error propagates.

        Cache surgery and forwards replace tensors rather than writing into them, so the checkpoint
        is references only; the price is that the old tensors live until the body has finished."""
        saved = self._checkpoint()
        try:
            yield
        except BaseException:
            self._restore(saved)
            raise

    def _checkpoint(self) -> tuple:
        own = {k: v for k, v in self.__dict__.items() if k not in ("tkv", "dkv")}
        return own, self.tkv.checkpoint(), None if self.dkv is None else self.dkv.checkpoint()

    def _restore(self, saved: tuple) -> None:
        own, t, d = saved
        self.__dict__.update(own)
        self.tkv.restore(t)
        if self.dkv is not None:
            self.dkv.restore(d)


# (rows (M,), paths (M, D), depths (M,) or None) -> [(row key, full token prefix)] for processors
PrefixFn = Callable[..., list]


class RowSource:
    """What :class:`~adaspec_hf.core.step.SpecStep` needs from the owner of the rows.
    ``rid`` holds the batch's row keys."""

    def remaining(self, rid: torch.Tensor) -> torch.Tensor:
        """(B,) tokens each row may still emit."""
        raise NotImplementedError

    def committed(self, rid: torch.Tensor, start: torch.Tensor, width: int) -> torch.Tensor:
        """(B, width) committed tokens from position ``start[b]`` (0 = first prompt token) on;
        entries past a row's committed text may hold any valid token id (they are masked)."""
        raise NotImplementedError

    def token_at(self, rid: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return self.committed(rid, position, 1)[:, 0]

    def prefix_fn(self, rid: torch.Tensor) -> PrefixFn:
        raise NotImplementedError

    def process_fn(self, rid: torch.Tensor) -> ProcessFn | None:
        """A ProcessFn ``(scores (M, V), prefixes) -> scores`` over M = B x k lines laid out row-major,
        or None when no row has logits processors."""
        return None

    def sampling(self, rid: torch.Tensor) -> bool | torch.Tensor:
        """True/False for the whole batch, or a (B,) bool tensor (mixed batches)."""
        return False

    def sample_keys(self, rid: torch.Tensor) -> torch.Tensor | None:
        """(B,) int64 sampling keys of the rows: sampled tokens are then the winners of position-keyed
        races (reproducible whatever is drafted, see :mod:`~adaspec_hf.core.race`).
        None: draw from the step's generator in sequence (speculative sampling's own rule)."""
        return None

    def fail_rows(self, rid: torch.Tensor, bad: torch.Tensor, error: Exception) -> None:
        """Rows ``bad`` (B,) cannot continue (no valid token to sample). Default: raise ``error``;
        the serving engine fails those requests alone."""
        raise error

    def context(self, **kw) -> StepContext:
        return StepContext(**kw, ends_together=True)  # a generate call; the engine's rows override this

    def commit(self, rid: torch.Tensor, emitted: torch.Tensor, n_emit: torch.Tensor, scores: torch.Tensor,
               raw: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """Store the emitted tokens (B, m) (first ``n_emit[b]`` valid); return finished rows (B,).
        How many a row keeps is :class:`~adaspec_hf.core.buffer.CommitRule`'s to decide."""
        raise NotImplementedError
