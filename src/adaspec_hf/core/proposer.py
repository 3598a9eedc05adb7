"""Who drafts: the :class:`Proposer` seam of the step, and the draft-model proposer.

The step hands a proposer the batch and the policy's depth bound and gets back a draft tree per
row; it never builds the drafter itself, so another source of drafts (e.g. prompt-lookup n-grams)
plugs in without touching the step.

The draft model (:class:`TreeDrafter`) grows the tree one batched draft forward per level. Before a
level-1 decision the draft first *catches up*: it is fed every committed token it has not seen (at
least the pending one), so its cache always mirrors the committed text. Level ``d`` nodes are fed
with a tree mask (each node sees the committed cache, its ancestors' slots and itself); nodes that
are pruned or later rejected stay in the draft cache as holes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol

import torch

from adaspec_hf.core.context import LevelContext, StepContext
from adaspec_hf.core.kv import KVState
from adaspec_hf.core.processing import ProcessFn
from adaspec_hf.core.race import race_scores
from adaspec_hf.core.rows import PrefixFn, RowBatch, RowSource
from adaspec_hf.core.tree import DraftTree

if TYPE_CHECKING:  # the policy interface sits above core; the step only calls it
    from adaspec_hf.policies.base import DraftPolicy


class Proposer(Protocol):
    """A source of draft trees for :class:`~adaspec_hf.core.step.SpecStep`.

    ``free_depth`` (optional, default 0): levels the proposer drafts at no forward cost whatever the
    policy's depth bound (prompt lookup under a planner); 0 for the draft model. When it is > 0 the
    step passes it as ``free_depth=`` (clamped like the policy's bound) and calls the proposer when
    either bound is > 0 for some row; a proposer without free levels is called as before."""

    free_depth: int

    def propose(self, batch: RowBatch, src: RowSource, policy: DraftPolicy, ctx: StepContext,
                max_depth: torch.Tensor, process: ProcessFn, prefix_of: PrefixFn,
                free_depth: torch.Tensor | None = None) -> DraftTree:
        """Trees for the rows of ``batch``, at most ``max_depth[b]`` deep (``max(max_depth,
        free_depth)`` for free levels), grown under ``policy`` (its ``choose`` per level; the step
        applies ``select`` after). ``process`` turns logits into the rows' processed scores;
        ``prefix_of`` gives node prefixes."""
        ...

    def accepted(self, batch: RowBatch, tree: DraftTree, accepted: torch.Tensor) -> None:
        """After verification: ``accepted`` (B, N) marks the nodes of ``tree`` now committed."""
        ...


class DraftModelProposer:
    """The draft model of ``batch`` (its draft cache) as a :class:`Proposer`.

    ``sampling``: sample chain drafts from the draft's distribution (else the draft's top tokens);
    ``generator``: for those samples."""

    free_depth = 0  # every draft level is a draft forward

    def __init__(self, sampling: bool = False, generator: torch.Generator | None = None):
        self.sampling = sampling
        self.generator = generator

    def propose(self, batch, src, policy, ctx, max_depth, process, prefix_of, free_depth=None):
        rid, length = batch.rid, batch.length
        # catch the draft up on every committed token it has not seen (the pending one at least)
        count = length - batch.draft_seen
        toks = src.committed(rid, batch.draft_seen, int(count.max()))
        drafter = TreeDrafter(batch.dkv, self.sampling, self.generator)
        if ctx.race is not None:  # seeded sampling: rank candidates by the target's own race noise
            smp = src.sampling(rid)
            drafter.race = ctx.race
            drafter.race_rows = smp.to(rid.device) if isinstance(smp, torch.Tensor) else torch.full_like(
                rid, bool(smp), dtype=torch.bool)
        root_logits = drafter.catch_up(toks, batch.draft_seen, count).to(rid.device)
        batch.draft_seen = length.clone()
        return drafter.grow(root_logits, policy, ctx, max_depth, process, prefix_of)

    def accepted(self, batch, tree, accepted):
        # fed nodes on the accepted path become committed draft-cache slots; the rest are holes
        fed = accepted & (tree.draft_slot >= 0)
        batch.dkv.commit(tree.draft_slot, fed)
        batch.draft_seen = batch.draft_seen + fed.sum(1)


@dataclass
class _Frontier:
    """The nodes whose children are the next level's candidates (at first, the root alone)."""

    dist: torch.Tensor  # (B, F, V) processed draft distribution of each node's children
    node: torch.Tensor  # (B, F) node index in the tree, -1 = root
    path_prob: torch.Tensor  # (B, F) draft probability of the path root -> node
    ok: torch.Tensor  # (B, F) a real node (else padding)
    visible: torch.Tensor  # (B, F, S) speculative draft-cache slots each node sees
    tokens: torch.Tensor  # (B, F, L) tokens root -> node


