"""Lossless acceptance of a batch of draft trees against the target's (processed) distributions.

Input layout of the verify pass: index 0 of each row is the root (the last committed token), index
``j + 1`` is tree node ``j``. The logits at an index predict that node's children.

* Greedy: walk down the tree following the target's argmax; emit the matched path plus the
  target's own next token. Token-identical to plain greedy decoding.
* Sampling: at a node, try its children in order. A child ``x`` drawn from ``q`` is accepted with
  ``min(1, p(x)/q(x))`` and on rejection ``p <- norm(max(0, p - q))`` (SpecInfer's multi-step rule;
  with one child this is standard speculative sampling). A deterministic child (q = point mass) is
  accepted with ``p(x)`` and on rejection ``p(x) <- 0`` renormalised. When no child is accepted
  the emitted token is drawn from what is left of ``p``: the output is distributed exactly as ``p``.
* Seeded sampling (:func:`accept_coupled`, what the engine and ``generate`` use): the token at
  sequence position ``t`` of a row is the winner of an exponential race, ``argmax p(x) / E_x``, with
  noise ``E`` that depends only on the row's key and ``t`` (:mod:`adaspec_hf.core.race`). A drafted
  token is accepted iff it is that token, so the output is exactly distributed as ``p`` and is the
  same text whatever was drafted (planner decisions, batch neighbours, machine speed). The drafter
  ranks its candidates by the same race over its own distribution, so it proposes the target's
  winner whenever the two races agree.

A row whose distribution has no valid token (all probabilities zero, or not finite) gets the
bonus token ``-1``; the caller fails that row alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from adaspec_hf.core.race import NO_TOKEN, race_token
from adaspec_hf.core.tree import DraftTree


@dataclass
class Verdict:
    """What one verify pass decided, per row."""

    path: torch.Tensor  # (B, D) accepted node indices in depth order, -1 padded
    n_accepted: torch.Tensor  # (B,) accepted draft tokens
    emitted: torch.Tensor  # (B, D+1) tokens to commit (accepted path + bonus), 0 padded
    source: torch.Tensor  # (B, D+1) verify index whose logits produced each emitted token
    tested: torch.Tensor  # (B, N) node's parent was reached, so the node was tried
    accept_prob: torch.Tensor  # (B, N) probability the rule accepted the node with (1/0 for greedy)
    accepted: torch.Tensor  # (B, N) node is on the accepted path

    @property
    def n_emitted(self) -> torch.Tensor:
        return self.n_accepted + 1


# ----------------------------------------------------------------- seeded sampling keys
NO_TOKEN_MESSAGE = ("no token to sample: the processed distribution gives every token probability 0 "
                    "(e.g. no_repeat_ngram_size / bad_words_ids ban all of them and there is no EOS)")
KEY_RANGE = 1 << 62  # per-row sampling keys are drawn in [0, KEY_RANGE) (non-negative int64)


def draw_keys(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` sampling keys (CPU int64) from ``generator`` (default: torch's global RNG): a fixed
    number of draws per call, whatever is drafted later."""
    dev = generator.device if generator is not None else "cpu"
    return torch.randint(0, KEY_RANGE, (n,), generator=generator, device=dev).cpu()


