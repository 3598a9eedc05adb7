"""Prompt lookup: draft trees from n-gram matches in each row's own committed text.

Text that repeats its input (code edits, quotes, JSON echoing a schema) is drafted for free: the
last ``n`` committed tokens of a row are looked up in everything the row has committed (prompt and
output), and what followed earlier occurrences is proposed. The longest ``n`` that matches anywhere
wins (``max_ngram`` down to ``min_ngram``); its most recent occurrences (up to
``MAX_MATCHES``) are merged into a trie, so continuations that diverge become branches and a
continuation several occurrences agree on is trusted more.

Each node's ``draft_prob`` is a *confidence*, not a probability the target will agree: the share of
the parent's supporting occurrences that continue with this token, times ``n / (n + 1)`` (a 1-gram
match is weaker evidence than a 3-gram one). Planners calibrate it online with an acceptance model
of its own (``DraftTree.lookup`` marks the nodes), as they calibrate a draft model's probabilities.

A continuation that reaches the end of the text (a loop) is extended around its period.

The match is vectorised across the batch (one ``unfold`` comparison per ``n``); the tries are built
per row in Python over at most ``MAX_MATCHES x depth`` tokens.
"""
from __future__ import annotations

import torch

from adaspec_hf.core.proposer import DraftModelProposer
from adaspec_hf.core.tree import DraftTree

MAX_MATCHES = 8  # most recent occurrences of the matched n-gram merged into a row's trie
DEFAULT_MAX_NGRAM = 3  # HF's max_matching_ngram_size default (2) +1: code repeats in longer runs
DEFAULT_MIN_NGRAM = 1


