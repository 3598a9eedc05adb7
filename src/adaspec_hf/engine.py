"""The batched speculative decoding loop: draft -> select -> verify -> commit, per step.

One target forward per step verifies every row's tree (a float 4-D mask plus explicit positions);
rows advance at their own pace, finished rows leave the batch, and both caches keep rejected slots
as holes until compaction. Greedy output is token-identical to the target's own greedy decoding;
sampling output follows the target's processed distribution exactly (see :mod:`.rejection`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessorList, PreTrainedModel, StoppingCriteriaList

from .drafter import TreeDrafter
from .kvstate import KVState, check_cache_support
from .policies import DraftPolicy, StepContext, StepOutcome
from .processing import Processing
from .rejection import accept_greedy, accept_sampling
from .tree import DraftTree

logger = logging.getLogger("adaspec_hf")


@dataclass
class StepRecord:
    rows: int
    drafted: list[int]  # nodes verified per row
    accepted: list[int]  # draft tokens accepted per row
    draft_time: float
    verify_time: float
    step_time: float
    predicted_time: float | None = None


@dataclass
class GenerationStats:
    """Per-call statistics (exposed as ``model.adaspec_stats`` after ``generate(adaptive=True)``)."""

    policy: str = ""
    steps: list[StepRecord] = field(default_factory=list)
    prefill_time: float = 0.0
    total_time: float = 0.0
    new_tokens: int = 0

    @property
    def target_forwards(self) -> int:
        return len(self.steps)

    @property
    def row_steps(self) -> int:
        return sum(s.rows for s in self.steps)

    @property
    def drafted_tokens(self) -> int:
        return sum(sum(s.drafted) for s in self.steps)

    @property
    def accepted_tokens(self) -> int:
        return sum(sum(s.accepted) for s in self.steps)

    @property
    def accepted_per_step(self) -> float:
        """Mean accepted draft tokens per row per target pass."""
        return self.accepted_tokens / max(self.row_steps, 1)

    @property
    def tokens_per_step(self) -> float:
        """Mean emitted tokens per row per target pass (1 + accepted)."""
        return 1.0 + self.accepted_per_step

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / max(self.drafted_tokens, 1)

    @property
    def mean_draft_len(self) -> float:
        return self.drafted_tokens / max(self.row_steps, 1)

    def summary(self) -> dict:
        return {
            "policy": self.policy, "target_forwards": self.target_forwards,
            "new_tokens": self.new_tokens, "accepted_per_step": round(self.accepted_per_step, 3),
            "tokens_per_step": round(self.tokens_per_step, 3),
            "acceptance_rate": round(self.acceptance_rate, 3),
            "mean_draft_len": round(self.mean_draft_len, 3), "total_time": round(self.total_time, 4),
        }


@dataclass
class DecodeResult:
    sequences: torch.Tensor  # (B, P + T): prompts as given, then generated tokens, pad-filled
    scores: tuple[torch.Tensor, ...] | None
    logits: tuple[torch.Tensor, ...] | None
    stats: GenerationStats
    new_tokens: list[list[int]]


class SpeculativeDecoder:
    """Batched lossless speculative decoding for a target/draft pair sharing a vocabulary."""

    def __init__(
        self,
        target: PreTrainedModel,
        draft: PreTrainedModel,
        policy: DraftPolicy,
        *,
        do_sample: bool = False,
        processors: LogitsProcessorList | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        max_time: float | None = None,
        generator: torch.Generator | None = None,
        compaction_threshold: float = 0.5,
        output_scores: bool = False,
        output_logits: bool = False,
        streamer=None,
        timing: bool = True,
    ):
        check_cache_support(target)
        check_cache_support(draft)
        self.target, self.draft, self.policy = target, draft, policy
        self.do_sample = do_sample
        self.processors = processors
        eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        self.device = target.device
        self.eos = torch.tensor(eos, dtype=torch.long, device=self.device)
        self.pad_token_id = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        self.stopping = stopping_criteria if stopping_criteria is not None else StoppingCriteriaList()
        self.max_time = max_time
        self.generator = generator
        self.compaction_threshold = compaction_threshold
        self.output_scores, self.output_logits = output_scores, output_logits
        self.streamer = streamer
        self.timing = timing
        self.v_target = target.config.vocab_size if hasattr(target.config, "vocab_size") else None

    # ----------------------------------------------------------------- helpers
    def _sync(self) -> None:
        if self.timing and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _pick(self, scores: torch.Tensor) -> torch.Tensor:
        if self.do_sample:
            return torch.multinomial(torch.softmax(scores, -1), 1, generator=self.generator)[:, 0]
        return scores.argmax(-1)

    # -------------------------------------------------------------- generate
    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int
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
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        b, p = input_ids.shape
        stats = GenerationStats(policy=getattr(self.policy, "name", type(self.policy).__name__))
        self.policy.reset()

        # batch state (rows of the active batch map to original rows via `rid`)
        out = torch.full((b, p + max_new_tokens + 1), self.pad_token_id, dtype=torch.long, device=dev)
        out[:, :p] = input_ids
        n_gen = torch.zeros(b, dtype=torch.long, device=dev)
        real_len = attention_mask.sum(1)
        self._pad = p - real_len  # left padding per original row
        self.process = Processing(self.processors, batch_size=b)
        scores_per_row: list[list[torch.Tensor]] = [[] for _ in range(b)]
        logits_per_row: list[list[torch.Tensor]] = [[] for _ in range(b)]

        # prefill both models; the target's last logits give the first token, as in HF generate
        tkv, dkv = KVState(self.target), KVState(self.draft)
        first_logits = tkv.prefill(input_ids, attention_mask).float()
        dkv.prefill(input_ids.to(self.draft.device), attention_mask.to(self.draft.device))
        first_scores = self.process(first_logits, lambda: list(enumerate(input_ids)))
        first = self._pick(first_scores)
        self._sync()
        stats.prefill_time = time.perf_counter() - t_start
        if self.streamer is not None:
            self.streamer.put(input_ids.cpu())

        rid = torch.arange(b, device=dev)  # active rows -> original rows
        length = real_len.clone()  # committed real tokens per active row (pending included)
        draft_seen = real_len.clone()  # tokens the draft cache holds
        finished = self._commit_tokens(
            rid, first[:, None], torch.ones(b, dtype=torch.long, device=dev), out, n_gen, p, max_new_tokens,
            first_scores[:, None] if self.output_scores else None,
            first_logits[:, None] if self.output_logits else None,
            scores_per_row, logits_per_row,
        )
        length = length + 1
        drafter = TreeDrafter(dkv, self.do_sample, self.generator)
        step = 0
        while True:
            keep = ~finished
            if self.max_time is not None and time.perf_counter() - t_start > self.max_time:
                keep = torch.zeros_like(keep)
            if not bool(keep.all()):
                if not bool(keep.any()):
                    break
                idx = torch.nonzero(keep)[:, 0]
                rid, length, draft_seen = rid[idx], length[idx], draft_seen[idx]
                tkv.select_rows(idx)
                dkv.select_rows(idx.to(self.draft.device))
            step += 1
            finished, length, draft_seen = self._step(
                step, stats, tkv, dkv, drafter, rid, length, draft_seen, out, n_gen, p,
                max_new_tokens, scores_per_row, logits_per_row,
            )
            tkv.maybe_compact(self.compaction_threshold)
            dkv.maybe_compact(self.compaction_threshold)

        if self.streamer is not None:
            self.streamer.end()
        width = int(n_gen.max())
        sequences = out[:, : p + width]
        new_tokens = [out[i, p: p + int(n_gen[i])].tolist() for i in range(b)]
        stats.total_time = time.perf_counter() - t_start
        stats.new_tokens = int(n_gen.sum())
        scores = self._stack(scores_per_row, width) if self.output_scores else None
        logits = self._stack(logits_per_row, width) if self.output_logits else None
        logger.debug("adaspec generate: %s", stats.summary())
        return DecodeResult(sequences, scores, logits, stats, new_tokens)

    def _stack(self, per_row: list[list[torch.Tensor]], width: int) -> tuple[torch.Tensor, ...]:
        v = next((r[0].shape[-1] for r in per_row if r), 0)
        zero = torch.zeros(v, device=self.device)
        return tuple(torch.stack([r[t] if t < len(r) else zero for r in per_row]) for t in range(width))

    # ------------------------------------------------------------------ step
    def _prefix_fn(self, out: torch.Tensor, rid: torch.Tensor, n_gen: torch.Tensor, p: int):
        def prefix_of(rows: torch.Tensor, paths: torch.Tensor, depths: torch.Tensor | None = None):
            res = []
            dl = depths.tolist() if depths is not None else [paths.shape[1]] * len(rows)
            for r, path, d in zip(rows.tolist(), paths, dl):
                path = path[:d]
                orig = int(rid[r])
                res.append((orig, torch.cat([out[orig, : p + int(n_gen[orig])], path.to(out.device)])))
            return res
        return prefix_of

    def _step(self, step, stats, tkv, dkv, drafter, rid, length, draft_seen, out, n_gen, p,
              max_new, scores_per_row, logits_per_row):
        dev = self.device
        bsz = rid.shape[0]
        t0 = time.perf_counter()
        remaining = max_new - n_gen[rid]
        ctx = StepContext(rows=bsz, context_len=length, remaining=remaining, sampling=self.do_sample,
                          step=step, row_ids=rid)
        max_depth = self.policy.max_depth(ctx).to(dev).clamp(min=0)
        max_depth = torch.minimum(max_depth, remaining - 1).clamp(min=0)
        prefix_of = self._prefix_fn(out, rid, n_gen, p)
        tree = DraftTree.empty(bsz, dev)
        if bool((max_depth > 0).any()):
            # catch the draft up on every committed token it has not seen (the pending one at least)
            count = length - draft_seen
            u = int(count.max())
            ar = torch.arange(u, device=dev)
            start_col = self._col_of(rid, draft_seen, out, p)
            cols = (start_col[:, None] + ar[None, :]).clamp(max=out.shape[1] - 1)
            toks = out[rid[:, None], cols]
            root_logits = drafter.catch_up(toks, draft_seen, count).to(dev)
            draft_seen = length.clone()
            tree = drafter.grow(root_logits, self.policy, ctx, max_depth, self.process, prefix_of)
            keep_nodes = self.policy.select(tree, ctx)
            if tree.width:
                tree = tree.select(keep_nodes)
        self._sync()
        t1 = time.perf_counter()

        # ---- verify: [pending, nodes...] per row in one target forward
        n = tree.width
        q = 1 + n
        pending_col = self._col_of(rid, length - 1, out, p)
        pending = out[rid, pending_col]
        tokens = torch.cat([pending[:, None], tree.tokens], dim=1)
        positions = (length - 1)[:, None] + torch.cat(
            [torch.zeros(bsz, 1, dtype=torch.long, device=dev), tree.depth], dim=1)
        vis = torch.zeros(bsz, q, q, dtype=torch.bool, device=dev)
        vis[:, 0, 0] = True
        if n:
            vis[:, 1:, 0] = tree.valid
            vis[:, 1:, 1:] = tree.ancestors()
            idx = torch.arange(1, q, device=dev)
            vis[:, idx, idx] = True  # padding slots see themselves (their output is ignored)
        s0 = tkv.length
        raw = tkv.forward(tokens, positions, vis).float()
        scores = raw
        if self.process:
            paths = self._node_paths(tree)
            flat_rows = torch.arange(bsz, device=dev)[:, None].expand(bsz, q).reshape(-1)
            depths = torch.cat([torch.zeros(bsz, 1, dtype=torch.long, device=dev), tree.depth], 1).reshape(-1)
            scores = self.process(
                raw.reshape(bsz * q, -1),
                lambda: prefix_of(flat_rows, paths.reshape(bsz * q, -1), depths),
            ).reshape(bsz, q, -1)
        if self.do_sample:
            verdict = accept_sampling(tree, torch.softmax(scores, -1), self.generator)
        else:
            verdict = accept_greedy(tree, scores)

        # ---- commit: root + accepted path in the target cache; fed accepted nodes in the draft's
        ar_q = torch.arange(q, device=dev)
        slot_keep = torch.zeros(bsz, q, dtype=torch.bool, device=dev)
        slot_keep[:, 0] = True
        if n:
            slot_keep[:, 1:] = verdict.accepted
            fed = verdict.accepted & (tree.draft_slot >= 0)
            dkv.commit(tree.draft_slot, fed)
            draft_seen = draft_seen + fed.sum(1)
        tkv.commit((s0 + ar_q)[None, :].expand(bsz, q), slot_keep)
        n_emit = verdict.n_emitted
        emitted = verdict.emitted
        rows_ar = torch.arange(bsz, device=dev)
        sc = scores[rows_ar[:, None], verdict.source] if self.output_scores else None
        lg = raw[rows_ar[:, None], verdict.source] if self.output_logits else None
        finished = self._commit_tokens(rid, emitted, n_emit, out, n_gen, p, max_new, sc, lg,
                                       scores_per_row, logits_per_row)
        length = length + n_emit
        self._sync()
        t2 = time.perf_counter()
        stats.steps.append(StepRecord(
            rows=bsz, drafted=tree.n_nodes.tolist() if n else [0] * bsz,
            accepted=verdict.n_accepted.tolist(), draft_time=t1 - t0, verify_time=t2 - t1,
            step_time=t2 - t0, predicted_time=getattr(self.policy, "last_predicted_time", None),
        ))
        self.policy.observe(StepOutcome(
            tree=tree, n_accepted=verdict.n_accepted, tested=verdict.tested,
            accept_prob=verdict.accept_prob, accepted=verdict.accepted,
            step_time=t2 - t0, draft_time=t1 - t0, verify_time=t2 - t1, context_len=length, row_ids=rid,
        ))
        return finished, length, draft_seen

    def _col_of(self, rid, position, out, p) -> torch.Tensor:
        """Column in ``out`` of the token at ``position`` (0 = first real prompt token) per row."""
        return position + self._pad[rid]

    @staticmethod
    def _node_paths(tree: DraftTree) -> torch.Tensor:
        """(B, 1+N, D) tokens from the root down to each verify index (root: empty, 0-padded)."""
        b, n = tree.tokens.shape
        d = int(tree.depth.max()) if n else 0
        paths = torch.zeros(b, 1 + n, d, dtype=torch.long, device=tree.tokens.device)
        if n:
            anc = tree.ancestors()  # (B, N, N)
            col = (tree.depth - 1).clamp(min=0)[:, None, :].expand(b, n, n)
            val = tree.tokens[:, None, :].expand(b, n, n)
            inner = torch.zeros(b, n, d, dtype=torch.long, device=tree.tokens.device)
            inner.scatter_add_(2, torch.where(anc, col, 0), torch.where(anc, val, 0))
            paths[:, 1:] = inner
        return paths

    def _commit_tokens(self, rid, emitted, n_emit, out, n_gen, p, max_new, sc, lg,
                       scores_per_row, logits_per_row) -> torch.Tensor:
        """Append emitted tokens per row, applying eos / length / stop criteria; return finished."""
        dev = self.device
        bsz, m = emitted.shape
        ar = torch.arange(m, device=dev)
        valid = ar[None, :] < n_emit[:, None]
        remaining = max_new - n_gen[rid]
        cut = torch.minimum(n_emit, remaining)
        done = n_emit >= remaining
        if self.eos.numel():
            is_eos = torch.isin(emitted, self.eos) & valid
            has = is_eos.any(1)
            first = is_eos.to(torch.int8).argmax(1) + 1
            hit = has & (first <= cut)
            cut = torch.where(hit, first, cut)
            done = done | hit
        if len(self.stopping):
            cut, done = self._apply_stopping(rid, emitted, cut, done, out, n_gen, p)
        keep = ar[None, :] < cut[:, None]
        cols = (p + n_gen[rid])[:, None] + ar[None, :]
        r2 = rid[:, None].expand(bsz, m)
        out[r2[keep], cols[keep]] = emitted[keep]
        if sc is not None or lg is not None:
            for i, orig in enumerate(rid.tolist()):
                c = int(cut[i])
                if sc is not None:
                    scores_per_row[orig].extend(sc[i, :c])
                if lg is not None:
                    logits_per_row[orig].extend(lg[i, :c])
        n_gen[rid] += cut
        if self.streamer is not None:
            self.streamer.put(emitted[0, : int(cut[0])].cpu())
        return done

    def _apply_stopping(self, rid, emitted, cut, done, out, n_gen, p):
        cut, done = cut.clone(), done.clone()
        for i, orig in enumerate(rid.tolist()):
            base = out[orig, : p + int(n_gen[orig])]
            for k in range(int(cut[i])):
                seq = torch.cat([base, emitted[i, : k + 1]])[None]
                hit = self.stopping(seq, None)
                if bool(torch.as_tensor(hit).reshape(-1)[0]):
                    cut[i] = k + 1
                    done[i] = True
                    break
        return cut, done