def _follow(tree: DraftTree, pick: Callable[[int, torch.Tensor], torch.Tensor], dev) -> Verdict:
    """Walk down the tree while a child is the target's own token, ``pick(d, cur)`` (B,) after
    verify index ``cur`` at depth ``d``; emit the path and that token at the first miss (or at the
    deepest node). The target's token never depends on the tree, so whatever is drafted the output
    is what the target alone would emit; ``accept_prob`` is the outcome (0/1)."""
    b, n = tree.tokens.shape
    max_depth = int(tree.depth.max()) if n else 0
    rows = torch.arange(b, device=dev)
    cur = torch.zeros(b, dtype=torch.long, device=dev)
    alive = torch.ones(b, dtype=torch.bool, device=dev)
    path = torch.full((b, max_depth), -1, dtype=torch.long, device=dev)
    tested = torch.zeros(b, n, dtype=torch.bool, device=dev)
    accepted = torch.zeros(b, n, dtype=torch.bool, device=dev)
    bonus = torch.zeros(b, dtype=torch.long, device=dev)
    for d in range(max_depth + 1):
        y = pick(d, cur)
        if d == max_depth:
            bonus = torch.where(alive, y, bonus)
            break
        children = _children_of(tree, cur, alive)
        tested |= children
        match = children & (tree.tokens == y[:, None])
        has = match.any(1)
        j = match.to(torch.int8).argmax(1)
        path[:, d] = torch.where(has, j, -1)
        accepted[rows[has], j[has]] = True
        bonus = torch.where(alive & ~has, y, bonus)
        cur = torch.where(has, j + 1, cur)
        alive = has
        if not bool(has.any()):
            break
    n_acc = (path >= 0).sum(1)
    return _finish(tree, path, n_acc, bonus, tested, accepted, accepted.float())


def accept_coupled(tree: DraftTree, probs: torch.Tensor, noise: Callable[[int], torch.Tensor]) -> Verdict:
    """Seeded sampling: ``probs`` (B, 1+N, V) processed target probabilities; ``noise(d)`` (B, V)
    the race noise of the position after depth ``d`` (depth 0: the token after the root). The
    target's token is the race's winner ``argmax p / E``; a child drafted from the same noise is
    accepted far more often than its ``p(x)``."""
    dev = probs.device
    rows = torch.arange(probs.shape[0], device=dev)
    return _follow(tree, lambda d, cur: race_token(probs[rows, cur], noise(d).to(dev)), dev)