def find_matches(tokens: torch.Tensor, lengths: torch.Tensor, max_ngram: int = DEFAULT_MAX_NGRAM,
                 min_ngram: int = DEFAULT_MIN_NGRAM,
                 max_matches: int = MAX_MATCHES) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the start positions of continuations after the most recent earlier occurrences of
    its last ``n`` tokens, for the largest ``n`` in ``[min_ngram, max_ngram]`` that matches.

    ``tokens`` (B, L): committed tokens, left-aligned (``lengths[b]`` real ones; the rest ignored).
    Returns (starts (B, max_matches) long, -1 = none, most recent first; n (B,) long, 0 = no match).
    """
    b, width = tokens.shape
    dev = tokens.device
    starts = torch.full((b, max_matches), -1, dtype=torch.long, device=dev)
    used = torch.zeros(b, dtype=torch.long, device=dev)
    for n in range(max_ngram, min_ngram - 1, -1):
        if n >= width:
            continue
        todo = (used == 0) & (lengths > n)
        if not bool(todo.any()):
            continue
        # the row's last n tokens
        suffix_pos = (lengths - n)[:, None] + torch.arange(n, device=dev)[None, :]
        suffix = tokens.gather(1, suffix_pos.clamp(0, width - 1))
        windows = tokens.unfold(1, n, 1)  # (B, W, n): window i covers i .. i+n-1
        hit = (windows == suffix[:, None, :]).all(-1)
        pos = torch.arange(windows.shape[1], device=dev)[None, :]
        # an earlier occurrence with at least one token after it, the suffix itself excluded
        hit &= (pos + n < lengths[:, None]) & todo[:, None]
        if not bool(hit.any()):
            continue
        # most recent first: rank hits by position, descending
        key = torch.where(hit, pos, -1)
        k = min(max_matches, key.shape[1])
        top, _ = key.topk(k, dim=1)
        found = top >= 0
        starts[:, :k] = torch.where(found & todo[:, None], top + n, starts[:, :k])
        used = torch.where(todo & found.any(1), torch.full_like(used, n), used)
    return starts, used


def lookup_tree(tokens: torch.Tensor, lengths: torch.Tensor, max_depth: torch.Tensor, *,
                max_ngram: int = DEFAULT_MAX_NGRAM, min_ngram: int = DEFAULT_MIN_NGRAM,
                max_children: int = 1, max_matches: int = MAX_MATCHES) -> DraftTree:
    """Draft trees from prompt lookup, at most ``max_depth[b]`` deep and ``max_children`` wide per
    node (1: a chain along the best-supported continuation). Nodes carry ``lookup=True``."""
    b = tokens.shape[0]
    dev = tokens.device
    starts, used = find_matches(tokens, lengths, max_ngram, min_ngram, max_matches)
    if not bool((used > 0).any()) or int(max_depth.max()) <= 0:
        return _mark(DraftTree.empty(b, dev), all_lookup=True)
    tok_l, len_l, start_l = tokens.tolist(), lengths.tolist(), starts.tolist()
    depth_l, used_l = max_depth.tolist(), used.tolist()
    rows: list[tuple[list[int], list[int], list[float]]] = []
    for r in range(b):
        n, depth = used_l[r], min(int(depth_l[r]), 64)
        conts = [_continuation(tok_l[r], s, len_l[r], depth) for s in start_l[r] if s >= 0] if n and depth > 0 else []
        rows.append(_trie(conts, n / (n + 1.0), max_children))
    width = max((len(t) for t, _, _ in rows), default=0)
    if width == 0:
        return _mark(DraftTree.empty(b, dev), all_lookup=True)
    tree = DraftTree.from_lists([t for t, _, _ in rows], [p for _, p, _ in rows])
    tree.draft_prob = torch.tensor([c + [0.0] * (width - len(c)) for _, _, c in rows])
    tree.draft_slot = torch.full_like(tree.tokens, -1)
    return _mark(tree.to(dev), all_lookup=True)


def _continuation(tokens: list[int], start: int, length: int, depth: int) -> list[int]:
    """What followed an occurrence, ``depth`` tokens long. A recent occurrence's continuation runs
    into the end of the text: the text is then repeating with period ``length - start``, so the
    continuation goes on around that period (a loop's lookup is as deep as the policy allows)."""
    cont = tokens[start: min(start + depth, length)]
    period = len(cont)
    while 0 < period and len(cont) < depth:
        cont.append(cont[len(cont) - period])
    return cont


def _trie(conts: list[list[int]], strength: float, max_children: int) -> tuple[list[int], list[int], list[float]]:
    """Merge continuations (most recent first) into a trie; return its nodes breadth first as
    (tokens, parents, confidences). Children are ranked by support, ties by recency."""
    if not conts:
        return [], [], []
    out_tok: list[int] = []
    out_par: list[int] = []
    out_conf: list[float] = []
    # frontier entries: (node index or -1, the continuations through it, depth of its children)
    frontier: list[tuple[int, list[list[int]], int]] = [(-1, conts, 0)]
    while frontier:
        nxt = []
        for node, through, d in frontier:
            groups: dict[int, list[list[int]]] = {}
            for c in through:
                if len(c) > d:
                    groups.setdefault(c[d], []).append(c)  # dict keeps first-seen (recency) order
            ranked = sorted(groups.items(), key=lambda kv: -len(kv[1]))[:max_children]
            for token, members in ranked:
                out_tok.append(token)
                out_par.append(node)
                out_conf.append(strength * len(members) / len(through))
                nxt.append((len(out_tok) - 1, members, d + 1))
        frontier = nxt
    return out_tok, out_par, out_conf


def merge_trees(base: DraftTree, extra: DraftTree) -> DraftTree:
    """``base`` plus the nodes of ``extra`` whose root path ``base`` does not already hold, appended
    (topological order kept: an appended node's parent precedes it). Nodes shared by both keep
    ``base``'s fields (its draft-cache slot, its probability); appended ones keep ``extra``'s."""
    b = base.batch
    dev = base.tokens.device
    if extra.width == 0:
        return base if base.lookup is not None else _mark(base, all_lookup=False)
    if base.width == 0:
        return _mark(extra, all_lookup=True)
    bt, bp, bv = base.tokens.tolist(), base.parents.tolist(), base.valid.tolist()
    et, ep, ev = extra.tokens.tolist(), extra.parents.tolist(), extra.valid.tolist()
    add_src: list[list[int]] = []  # per row: extra node indices appended
    add_par: list[list[int]] = []  # their parents in the merged tree
    for r in range(b):
        index = {}  # (merged parent, token) -> merged node
        n_base = sum(bv[r])
        for j in range(n_base):
            index[(bp[r][j], bt[r][j])] = j
        where = {}  # extra node -> merged node
        srcs, pars = [], []
        for j in range(sum(ev[r])):
            parent = where[ep[r][j]] if ep[r][j] >= 0 else -1
            key = (parent, et[r][j])
            if key in index:
                where[j] = index[key]
                continue
            where[j] = index[key] = n_base + len(srcs)
            srcs.append(j)
            pars.append(parent)
        add_src.append(srcs)
        add_par.append(pars)
    n_add = max(len(s) for s in add_src)
    if n_add == 0:
        return _mark(base, all_lookup=False)
    counts = base.valid.sum(1).tolist()
    width = max(c + len(s) for c, s in zip(counts, add_src))

    def grow(t: torch.Tensor, fill) -> torch.Tensor:
        pad = torch.full((b, width - base.width, *t.shape[2:]), fill, dtype=t.dtype, device=dev)
        return torch.cat([t, pad], 1) if width > base.width else t.clone()

    tok, par = grow(base.tokens, 0), grow(base.parents, -1)
    valid, prob = grow(base.valid, False), grow(base.draft_prob, 0.0)
    sampled = grow(base.sampled, False)
    slot = grow(base.draft_slot if base.draft_slot is not None else torch.full_like(base.tokens, -1), -1)
    lookup = grow(base.lookup if base.lookup is not None else torch.zeros_like(base.valid), False)
    q = grow(base.q, 0.0) if base.q is not None else None
    # the appended nodes, as (row, merged index, extra index, merged parent) columns
    rows = torch.tensor([r for r in range(b) for _ in add_src[r]], device=dev)
    at = torch.tensor([counts[r] + i for r in range(b) for i in range(len(add_src[r]))], device=dev)
    src = torch.tensor([j for r in range(b) for j in add_src[r]], device=dev)
    tok[rows, at], prob[rows, at] = extra.tokens[rows, src], extra.draft_prob[rows, src]
    par[rows, at] = torch.tensor([p for r in range(b) for p in add_par[r]], device=dev)
    valid[rows, at] = lookup[rows, at] = True
    merged = DraftTree(tokens=tok, parents=par, depth=torch.zeros_like(tok), valid=valid, draft_prob=prob,
                       sampled=sampled, q=q, draft_slot=slot, lookup=lookup)
    merged.depth = merged.compute_depth()
    return merged


def _mark(tree: DraftTree, *, all_lookup: bool) -> DraftTree:
    """``tree`` with its ``lookup`` flags set: every node a lookup node, or none."""
    tree.lookup = tree.valid.clone() if all_lookup else torch.zeros_like(tree.valid)
    return tree


LOOKUP_TRUSTED = 0.5
"""For policies that predict no draft gain: a row whose prompt-lookup chain reaches the step's depth
bound with at least this predicted probability of being accepted all the way skips the draft model
this step (the draft could only add alternatives at positions the lookup covers better than even,
at the price of its forwards). Planners decide by predicted goodput instead (policies/choice.py)."""


class LookupProposer:
    """Prompt lookup as a :class:`~adaspec_hf.core.proposer.Proposer`: no draft model, no forward.

    ``free_depth``: levels proposed whatever the policy's depth bound (planners: their ``max_depth``,
    since a lookup costs no forward and the policy's ``select`` trims it by goodput; fixed-length
    policies: 0, so that ``static-K`` verifies K lookup tokens as HF's prompt lookup does)."""

    def __init__(self, max_ngram: int = DEFAULT_MAX_NGRAM, min_ngram: int = DEFAULT_MIN_NGRAM, *,
                 free_depth: int = 0):
        for name, v in (("max_ngram", max_ngram), ("min_ngram", min_ngram)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"prompt lookup {name} must be an integer >= 1, got {v!r}")
        if min_ngram > max_ngram:
            raise ValueError(f"prompt lookup min_ngram={min_ngram} exceeds max_ngram={max_ngram}")
        if isinstance(free_depth, bool) or not isinstance(free_depth, int) or free_depth < 0:
            raise ValueError(f"free_depth must be an integer >= 0, got {free_depth!r}")
        self.max_ngram, self.min_ngram, self.free_depth = max_ngram, min_ngram, free_depth

    def propose(self, batch, src, policy, ctx, max_depth, process, prefix_of, free_depth=None) -> DraftTree:
        depth = max_depth if free_depth is None else torch.maximum(max_depth, free_depth)
        length = batch.length
        toks = src.committed(batch.rid, torch.zeros_like(length), int(length.max()))
        return lookup_tree(toks, length, depth, max_ngram=self.max_ngram, min_ngram=self.min_ngram,
                           max_children=policy.max_children)

    def accepted(self, batch, tree, accepted) -> None:
        """Nothing to update: the lookup reads the committed text afresh every step."""


class CombinedProposer:
    """Prompt lookup and the draft model merged into one tree per row; the policy's ``select``
    then verifies the goodput-best part of it (lookup nodes, draft nodes, both, or none), each kind
    valued by its own acceptance calibration. Before any draft forward the policy says which rows
    skip the draft model (:meth:`~adaspec_hf.policies.base.DraftPolicy.skip_draft`: planners compare
    the predicted goodput of lookup alone and of drafting; else :data:`LOOKUP_TRUSTED`)."""

    def __init__(self, model: DraftModelProposer, lookup: LookupProposer):
        self.model, self.lookup = model, lookup
        self.free_depth = lookup.free_depth
        self.skipped_rows = 0  # row-steps where the lookup alone was trusted (statistics)

    def propose(self, batch, src, policy, ctx, max_depth, process, prefix_of, free_depth=None) -> DraftTree:
        extra = self.lookup.propose(batch, src, policy, ctx, max_depth, process, prefix_of, free_depth)
        model_depth = max_depth
        if extra.width and bool((max_depth > 0).any()):
            values = policy.node_values(extra).to(max_depth.device)
            trusted = policy.skip_draft(values, extra.n_nodes)
            if trusted is None:
                trusted = ((extra.depth >= max_depth[:, None]) & (values >= LOOKUP_TRUSTED)).any(1)
            trusted = trusted.to(max_depth.device)
            self.skipped_rows += int((trusted & (max_depth > 0)).sum())
            model_depth = torch.where(trusted, 0, max_depth)
        if bool((model_depth > 0).any()):
            base = self.model.propose(batch, src, policy, ctx, model_depth, process, prefix_of)
        else:
            base = DraftTree.empty(batch.rows, max_depth.device)
        return merge_trees(base, extra)

    def accepted(self, batch, tree, accepted) -> None:
        self.model.accepted(batch, tree, accepted)


def build_proposer(config, policy, has_draft: bool):
    """The proposer an :class:`~adaspec_hf.config.AdaptiveConfig` asks for: None (the draft model,
    the step's default) unless ``config.prompt_lookup``; then prompt lookup alone (no draft model)
    or merged with the draft model. Free lookup levels only for policies that trim by goodput."""
    if not config.prompt_lookup:
        if not has_draft:
            raise ValueError("no draft model: pass assistant_model=draft, or prompt_lookup=True to draft by "
                             "prompt lookup alone")
        return None
    free = config.max_depth if policy.trims else 0
    lookup = LookupProposer(config.lookup_max_ngram, config.lookup_min_ngram, free_depth=free)
    if not has_draft:
        return lookup
    return CombinedProposer(DraftModelProposer(), lookup)
