"""The batched speculative decoding loop: draft -> select -> verify -> commit, per step.

One target forward per step verifies every row's tree (a float 4-D mask plus explicit positions);
rows advance at their own pace, finished rows leave the batch, and both caches keep rejected slots
as holes until compaction. Greedy output is token-identical to the target's own greedy decoding;
sampling output follows the target's processed distribution exactly (see :mod:`.rejection`).

The step itself (:class:`SpecStep`) works on a :class:`RowBatch` (both caches plus each row's
committed length) and asks a :class:`RowSource` for everything about the rows' tokens: their
committed text, processors, sampling mode, and what to do with emitted tokens. Two owners share it:
:class:`SpeculativeDecoder` (one ``generate`` call over a fixed batch) and the serving engine
(:mod:`.serving`, requests that join and leave between steps).
"""
from __future__ import annotations

import contextlib
import logging
import numbers
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from transformers import LogitsProcessorList, PreTrainedModel, StoppingCriteriaList

from adaspec_hf.core.proposer import TreeDrafter
from adaspec_hf.compat import execution_device
from adaspec_hf.core.kv import KVState, check_cache_support
from adaspec_hf.policies.base import DraftPolicy, StepContext, StepOutcome
from adaspec_hf.core.processing import Processing
from adaspec_hf.core.verify import NO_TOKEN, Verdict, accept_coupled, accept_greedy, accept_sampling, inverse_cdf, position_uniform
from adaspec_hf.core.tree import DraftTree

logger = logging.getLogger("adaspec_hf")

KEY_RANGE = 1 << 62  # per-row sampling keys are drawn in [0, KEY_RANGE) (non-negative int64)
INITIAL_CAPACITY = 256  # generated tokens per row allocated up front; the buffer doubles on demand
NO_TOKEN_MESSAGE = ("no token to sample: the processed distribution gives every token probability 0 "
                    "(e.g. no_repeat_ngram_size / bad_words_ids ban all of them and there is no EOS)")