@dataclass
class _Candidates:
    """Children of the frontier offered at one level, sorted by path probability per row."""

    path_prob: torch.Tensor  # (B, C); 0 = no candidate
    tokens: torch.Tensor  # (B, C)
    prob: torch.Tensor  # (B, C) draft probability of the token itself
    source: torch.Tensor  # (B, C) frontier index of each candidate's parent
    sampled: bool  # drawn from the draft distribution (else its top tokens)


@dataclass
class _Levels:
    """The tree's nodes level by level, as (B, width) columns concatenated at the end."""

    batch: int
    device: torch.device
    n_total: int = 0
    parts: dict[str, list] = field(
        default_factory=lambda: {k: [] for k in ("tok", "par", "dep", "ok", "p", "smp", "slot", "q")})

    def partial(self) -> DraftTree:
        """The nodes so far (unpacked; may contain padding), for the policy's level decision."""
        b, dev, parts = self.batch, self.device, self.parts
        return DraftTree(
            tokens=_cat(parts["tok"], b, dev), parents=_cat(parts["par"], b, dev, -1),
            depth=_cat(parts["dep"], b, dev), valid=_cat(parts["ok"], b, dev, False),
            draft_prob=_cat(parts["p"], b, dev, 0.0), sampled=_cat(parts["smp"], b, dev, False),
        )

    def partial_valid(self) -> torch.Tensor:
        """``partial().valid`` alone."""
        return _cat(self.parts["ok"], self.batch, self.device, False)

    def add(self, level: int, cand: _Candidates, front: _Frontier, n_add: torch.Tensor,
            width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the best ``n_add[b]`` candidates as level ``level``; return their node ids and their
        draft-slot column (-1: not fed; filled in when the nodes are expanded)."""
        b, dev, parts = self.batch, self.device, self.parts
        ar = torch.arange(width, device=dev)
        ok = ar[None, :] < n_add[:, None]
        source = cand.source[:, :width]
        parts["tok"].append(torch.where(ok, cand.tokens[:, :width], 0))
        parts["par"].append(torch.where(ok, front.node.gather(1, source), -1))
        parts["dep"].append(ok.long() * level)
        parts["ok"].append(ok)
        parts["p"].append(torch.where(ok, cand.prob[:, :width], 0.0))
        parts["smp"].append(ok & cand.sampled)
        if cand.sampled:
            parts["q"].append(front.dist.gather(1, source[:, :, None].expand(-1, -1, front.dist.shape[-1])))
        else:
            parts["q"].append(None)
        node_ids = self.n_total + ar[None, :].expand(b, width)
        self.n_total += width
        slot_col = torch.full((b, width), -1, dtype=torch.long, device=dev)
        parts["slot"].append(slot_col)
        return node_ids, slot_col

    def tree(self, vocab: int) -> DraftTree:
        b, dev, parts = self.batch, self.device, self.parts
        if self.n_total == 0:
            return DraftTree.empty(b, dev)
        tree = DraftTree(
            tokens=torch.cat(parts["tok"], 1), parents=torch.cat(parts["par"], 1),
            depth=torch.cat(parts["dep"], 1), valid=torch.cat(parts["ok"], 1),
            draft_prob=torch.cat(parts["p"], 1), sampled=torch.cat(parts["smp"], 1),
            draft_slot=torch.cat(parts["slot"], 1),
        )
        if any(q is not None for q in parts["q"]):
            tree.q = torch.cat(
                [q if q is not None else torch.zeros(b, t.shape[1], vocab, device=dev)
                 for q, t in zip(parts["q"], parts["tok"])], 1)
        return tree.select(tree.valid)


class TreeDrafter:
    """Grows draft trees with the draft model whose cache is ``kv``."""

    def __init__(self, kv: KVState, sampling: bool, generator: torch.Generator | None = None):
        self.kv = kv
        self.sampling = sampling
        self.generator = generator
        # seeded sampling (see adaspec_hf.core.race): the step's noise, race(d, vocab) -> (B, vocab),
        # and which rows sample; their candidates are the race's winner and runners-up over the draft
        self.race: Callable[[int, int], torch.Tensor] | None = None
        self.race_rows: torch.Tensor | None = None

    def catch_up(
        self, tokens: torch.Tensor, start_pos: torch.Tensor, count: torch.Tensor
    ) -> torch.Tensor:
        """Feed ``count[b]`` committed tokens per row (``tokens`` (B, U), left-aligned) starting at
        position ``start_pos[b]``; return the logits after each row's last fed token (B, V)."""
        b, u = tokens.shape
        dev = tokens.device
        ar = torch.arange(u, device=dev)
        real = ar[None, :] < count[:, None]
        positions = start_pos[:, None] + ar[None, :]
        causal = ar[None, :, None] >= ar[None, None, :]
        eye = torch.eye(u, dtype=torch.bool, device=dev)[None]
        new_vis = (causal & real[:, None, :] & real[:, :, None]) | eye
        s0 = self.kv.length
        logits = self.kv.forward(tokens, positions, new_vis)
        slots = s0 + ar[None, :].expand(b, u)
        self.kv.commit(slots, real)
        last = (count - 1).clamp(min=0)
        return logits[torch.arange(b, device=dev), last]

    def _distribution(self, logits: torch.Tensor, process: ProcessFn, prefixes) -> torch.Tensor:
        scores = process(logits.float(), prefixes)
        return torch.softmax(scores, dim=-1)

    def grow(
        self,
        root_logits: torch.Tensor,
        policy: DraftPolicy,
        ctx: StepContext,
        max_depth: torch.Tensor,
        process: ProcessFn,
        prefix_of: Callable[[torch.Tensor, torch.Tensor], list[torch.Tensor]],
    ) -> DraftTree:
        """Grow trees from the root distribution; ``prefix_of(rows, path_tokens)`` gives the full
        token prefixes of nodes for input-dependent logits processors.

        Per level: the policy sees the frontier's children sorted by path probability and picks how
        many to add and how many of those (the best) to expand; the expanded ones are fed to the
        draft in one forward and become the next frontier."""
        b = root_logits.shape[0]
        dev = root_logits.device
        rows = torch.arange(b, device=dev)
        root_dist = self._distribution(
            root_logits, process,
            lambda: prefix_of(rows, torch.zeros(b, 0, dtype=torch.long, device=dev)),
        )[:, None]  # (B, 1, V)
        front = _Frontier(
            dist=root_dist, node=torch.full((b, 1), -1, dtype=torch.long, device=dev),
            path_prob=torch.ones(b, 1, device=dev), ok=max_depth[:, None] > 0,
            visible=torch.zeros(b, 1, self.kv.length, dtype=torch.bool, device=dev),
            tokens=torch.zeros(b, 1, 0, dtype=torch.long, device=dev),
        )
        levels = _Levels(b, dev)
        depth_limit = int(max_depth.max())
        for level in range(1, depth_limit + 1):
            cand = self._candidates(front, policy, level)
            lctx = LevelContext(level, cand.path_prob, cand.prob, levels.partial, ctx, max_depth,
                                cand_parent=front.node.gather(1, cand.source), partial_valid=levels.partial_valid)
            n_add, n_exp = policy.choose(lctx)
            avail = (cand.path_prob > 0).sum(1)
            n_add = torch.minimum(n_add.clamp(min=0), avail) * (max_depth >= level)
            n_exp = torch.minimum(n_exp.clamp(min=0), n_add) * (max_depth > level)
            width = int(n_add.max())
            if width == 0:
                break
            node_ids, slot_col = levels.add(level, cand, front, n_add, width)
            e = int(n_exp.max())
            if e == 0 or level == depth_limit:
                break
            # the node at depth `level` sits at the pending token's position + level
            position = ctx.context_len - 1 + level
            front = self._expand(front, cand, node_ids, slot_col, n_exp, e, position, process, prefix_of, rows)
        return levels.tree(root_logits.shape[-1])

    def _candidates(self, front: _Frontier, policy: DraftPolicy, level: int) -> _Candidates:
        """Each frontier node's top ``policy.max_children`` children (one sampled child when
        drafting by sampling a chain), sorted by path probability across the row.

        Under seeded sampling a sampled row's children are the winner and runners-up of the race
        the target will run at that position (over the draft's distribution, with the same noise);
        their probabilities stay the draft's top-w values, so a candidate's probability is the
        draft's confidence at its rank (exactly the greedy candidates' when the race is the argmax)."""
        b, f = front.node.shape
        w = min(policy.max_children, front.dist.shape[-1])
        sampled = self.sampling and w == 1
        if sampled:
            flat = front.dist.reshape(b * f, -1)
            tok = torch.multinomial(flat, 1, generator=self.generator).reshape(b, f, 1)
            cprob = front.dist.gather(2, tok)
        else:
            cprob, tok = front.dist.topk(w, dim=-1)
            if self.race is not None and bool(self.race_rows.any()):
                noise = self.race(level - 1, front.dist.shape[-1])  # the node at depth `level`
                _, rtok = race_scores(front.dist, noise[:, None, :]).topk(w, dim=-1)
                on = self.race_rows[:, None, None]
                tok = torch.where(on, rtok, tok)
                # a runner-up of probability 0 (fewer valid tokens than w) is no candidate
                cprob = torch.where(on & (front.dist.gather(2, rtok) <= 0), 0.0, cprob)
        path = (front.path_prob[:, :, None] * cprob) * front.ok[:, :, None]
        c_path = path.reshape(b, f * w)
        if f * w == 1:  # a chain's one candidate per row: nothing to sort (four ops fewer a level)
            return _Candidates(path_prob=c_path, tokens=tok.reshape(b, 1), prob=cprob.reshape(b, 1),
                               source=torch.zeros(b, 1, dtype=torch.long, device=c_path.device), sampled=sampled)
        order = torch.argsort(c_path, dim=1, descending=True, stable=True)
        return _Candidates(
            path_prob=c_path.gather(1, order), tokens=tok.reshape(b, f * w).gather(1, order),
            prob=cprob.reshape(b, f * w).gather(1, order), source=order // w, sampled=sampled,
        )

    def _expand(self, front: _Frontier, cand: _Candidates, node_ids: torch.Tensor, slot_col: torch.Tensor,
                n_exp: torch.Tensor, e: int, position: torch.Tensor, process: ProcessFn, prefix_of,
                rows: torch.Tensor) -> _Frontier:
        """Feed the best ``n_exp[b]`` new nodes (the first ones: they are sorted) to the draft in one
        forward; record their cache slots in ``slot_col``; return them as the next frontier."""
        b = front.node.shape[0]
        dev = front.node.device
        ar = torch.arange(e, device=dev)
        eok = ar[None, :] < n_exp[:, None]
        e_tok = cand.tokens[:, :e]
        e_from = cand.source[:, :e]
        vis_old = front.visible.gather(1, e_from[:, :, None].expand(-1, -1, front.visible.shape[2]))
        vis_old = vis_old & eok[:, :, None]
        new_vis = torch.eye(e, dtype=torch.bool, device=dev)[None].expand(b, e, e)
        s0 = self.kv.length
        logits = self.kv.forward(e_tok, position[:, None].expand(b, e), new_vis, old_visible=vis_old)
        slot_col[:, :e] = torch.where(eok, s0 + ar[None, :].expand(b, e), -1)
        visible = torch.cat([vis_old, torch.zeros(b, e, e, dtype=torch.bool, device=dev)], dim=2)
        visible[:, ar, s0 + ar] = True
        tokens = torch.cat(
            [front.tokens.gather(1, e_from[:, :, None].expand(-1, -1, front.tokens.shape[2])), e_tok[:, :, None]],
            dim=2)
        return _Frontier(
            dist=self._level_distribution(logits, process, prefix_of, rows, tokens, eok),
            node=node_ids[:, :e], path_prob=torch.where(eok, cand.path_prob[:, :e], 0.0), ok=eok,
            visible=visible, tokens=tokens,
        )

    def _level_distribution(self, logits, process, prefix_of, rows, paths, ok) -> torch.Tensor:
        """Processed draft distributions of expanded nodes (B, E, V); padded nodes get uniform."""
        b, e, v = logits.shape
        flat_ok = ok.reshape(-1)
        flat_rows = rows[:, None].expand(b, e).reshape(-1)
        flat_paths = paths.reshape(b * e, -1)

        def prefixes() -> list[torch.Tensor]:
            return prefix_of(flat_rows, flat_paths)

        dist = self._distribution(logits.reshape(b * e, v), process, prefixes)
        dist = torch.where(flat_ok[:, None], dist, torch.full_like(dist, 1.0 / v))
        return dist.reshape(b, e, v)


def _cat(parts: list[torch.Tensor], b: int, dev, fill=0) -> torch.Tensor:
    if not parts:
        dtype = torch.bool if fill is False else (torch.float32 if isinstance(fill, float) else torch.long)
        return torch.zeros(b, 0, dtype=dtype, device=dev)
    return torch.cat(parts, 1)
