"""One ``generate`` call over a fixed batch: prefill, then speculative steps until every row stops.

:class:`SpeculativeDecoder` owns the rows' tokens (a :class:`~adaspec_hf.core.buffer.TokenBuffer`
under a :class:`~adaspec_hf.core.buffer.CommitRule`) and runs :class:`~adaspec_hf.core.step.SpecStep`
on them; finished rows leave the batch and stop costing compute.
"""
from __future__ import annotations

import logging
import numbers
import time
from typing import TYPE_CHECKING

import torch
from transformers import LogitsProcessorList, PreTrainedModel, StoppingCriteriaList

from adaspec_hf.compat import execution_device
from adaspec_hf.core.buffer import CommitRule, TokenBuffer
from adaspec_hf.core.architecture import check_cache_support
from adaspec_hf.core.lookup import LookupProposer
from adaspec_hf.core.processing import Processing
from adaspec_hf.core.proposer import Proposer
from adaspec_hf.core.rows import RowBatch, RowSource
from adaspec_hf.core.stats import DecodeResult, GenerationStats
from adaspec_hf.core.step import SpecStep
from adaspec_hf.core.race import race_sample
from adaspec_hf.core.verify import NO_TOKEN, NO_TOKEN_MESSAGE, draw_keys

if TYPE_CHECKING:  # the policy interface sits above core; the step only calls it
    from adaspec_hf.policies.base import DraftPolicy

logger = logging.getLogger("adaspec_hf")


class _BufferRows(RowSource):
    """Rows of one ``generate`` call over a :class:`TokenBuffer` indexed by original row."""

    def __init__(self, dec: "SpeculativeDecoder", input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 max_new: int):
        b = input_ids.shape[0]
        dev = dec.device
        self.dec, self.max_new = dec, max_new
        self.buffer = TokenBuffer(input_ids, attention_mask, max_new, dec.pad_token_id)
        self.keys = draw_keys(b, dec.generator).to(dev) if dec.do_sample else None
        self.process = Processing(dec.processors, batch_size=b)
        self.scores_per_row: list[list[torch.Tensor]] = [[] for _ in range(b)]
        self.logits_per_row: list[list[torch.Tensor]] = [[] for _ in range(b)]

    def remaining(self, rid):
        return self.max_new - self.buffer.n_gen[rid]

    def committed(self, rid, start, width):
        return self.buffer.committed(rid, start, width)

    def prefix_fn(self, rid):
        buf = self.buffer

        def prefix_of(rows: torch.Tensor, paths: torch.Tensor, depths: torch.Tensor | None = None):
            res = []
            out, n_gen, p = buf.out, buf.n_gen, buf.p
            dl = depths.tolist() if depths is not None else [paths.shape[1]] * len(rows)
            for r, path, d in zip(rows.tolist(), paths, dl):
                path = path[:d]
                orig = int(rid[r])
                res.append((orig, torch.cat([out[orig, : p + int(n_gen[orig])], path.to(out.device)])))
            return res
        return prefix_of

    def process_fn(self, rid):
        return self.process if self.process else None

    def sampling(self, rid):
        return self.dec.do_sample

    def sample_keys(self, rid):
        return None if self.keys is None else self.keys[rid]

    def commit(self, rid, emitted, n_emit, scores, raw, source):
        rows_ar = torch.arange(rid.shape[0], device=rid.device)
        sc = scores[rows_ar[:, None], source] if self.dec.output_scores else None
        lg = raw[rows_ar[:, None], source] if self.dec.output_logits else None
        return self.commit_tokens(rid, emitted, n_emit, sc, lg)

    def commit_tokens(self, rid, emitted, n_emit, sc, lg) -> torch.Tensor:
        """Append emitted tokens per row under the decoder's :class:`CommitRule`; return finished."""
        cut = self.buffer.commit(self.dec.rule, rid, emitted, n_emit)
        keep = cut.keep
        if sc is not None or lg is not None:
            for i, orig in enumerate(rid.tolist()):
                c = int(keep[i])
                if sc is not None:
                    self.scores_per_row[orig].extend(sc[i, :c])
                if lg is not None:
                    self.logits_per_row[orig].extend(lg[i, :c])
        if self.dec.streamer is not None:
            self.dec.streamer.put(emitted[0, : int(keep[0])].cpu())
        return cut.done