def draw_keys(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` sampling keys (CPU int64) from ``generator`` (default: torch's global RNG): a fixed
    number of draws per call, whatever is drafted later."""
    dev = generator.device if generator is not None else "cpu"
    return torch.randint(0, KEY_RANGE, (n,), generator=generator, device=dev).cpu()


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
    history: int | None = None  # keep only the last ``history`` records (long-running engines)
    # totals of the records dropped from ``steps``: forwards, row-steps, drafted, accepted
    folded: list[int] = field(default_factory=lambda: [0, 0, 0, 0], repr=False)

    def record(self, step: StepRecord) -> None:
        """Append a step record; beyond ``history`` the oldest are folded into the totals."""
        self.steps.append(step)
        if self.history is not None and len(self.steps) > self.history:
            cut = len(self.steps) - self.history
            old = self.steps[:cut]
            del self.steps[:cut]
            f = self.folded
            f[0] += len(old)
            f[1] += sum(s.rows for s in old)
            f[2] += sum(sum(s.drafted) for s in old)
            f[3] += sum(sum(s.accepted) for s in old)

    @property
    def target_forwards(self) -> int:
        return self.folded[0] + len(self.steps)

    @property
    def row_steps(self) -> int:
        return self.folded[1] + sum(s.rows for s in self.steps)

    @property
    def drafted_tokens(self) -> int:
        return self.folded[2] + sum(sum(s.drafted) for s in self.steps)

    @property
    def accepted_tokens(self) -> int:
        return self.folded[3] + sum(sum(s.accepted) for s in self.steps)

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


# ------------------------------------------------------------------------------------ batch state
class RowBatch:
    """The running rows: target and draft caches plus, per row, its key, committed length and how
    many committed tokens the draft cache has seen. ``length`` counts real tokens (prompt and
    generated) including the *pending* one: the last emitted token, not yet fed to the target."""

    def __init__(self, target: PreTrainedModel, draft: PreTrainedModel):
        self.tkv, self.dkv = KVState(target), KVState(draft)
        self.draft_device = self.dkv.device  # where it computes (accelerate disk offload: not .device)
        dev = self.tkv.device
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
        self.dkv.select_rows(idx.to(self.draft_device))

    def extend(self, other: "RowBatch") -> None:
        """Append another batch's rows (continuous batching; caches are left-padded to align)."""
        self.tkv.append_rows(other.tkv)
        self.dkv.append_rows(other.dkv)
        self.rid = torch.cat([self.rid, other.rid])
        self.length = torch.cat([self.length, other.length])
        self.draft_seen = torch.cat([self.draft_seen, other.draft_seen])

    def maybe_compact(self, threshold: float) -> None:
        self.tkv.maybe_compact(threshold)
        self.dkv.maybe_compact(threshold)

    def force_compact(self) -> None:
        """Compact both caches now (holes and left padding go), e.g. to stay within a slot bound."""
        self.tkv.compact()
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
        return own, self.tkv.checkpoint(), self.dkv.checkpoint()

    def _restore(self, saved: tuple) -> None:
        own, t, d = saved
        self.__dict__.update(own)
        self.tkv.restore(t)
        self.dkv.restore(d)


# (rows (M,), paths (M, D), depths (M,) or None) -> [(row key, full token prefix)] for processors
PrefixFn = Callable[..., list]


class RowSource:
    """What :class:`SpecStep` needs from the owner of the rows. ``rid`` holds the batch's row keys."""

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

    def process_fn(self, rid: torch.Tensor):
        """A ProcessFn ``(scores (M, V), prefixes) -> scores`` over M = B x k lines laid out row-major,
        or None when no row has logits processors."""
        return None

    def sampling(self, rid: torch.Tensor) -> bool | torch.Tensor:
        """True/False for the whole batch, or a (B,) bool tensor (mixed batches)."""
        return False

    def sample_keys(self, rid: torch.Tensor) -> torch.Tensor | None:
        """(B,) int64 sampling keys of the rows: sampled tokens are then position-keyed draws
        (reproducible whatever is drafted, see :func:`~adaspec_hf.core.verify.accept_coupled`).
        None: draw from the step's generator in sequence (speculative sampling's own rule)."""
        return None

    def fail_rows(self, rid: torch.Tensor, bad: torch.Tensor, error: Exception) -> None:
        """Rows ``bad`` (B,) cannot continue (no valid token to sample). Default: raise ``error``;
        the serving engine fails those requests alone."""
        raise error

    def context(self, **kw) -> StepContext:
        return StepContext(**kw)

    def commit(self, rid: torch.Tensor, emitted: torch.Tensor, n_emit: torch.Tensor, scores: torch.Tensor,
               raw: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """Store the emitted tokens (B, m) (first ``n_emit[b]`` valid); return finished rows (B,)."""
        raise NotImplementedError


def _identity_process(scores, prefixes):
    return scores


def node_paths(tree: DraftTree) -> torch.Tensor:
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


def _merge_verdicts(smp: torch.Tensor, a: Verdict, b: Verdict) -> Verdict:
    """Per row: ``a`` where ``smp`` else ``b`` (same tree, so the same shapes)."""
    def w(x, y):
        m = smp.reshape(-1, *([1] * (x.dim() - 1)))
        return torch.where(m, x, y.to(x.dtype))
    return Verdict(path=w(a.path, b.path), n_accepted=w(a.n_accepted, b.n_accepted),
                   emitted=w(a.emitted, b.emitted), source=w(a.source, b.source), tested=w(a.tested, b.tested),
                   accept_prob=w(a.accept_prob.float(), b.accept_prob.float()), accepted=w(a.accepted, b.accepted))


class SpecStep:
    """One draft -> select -> verify -> commit step over a :class:`RowBatch`.

    ``draft_sampling``: sample chain drafts from the draft's distribution (else the draft's top
    tokens, which the lossless acceptance rule handles for greedy and sampling rows alike).
    ``generator``: for sampled rows without keys (:meth:`RowSource.sample_keys`), and sampled drafts.
    """

    def __init__(self, policy: DraftPolicy, *, draft_sampling: bool = False,
                 generator: torch.Generator | None = None, timing: bool = True):
        self.policy = policy
        self.draft_sampling = draft_sampling
        self.generator = generator
        self.timing = timing

    def _sync(self, dev: torch.device) -> None:
        if self.timing and dev.type == "cuda":
            torch.cuda.synchronize(dev)

    @torch.no_grad()
    def __call__(self, batch: RowBatch, src: RowSource, step: int, *, max_nodes: int | None = None,
                 max_depth_cap: int | None = None) -> tuple[torch.Tensor, StepRecord]:
        """Advance every row of ``batch`` by one verify pass; return (finished (B,), record).

        ``max_nodes`` / ``max_depth_cap``: at most that many verified nodes per row / draft levels
        (a cache-slot bound). Rows are committed last (``src.commit``): if anything before raises,
        no request has seen a token of this step and the caller may roll the batch back and retry."""
        tkv, dkv = batch.tkv, batch.dkv
        dev = batch.rid.device
        rid, length = batch.rid, batch.length
        bsz = rid.shape[0]
        t0 = time.perf_counter()
        remaining = src.remaining(rid)
        smp = src.sampling(rid)
        any_smp = bool(smp.any()) if isinstance(smp, torch.Tensor) else bool(smp)
        ctx = src.context(rows=bsz, context_len=length, remaining=remaining, sampling=any_smp,
                          step=step, row_ids=rid)
        max_depth = self.policy.max_depth(ctx).to(dev).clamp(min=0)
        max_depth = torch.minimum(max_depth, remaining - 1).clamp(min=0)
        if max_depth_cap is not None:
            max_depth = max_depth.clamp(max=max(int(max_depth_cap), 0))
        prefix_of = src.prefix_fn(rid)
        process = src.process_fn(rid)
        tree = DraftTree.empty(bsz, dev)
        if bool((max_depth > 0).any()):
            # catch the draft up on every committed token it has not seen (the pending one at least)
            count = length - batch.draft_seen
            toks = src.committed(rid, batch.draft_seen, int(count.max()))
            drafter = TreeDrafter(dkv, self.draft_sampling, self.generator)
            root_logits = drafter.catch_up(toks, batch.draft_seen, count).to(dev)
            batch.draft_seen = length.clone()
            tree = drafter.grow(root_logits, self.policy, ctx, max_depth, process or _identity_process, prefix_of)
            keep_nodes = self.policy.select(tree, ctx)
            if tree.width and max_nodes is not None:
                # nodes are packed in topological order per row: a prefix keeps every ancestor
                keep_nodes = keep_nodes & (torch.arange(tree.width, device=dev)[None, :] < max(int(max_nodes), 0))
            if tree.width:
                tree = tree.select(keep_nodes)
        self._sync(dev)
        t1 = time.perf_counter()

        # ---- verify: [pending, nodes...] per row in one target forward
        n = tree.width
        q = 1 + n
        pending = src.token_at(rid, length - 1)
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
        if process is not None:
            paths = node_paths(tree)
            flat_rows = torch.arange(bsz, device=dev)[:, None].expand(bsz, q).reshape(-1)
            depths = torch.cat([torch.zeros(bsz, 1, dtype=torch.long, device=dev), tree.depth], 1).reshape(-1)
            scores = process(
                raw.reshape(bsz * q, -1),
                lambda: prefix_of(flat_rows, paths.reshape(bsz * q, -1), depths),
            ).reshape(bsz, q, -1)
        if isinstance(smp, torch.Tensor) and bool(smp.any()) and not bool(smp.all()):
            verdict = _merge_verdicts(smp, self._accept_sampled(tree, scores, src, rid, length),
                                      accept_greedy(tree, scores))
        elif any_smp:
            verdict = self._accept_sampled(tree, scores, src, rid, length)
        else:
            verdict = accept_greedy(tree, scores)
        emitted, n_emit = verdict.emitted, verdict.n_emitted
        bad = emitted.gather(1, verdict.n_accepted[:, None])[:, 0] == NO_TOKEN
        if bool(bad.any()):
            src.fail_rows(rid, bad, ValueError(NO_TOKEN_MESSAGE))
            emitted = emitted.clamp(min=0)

        # ---- commit: root + accepted path in the target cache; fed accepted nodes in the draft's
        ar_q = torch.arange(q, device=dev)
        slot_keep = torch.zeros(bsz, q, dtype=torch.bool, device=dev)
        slot_keep[:, 0] = True
        if n:
            slot_keep[:, 1:] = verdict.accepted
            fed = verdict.accepted & (tree.draft_slot >= 0)
            dkv.commit(tree.draft_slot, fed)
            batch.draft_seen = batch.draft_seen + fed.sum(1)
        tkv.commit((s0 + ar_q)[None, :].expand(bsz, q), slot_keep)
        batch.length = length + n_emit
        self._sync(dev)
        t2 = time.perf_counter()
        record = StepRecord(
            rows=bsz, drafted=tree.n_nodes.tolist() if n else [0] * bsz,
            accepted=verdict.n_accepted.tolist(), draft_time=t1 - t0, verify_time=t2 - t1,
            step_time=t2 - t0, predicted_time=getattr(self.policy, "last_predicted_time", None),
        )
        self.policy.observe(StepOutcome(
            tree=tree, n_accepted=verdict.n_accepted, tested=verdict.tested,
            accept_prob=verdict.accept_prob, accepted=verdict.accepted,
            step_time=t2 - t0, draft_time=t1 - t0, verify_time=t2 - t1, context_len=batch.length, row_ids=rid,
        ))
        finished = src.commit(rid, emitted, n_emit, scores, raw, verdict.source)  # last: see the docstring
        return finished, record

    def _accept_sampled(self, tree: DraftTree, scores: torch.Tensor, src: RowSource, rid: torch.Tensor,
                        length: torch.Tensor) -> Verdict:
        """Position-keyed draws when the rows have sampling keys, else the generator's sequence."""
        probs = torch.softmax(scores, -1)
        keys = src.sample_keys(rid)
        if keys is None:
            return accept_sampling(tree, probs, self.generator)
        depth = int(tree.depth.max()) if tree.width else 0
        # the token after verify index at depth d sits at sequence position length + d
        positions = length[:, None] + torch.arange(depth + 1, device=length.device)[None, :]
        return accept_coupled(tree, probs, position_uniform(keys, positions))


# ------------------------------------------------------------------------------ one generate call
class _BufferRows(RowSource):
    """Rows of one ``generate`` call: a left-padded (B, P + T) token buffer indexed by original row."""

    def __init__(self, dec: "SpeculativeDecoder", input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 max_new: int):
        b, p = input_ids.shape
        dev = dec.device
        self.dec, self.p, self.max_new = dec, p, max_new
        # allocated as tokens arrive: max_new_tokens may be far beyond where EOS stops the rows
        self.out = torch.full((b, p + min(max_new, INITIAL_CAPACITY) + 1), dec.pad_token_id, dtype=torch.long,
                              device=dev)
        self.out[:, :p] = input_ids
        self.keys = draw_keys(b, dec.generator).to(dev) if dec.do_sample else None
        self.n_gen = torch.zeros(b, dtype=torch.long, device=dev)
        self.pad = p - attention_mask.sum(1)  # left padding per original row
        self.process = Processing(dec.processors, batch_size=b)
        self.scores_per_row: list[list[torch.Tensor]] = [[] for _ in range(b)]
        self.logits_per_row: list[list[torch.Tensor]] = [[] for _ in range(b)]

    def remaining(self, rid):
        return self.max_new - self.n_gen[rid]

    def committed(self, rid, start, width):
        ar = torch.arange(width, device=rid.device)
        cols = ((start + self.pad[rid])[:, None] + ar[None, :]).clamp(max=self.out.shape[1] - 1)
        return self.out[rid[:, None], cols]

    def prefix_fn(self, rid):
        out, n_gen, p = self.out, self.n_gen, self.p

        def prefix_of(rows: torch.Tensor, paths: torch.Tensor, depths: torch.Tensor | None = None):
            res = []
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

    def ensure_capacity(self, columns: int) -> None:
        """Grow the token buffer (doubling, up to prompt + max_new + 1 columns) to hold ``columns``."""
        have = self.out.shape[1]
        if columns <= have:
            return
        width = min(max(columns, 2 * have), self.p + self.max_new + 1)
        grown = torch.full((self.out.shape[0], width), self.dec.pad_token_id, dtype=torch.long, device=self.out.device)
        grown[:, :have] = self.out
        self.out = grown

    def commit(self, rid, emitted, n_emit, scores, raw, source):
        rows_ar = torch.arange(rid.shape[0], device=rid.device)
        sc = scores[rows_ar[:, None], source] if self.dec.output_scores else None
        lg = raw[rows_ar[:, None], source] if self.dec.output_logits else None
        return self.commit_tokens(rid, emitted, n_emit, sc, lg)

    def commit_tokens(self, rid, emitted, n_emit, sc, lg) -> torch.Tensor:
        """Append emitted tokens per row, applying eos / length / stop criteria; return finished."""
        dec, out, n_gen, p = self.dec, self.out, self.n_gen, self.p
        dev = dec.device
        bsz, m = emitted.shape
        ar = torch.arange(m, device=dev)
        valid = ar[None, :] < n_emit[:, None]
        remaining = self.max_new - n_gen[rid]
        cut = torch.minimum(n_emit, remaining)
        done = n_emit >= remaining
        if dec.eos.numel():
            is_eos = torch.isin(emitted, dec.eos) & valid
            has = is_eos.any(1)
            first = is_eos.to(torch.int8).argmax(1) + 1
            hit = has & (first <= cut)
            cut = torch.where(hit, first, cut)
            done = done | hit
        if len(dec.stopping):
            cut, done = self._apply_stopping(rid, emitted, cut, done)
        keep = ar[None, :] < cut[:, None]
        cols = (p + n_gen[rid])[:, None] + ar[None, :]
        r2 = rid[:, None].expand(bsz, m)
        if bool(keep.any()):
            self.ensure_capacity(int(cols[keep].max()) + 2)
            out = self.out
        out[r2[keep], cols[keep]] = emitted[keep]
        if sc is not None or lg is not None:
            for i, orig in enumerate(rid.tolist()):
                c = int(cut[i])
                if sc is not None:
                    self.scores_per_row[orig].extend(sc[i, :c])
                if lg is not None:
                    self.logits_per_row[orig].extend(lg[i, :c])
        n_gen[rid] += cut
        if dec.streamer is not None:
            dec.streamer.put(emitted[0, : int(cut[0])].cpu())
        return done

    def _apply_stopping(self, rid, emitted, cut, done):
        cut, done = cut.clone(), done.clone()
        for i, orig in enumerate(rid.tolist()):
            base = self.out[orig, : self.p + int(self.n_gen[orig])]
            for k in range(int(cut[i])):
                seq = torch.cat([base, emitted[i, : k + 1]])[None]
                hit = self.dec.stopping(seq, None)
                if bool(torch.as_tensor(hit).reshape(-1)[0]):
                    cut[i] = k + 1
                    done[i] = True
                    break
        return cut, done


class SpeculativeDecoder:
    """Batched lossless speculative decoding for a target/draft pair sharing a vocabulary.

    Sampling: each call draws one key per row from ``generator`` (default: torch's global RNG), and
    every sampled token is the position-keyed draw of :func:`~adaspec_hf.core.verify.accept_coupled`,
    so the same seed gives the same text whatever the policy drafts. ``max_new_tokens`` is not
    allocated up front (rows that stop at EOS cost only what they generated).
    """

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
        self.device = execution_device(target)
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

    def _sync(self) -> None:
        if self.timing and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _pick(self, scores: torch.Tensor, rows: "_BufferRows", real: torch.Tensor) -> torch.Tensor:
        """First token per row; sampled ones are the position-keyed draw at position ``real``."""
        if not self.do_sample:
            return scores.argmax(-1)
        first = inverse_cdf(torch.softmax(scores, -1), position_uniform(rows.keys, real[:, None])[:, 0])
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
        # drafts are the draft's top tokens: sampled rows are verified by position-keyed draws, so
        # the output (and the RNG consumed) do not depend on what the policy drafts
        stepper = SpecStep(self.policy, draft_sampling=False, generator=self.generator, timing=self.timing)
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
        n_gen, out = rows.n_gen, rows.out
        width = int(n_gen.max())
        sequences = out[:, : p + width]
        new_tokens = [out[i, p: p + int(n_gen[i])].tolist() for i in range(b)]
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

    _node_paths = staticmethod(node_paths)
