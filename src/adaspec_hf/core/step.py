"""One speculative step over the running rows: draft -> select -> verify -> commit.

One target forward per step verifies every row's tree (a float 4-D mask plus explicit positions);
rows advance at their own pace and both caches keep rejected slots as holes until compaction.
Greedy output is token-identical to the target's own greedy decoding; sampling output follows the
target's processed distribution exactly (see :mod:`adaspec_hf.core.verify`).

The step works on a :class:`~adaspec_hf.core.rows.RowBatch`, asks a
:class:`~adaspec_hf.core.rows.RowSource` for everything about the rows' tokens, and gets its drafts
from a :class:`~adaspec_hf.core.proposer.Proposer`. Two owners share it:
:class:`~adaspec_hf.core.decoder.SpeculativeDecoder` (one ``generate`` call over a fixed batch) and
the serving engine (requests that join and leave between steps).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from adaspec_hf.core.context import StepOutcome
from adaspec_hf.core.processing import identity_process
from adaspec_hf.core.proposer import DraftModelProposer, Proposer
from adaspec_hf.core.race import RaceNoise
from adaspec_hf.core.rows import RowBatch, RowSource
from adaspec_hf.core.stats import StepRecord
from adaspec_hf.core.tree import DraftTree
from adaspec_hf.core.verify import (
    NO_TOKEN, NO_TOKEN_MESSAGE, Verdict, accept_coupled, accept_greedy, accept_sampling,
)

if TYPE_CHECKING:  # the policy interface sits above core; the step only calls it
    from adaspec_hf.policies.base import DraftPolicy


class TimedPolicy:
    """A view of a policy: the same object, with the seconds spent inside its calls and the draft
    levels it was offered counted (a step reports both: the planner's share of a step is one of its
    costs, and a level drafted then refused is another; the trace simulator charges the same)."""

    TIMED = ("max_depth", "choose", "select", "node_values", "skip_draft", "observe", "reset", "forget")

    def __init__(self, policy: DraftPolicy):
        self._policy, self.levels = policy, 0
        self.split: dict[str, float] = {}  # seconds per call name (which decision costs what)

    @property
    def seconds(self) -> float:
        """Seconds inside all timed calls so far."""
        return sum(self.split.values())

    def __getattr__(self, name: str):
        attr = getattr(self._policy, name)
        if name not in self.TIMED:
            return attr

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self.split[name] = self.split.get(name, 0.0) + time.perf_counter() - t0
                self.levels += name == "choose"
        return timed


def _race_of(keys: torch.Tensor | None, length: torch.Tensor):
    """The step's race noise, ``race(d, vocab)`` -> (B, vocab) at positions ``length + d``: one table
    per step, read by the drafter's levels and by the verify walk (None: no keys, no race)."""
    if keys is None:
        return None
    table = RaceNoise()
    return lambda d, vocab: table(keys, length + d, vocab, length.device)


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

    ``proposer``: where drafts come from (default: the batch's draft model, see
    :class:`~adaspec_hf.core.proposer.DraftModelProposer`, with ``draft_sampling`` and ``generator``).
    ``draft_sampling``: sample chain drafts from the draft's distribution (else the draft's top
    tokens, which the lossless acceptance rule handles for greedy and sampling rows alike).
    ``generator``: for sampled rows without keys (:meth:`RowSource.sample_keys`), and sampled drafts.

    Sampled drafts are verified by speculative sampling (accept with min(1, p/q)), which is lossless
    only if whether a sampled node is verified does not depend on that node; a policy that keeps or
    prunes nodes by their probability (a planner, a confidence threshold) would bias the output, so
    ``draft_sampling=True`` takes fixed-length chains only (a policy with ``reads_drafts = False``).
    Keyed rows (what ``generate`` and the engine use) need none of this: their race is exact
    whatever is drafted.
    """

    def __init__(self, policy: DraftPolicy, *, proposer: Proposer | None = None, draft_sampling: bool = False,
                 generator: torch.Generator | None = None, timing: bool = True):
        self.policy = policy
        if draft_sampling and (policy.reads_drafts or policy.max_children != 1):
            raise ValueError(
                f"draft_sampling=True needs a fixed-length chain policy (StaticChain), got {policy.name!r}: "
                "sampled drafts verified by speculative sampling stay lossless only if no decision depends on "
                "the sampled tokens; give the rows sampling keys (RowSource.sample_keys) instead")
        self.proposer = proposer if proposer is not None else DraftModelProposer(draft_sampling, generator)
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
        dev = batch.rid.device
        rid, length = batch.rid, batch.length
        bsz = rid.shape[0]
        t0 = time.perf_counter()
        remaining = src.remaining(rid)
        smp = src.sampling(rid)
        any_smp = bool(smp.any()) if isinstance(smp, torch.Tensor) else bool(smp)
        race = _race_of(src.sample_keys(rid) if any_smp else None, length)
        ctx = src.context(rows=bsz, context_len=length, remaining=remaining, sampling=any_smp,
                          step=step, row_ids=rid, race=race)
        policy = TimedPolicy(self.policy)
        max_depth = policy.max_depth(ctx).to(dev).clamp(min=0)
        max_depth = torch.minimum(max_depth, remaining - 1).clamp(min=0)
        free_levels = int(getattr(self.proposer, "free_depth", 0))  # optional in the protocol: 0 if absent
        free = torch.minimum(torch.full_like(max_depth, free_levels), remaining - 1).clamp(min=0)
        if max_depth_cap is not None:
            max_depth = max_depth.clamp(max=max(int(max_depth_cap), 0))
            free = free.clamp(max=max(int(max_depth_cap), 0))
        prefix_of = src.prefix_fn(rid)
        process = src.process_fn(rid)
        tree = DraftTree.empty(bsz, dev)
        if bool((max_depth > 0).any()) or bool((free > 0).any()):
            extra = {"free_depth": free} if free_levels else {}  # proposers without free levels need not take it
            tree = self.proposer.propose(batch, src, policy, ctx, max_depth, process or identity_process,
                                         prefix_of, **extra)
            keep_nodes = policy.select(tree, ctx)
            if tree.width and max_nodes is not None:
                # nodes are packed in topological order per row: a prefix keeps every ancestor
                keep_nodes = keep_nodes & (torch.arange(tree.width, device=dev)[None, :] < max(int(max_nodes), 0))
            if tree.width:
                tree = tree.select(keep_nodes)
        self._sync(dev)
        t1 = time.perf_counter()

        s0 = batch.tkv.length
        raw, scores = self._verify_pass(batch, src, tree, process, prefix_of)
        if isinstance(smp, torch.Tensor) and bool(smp.any()) and not bool(smp.all()):
            verdict = _merge_verdicts(smp, self._accept_sampled(tree, scores, race),
                                      accept_greedy(tree, scores))
        elif any_smp:
            verdict = self._accept_sampled(tree, scores, race)
        else:
            verdict = accept_greedy(tree, scores)
        emitted, n_emit = verdict.emitted, verdict.n_emitted
        bad = emitted.gather(1, verdict.n_accepted[:, None])[:, 0] == NO_TOKEN
        if bool(bad.any()):
            src.fail_rows(rid, bad, ValueError(NO_TOKEN_MESSAGE))
            emitted = emitted.clamp(min=0)

        # ---- commit: root + accepted path in the target cache; the proposer's own state
        n = tree.width
        q = 1 + n
        slot_keep = torch.zeros(bsz, q, dtype=torch.bool, device=dev)
        slot_keep[:, 0] = True
        if n:
            slot_keep[:, 1:] = verdict.accepted
            self.proposer.accepted(batch, tree, verdict.accepted)
        batch.tkv.commit((s0 + torch.arange(q, device=dev))[None, :].expand(bsz, q), slot_keep)
        batch.length = length + n_emit
        self._sync(dev)
        t2 = time.perf_counter()
        predicted = self.policy.predicted_time
        policy.observe(StepOutcome(
            tree=tree, n_accepted=verdict.n_accepted, tested=verdict.tested,
            accept_prob=verdict.accept_prob, accepted=verdict.accepted,
            step_time=t2 - t0, draft_time=t1 - t0, verify_time=t2 - t1, context_len=batch.length, row_ids=rid,
        ))
        record = StepRecord(
            rows=bsz, drafted=tree.n_nodes.tolist() if n else [0] * bsz,
            accepted=verdict.n_accepted.tolist(), draft_time=t1 - t0, verify_time=t2 - t1,
            step_time=time.perf_counter() - t0, predicted_time=predicted, decision_time=policy.seconds,
            decision_split=policy.split, draft_levels=policy.levels, kept_depth=int(tree.depth.max()) if n else 0,
        )
        finished = src.commit(rid, emitted, n_emit, scores, raw, verdict.source)  # last: see the docstring
        return finished, record

    def _verify_pass(self, batch: RowBatch, src: RowSource, tree: DraftTree, process,
                     prefix_of) -> tuple[torch.Tensor, torch.Tensor]:
        """[pending, nodes...] per row in one target forward: (raw logits, processed scores), each
        (B, 1+N, V) float32. The new slots stay uncommitted (holes) until the step commits them."""
        dev = batch.rid.device
        rid, length = batch.rid, batch.length
        bsz, n = tree.tokens.shape
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
        raw = batch.tkv.forward(tokens, positions, vis).float()
        if process is None:
            return raw, raw
        paths = node_paths(tree)
        flat_rows = torch.arange(bsz, device=dev)[:, None].expand(bsz, q).reshape(-1)
        depths = torch.cat([torch.zeros(bsz, 1, dtype=torch.long, device=dev), tree.depth], 1).reshape(-1)
        scores = process(
            raw.reshape(bsz * q, -1),
            lambda: prefix_of(flat_rows, paths.reshape(bsz * q, -1), depths),
        ).reshape(bsz, q, -1)
        return raw, scores

    def _accept_sampled(self, tree: DraftTree, scores: torch.Tensor, race) -> Verdict:
        """The race of each row's key when the rows have sampling keys, else the generator's sequence."""
        probs = torch.softmax(scores, -1)
        if race is None:
            return accept_sampling(tree, probs, self.generator)
        vocab = probs.shape[-1]
        return accept_coupled(tree, probs, lambda d: race(d, vocab))