def node_step(p: torch.Tensor, x: torch.Tensor, q: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Acceptance probability of child ``x`` under (residual) ``p``, and the residual on rejection.

    Batched over leading dims: ``p`` (..., V), ``x`` (...,), ``q`` (..., V) or None (deterministic).
    """
    px = p.gather(-1, x[..., None])[..., 0]
    if q is None:
        accept = px.clamp(0.0, 1.0)
        residual = p.scatter(-1, x[..., None], 0.0)
    else:
        qx = q.gather(-1, x[..., None])[..., 0]
        accept = torch.where(qx > 0, (px / qx.clamp_min(1e-30)).clamp(max=1.0), torch.ones_like(px))
        residual = (p - q).clamp_min(0.0)
    total = residual.sum(-1, keepdim=True)
    # A zero residual only happens when acceptance was certain; keep p to stay well-defined.
    residual = torch.where(total > 0, residual / total.clamp_min(1e-30), p)
    return accept, residual


def _children_of(tree: DraftTree, cur: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    return tree.valid & (tree.parents == (cur - 1)[:, None]) & alive[:, None]


def accept_greedy(tree: DraftTree, scores: torch.Tensor) -> Verdict:
    """``scores`` (B, 1+N, V) processed target scores at root and nodes: the target's token is
    their argmax."""
    target = scores.argmax(-1)  # (B, 1+N)
    return _follow(tree, lambda d, cur: target.gather(1, cur[:, None])[:, 0], scores.device)


def accept_sampling(
    tree: DraftTree, probs: torch.Tensor, generator: torch.Generator | None = None
) -> Verdict:
    """``probs`` (B, 1+N, V) target's processed probabilities at root and nodes."""
    b, n = tree.tokens.shape
    dev = probs.device
    max_depth = int(tree.depth.max()) if n else 0
    max_children = 0
    if n:
        kids = torch.zeros(b, n + 1, dtype=torch.long, device=dev)
        kids.scatter_add_(1, (tree.parents + 1).clamp(min=0), tree.valid.long())
        max_children = int(kids.max())
    rows = torch.arange(b, device=dev)
    cur = torch.zeros(b, dtype=torch.long, device=dev)
    path = torch.full((b, max(max_depth, 0)), -1, dtype=torch.long, device=dev)
    tested = torch.zeros(b, n, dtype=torch.bool, device=dev)
    accepted = torch.zeros(b, n, dtype=torch.bool, device=dev)
    accept_prob = torch.zeros(b, n, dtype=probs.dtype, device=dev)
    bonus = torch.zeros(b, dtype=torch.long, device=dev)
    pending = torch.ones(b, dtype=torch.bool, device=dev)  # rows still looking for their bonus
    for d in range(max_depth + 1):
        p = probs[rows, cur]  # (B, V)
        children = _children_of(tree, cur, pending) if n else torch.zeros(b, 0, dtype=torch.bool, device=dev)
        order = torch.argsort((~children).to(torch.int8), dim=1, stable=True)
        n_kids = children.sum(1)
        chosen = torch.full((b,), -1, dtype=torch.long, device=dev)
        for r in range(max_children if d < max_depth else 0):
            has = (n_kids > r) & (chosen < 0)
            if not bool(has.any()):
                break
            c = order[:, r]
            x = tree.tokens[rows, c]
            q = None
            if tree.q is not None:
                q = tree.q[rows, c]
            a_det, res_det = node_step(p, x, None)
            if q is not None:
                a_smp, res_smp = node_step(p, x, q)
                smp = tree.sampled[rows, c]
                a = torch.where(smp, a_smp, a_det)
                res = torch.where(smp[:, None], res_smp, res_det)
            else:
                a, res = a_det, res_det
            u = torch.rand(b, generator=generator, device=dev, dtype=probs.dtype)
            ok = has & (u < a)
            tested[rows[has], c[has]] = True
            accept_prob[rows[has], c[has]] = a[has]
            chosen = torch.where(ok, c, chosen)
            p = torch.where((has & ~ok)[:, None], res, p)
        took = chosen >= 0
        if d < max_depth:
            path[:, d] = torch.where(took, chosen, -1)
            accepted[rows[took], chosen[took]] = True
        stop = pending & ~took
        if bool(stop.any()):
            ps = p[stop]
            total = ps.sum(-1)
            ok = torch.isfinite(total) & (total > 0)  # one row without a valid token fails alone
            ps = torch.where(ok[:, None], ps, torch.ones_like(ps))
            draw = torch.multinomial(ps, 1, generator=generator)[:, 0]
            bonus[stop] = torch.where(ok, draw, NO_TOKEN)
        pending = pending & took
        cur = torch.where(took, chosen + 1, cur)
        if not bool(pending.any()):
            break
    n_acc = (path >= 0).sum(1) if path.numel() else torch.zeros(b, dtype=torch.long, device=dev)
    return _finish(tree, path, n_acc, bonus, tested, accepted, accept_prob)


def _finish(tree, path, n_acc, bonus, tested, accepted, accepted_prob) -> Verdict:
    b = tree.tokens.shape[0]
    dev = tree.tokens.device
    d = path.shape[1]
    emitted = torch.zeros(b, d + 1, dtype=torch.long, device=dev)
    source = torch.zeros(b, d + 1, dtype=torch.long, device=dev)
    if d:
        safe = path.clamp(min=0)
        emitted[:, :d] = torch.where(path >= 0, tree.tokens.gather(1, safe), 0)
        # token at depth k came from the logits of its parent: root (0) or node path[k-1] (+1)
        src = torch.cat([torch.zeros(b, 1, dtype=torch.long, device=dev), safe + 1], dim=1)
        source = src
    emitted.scatter_(1, n_acc[:, None], bonus[:, None])
    source = source.clone()
    if d:
        src_bonus = torch.where(n_acc > 0, path.gather(1, (n_acc - 1).clamp(min=0)[:, None])[:, 0] + 1, 0)
        source.scatter_(1, n_acc[:, None], src_bonus[:, None])
    return Verdict(
        path=path, n_accepted=n_acc, emitted=emitted, source=source,
        tested=tested, accept_prob=accepted_prob, accepted=accepted,
    )