class SpeculativeDecoder:
    """Batched lossless speculative decoding for a target/draft pair sharing a vocabulary.

    Sampling: each call draws one key per row from ``generator`` (default: torch's global RNG), and
    every sampled token is the winner of the row's position-keyed race (:mod:`~adaspec_hf.core.race`),
    so the same seed gives the same text whatever the policy drafts, and the draft ranks its
    candidates by the same race. ``max_new_tokens`` is not
    allocated up front (rows that stop at EOS cost only what they generated).

    Rows stop under one :class:`~adaspec_hf.core.buffer.CommitRule`: ``eos_token_id`` (not before
    ``min_new_tokens`` new tokens), ``max_new_tokens`` and ``stopping_criteria`` (HF criteria,
    e.g. ``StopStringCriteria``, checked after every emitted token). ``proposer``: where drafts come
    from (default: ``draft``, see :class:`~adaspec_hf.core.proposer.DraftModelProposer`; with
    ``draft=None``, a :class:`~adaspec_hf.core.lookup.LookupProposer`).
    """

    def __init__(
        self,
        target: PreTrainedModel,
        draft: PreTrainedModel | None,
        policy: DraftPolicy,
        *,
        do_sample: bool = False,
        processors: LogitsProcessorList | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        min_new_tokens: int = 0,
        max_time: float | None = None,
        generator: torch.Generator | None = None,
        compaction_threshold: float = 0.5,
        output_scores: bool = False,
        output_logits: bool = False,
        streamer=None,
        timing: bool = True,
        proposer: Proposer | None = None,
    ):
        check_cache_support(target)
        if draft is not None:
            check_cache_support(draft)
        elif not isinstance(proposer, LookupProposer):
            raise ValueError("draft=None needs a proposer that drafts without a draft model (LookupProposer)")
        self.target, self.draft, self.policy = target, draft, policy
        self.do_sample = do_sample
        self.processors = processors
        eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        self.device = execution_device(target)
        self.eos = torch.tensor(eos, dtype=torch.long, device=self.device)
        self.pad_token_id = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        self.stopping = stopping_criteria if stopping_criteria is not None else StoppingCriteriaList()
        self.rule = CommitRule(eos, min_new_tokens=min_new_tokens, stopping=self.stopping, device=self.device)
        self.max_time = max_time
        self.generator = generator
        self.compaction_threshold = compaction_threshold
        self.output_scores, self.output_logits = output_scores, output_logits
        self.streamer = streamer
        self.timing = timing
        self.proposer = proposer
        self.v_target = target.config.vocab_size if hasattr(target.config, "vocab_size") else None

    def _sync(self) -> None:
        if self.timing and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _pick(self, scores: torch.Tensor, rows: "_BufferRows", real: torch.Tensor) -> torch.Tensor:
        """First token per row; sampled ones win the row's race at position ``real``."""
        if not self.do_sample:
            return scores.argmax(-1)
        first = race_sample(torch.softmax(scores, -1), rows.keys, real)
        if bool((first == NO_TOKEN).any()):
            raise ValueError(NO_TOKEN_MESSAGE)
        return first

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int,
        token_type_ids: torch.Tensor | None = None,
    ) -> DecodeResult:
        t_start = time.perf_counter()
        dev = self.device
        input_ids = input_ids.to(dev)
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError("input_ids must be a non-empty (batch, length) tensor")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(dev).long()
        if bool((attention_mask.sum(1) == 0).any()):
            raise ValueError("a prompt is empty (attention_mask all zeros); every row needs >= 1 token")
        if bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("prompts must be left-padded (attention_mask ends with 0 in some row)")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        max_new_tokens = int(max_new_tokens)
        b, p = input_ids.shape
        stats = GenerationStats(policy=getattr(self.policy, "name", type(self.policy).__name__))
        self.policy.reset()
        rows = _BufferRows(self, input_ids, attention_mask, max_new_tokens)

        # prefill both models; the target's last logits give the first token, as in HF generate
        batch = RowBatch(self.target, self.draft)
        first_logits = batch.prefill(input_ids, attention_mask, torch.arange(b, device=dev), token_type_ids)
        first_scores = rows.process(first_logits, lambda: list(enumerate(input_ids)))
        first = self._pick(first_scores, rows, attention_mask.sum(1))
        self._sync()
        stats.prefill_time = time.perf_counter() - t_start
        if self.streamer is not None:
            self.streamer.put(input_ids.cpu())
        finished = rows.commit_tokens(
            batch.rid, first[:, None], torch.ones(b, dtype=torch.long, device=dev),
            first_scores[:, None] if self.output_scores else None,
            first_logits[:, None] if self.output_logits else None,
        )
        # sampled rows are verified by their position-keyed races (the drafter reads the same noise),
        # so the output (and the RNG consumed) do not depend on what the policy drafts
        stepper = SpecStep(self.policy, proposer=self.proposer, draft_sampling=False, generator=self.generator,
                           timing=self.timing)
        step = 0
        while True:
            keep = ~finished
            if self.max_time is not None and time.perf_counter() - t_start > self.max_time:
                keep = torch.zeros_like(keep)
            if not bool(keep.all()):
                if not bool(keep.any()):
                    break
                batch.keep(torch.nonzero(keep)[:, 0])
            step += 1
            finished, record = stepper(batch, rows, step)
            stats.record(record)
            batch.maybe_compact(self.compaction_threshold)

        if self.streamer is not None:
            self.streamer.end()
        buf = rows.buffer
        n_gen = buf.n_gen
        width = int(n_gen.max())
        sequences = buf.sequences()
        new_tokens = [buf.generated(i) for i in range(b)]
        stats.total_time = time.perf_counter() - t_start
        stats.new_tokens = int(n_gen.sum())
        scores = self._stack(rows.scores_per_row, width) if self.output_scores else None
        logits = self._stack(rows.logits_per_row, width) if self.output_logits else None
        logger.debug("adaspec generate: %s", stats.summary())
        return DecodeResult(sequences, scores, logits, stats, new_tokens)

    def _stack(self, per_row: list[list[torch.Tensor]], width: int) -> tuple[torch.Tensor, ...]:
        v = next((r[0].shape[-1] for r in per_row if r), 0)
        zero = torch.zeros(v, device=self.device)
        return tuple(torch.stack([r[t] if t < len(r) else zero for r in per_row]) for t in range(width))
