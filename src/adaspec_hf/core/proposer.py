"""Grow a draft tree per row with the draft model, one batched draft forward per tree level.

Before a level-1 decision the draft first *catches up*: it is fed every committed token it has not
seen (at least the pending one), so its cache always mirrors the committed text. Level ``d`` nodes
are fed with a tree mask (each node sees the committed cache, its ancestors' slots and itself);
nodes that are pruned or later rejected stay in the draft cache as holes.
"""
from __future__ import annotations

from typing import Callable

import torch

from adaspec_hf.core.kv import KVState
from adaspec_hf.policies.base import DraftPolicy, LevelContext, StepContext
from adaspec_hf.core.tree import DraftTree

# (logits (M, V) float32, provider of (batch row, prefix) pairs) -> processed scores (M, V)
ProcessFn = Callable[[torch.Tensor, Callable[[], list[torch.Tensor]]], torch.Tensor]


class TreeDrafter:
    def __init__(self, kv: KVState, sampling: bool, generator: torch.Generator | None = None):
        self.kv = kv
        self.sampling = sampling
        self.generator = generator

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
        token prefixes of nodes for input-dependent logits processors."""
        b = root_logits.shape[0]
        dev = root_logits.device
        rows = torch.arange(b, device=dev)
        root_pos = ctx.context_len - 1  # position of the pending token
        # frontier: nodes whose children are the next level's candidates
        f_dist = self._distribution(
            root_logits, process,
            lambda: prefix_of(rows, torch.zeros(b, 0, dtype=torch.long, device=dev)),
        )[:, None]  # (B, 1, V)
        f_node = torch.full((b, 1), -1, dtype=torch.long, device=dev)
        f_path = torch.ones(b, 1, device=dev)
        f_ok = max_depth[:, None] > 0
        f_vis = torch.zeros(b, 1, self.kv.length, dtype=torch.bool, device=dev)  # speculative slots seen
        f_tokens_path = torch.zeros(b, 1, 0, dtype=torch.long, device=dev)  # tokens root->frontier node

        parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("tok", "par", "dep", "ok", "p", "smp", "slot", "q")}
        n_total = 0
        depth_limit = int(max_depth.max())
        for level in range(1, depth_limit + 1):
            f = f_node.shape[1]
            w = 1 if (self.sampling and policy.max_children == 1) else policy.max_children
            w = min(w, f_dist.shape[-1])
            if self.sampling and w == 1:
                flat = f_dist.reshape(b * f, -1)
                tok = torch.multinomial(flat, 1, generator=self.generator).reshape(b, f, 1)
                cprob = f_dist.gather(2, tok)
                sampled = True
            else:
                cprob, tok = f_dist.topk(w, dim=-1)
                sampled = False
            path = (f_path[:, :, None] * cprob) * f_ok[:, :, None]
            c_path = path.reshape(b, f * w)
            order = torch.argsort(c_path, dim=1, descending=True, stable=True)
            c_path = c_path.gather(1, order)
            c_tok = tok.reshape(b, f * w).gather(1, order)
            c_prob = cprob.reshape(b, f * w).gather(1, order)
            c_from = (order // w)  # frontier index of each candidate
            partial = DraftTree(
                tokens=_cat(parts["tok"], b, dev), parents=_cat(parts["par"], b, dev, -1),
                depth=_cat(parts["dep"], b, dev), valid=_cat(parts["ok"], b, dev, False),
                draft_prob=_cat(parts["p"], b, dev, 0.0), sampled=_cat(parts["smp"], b, dev, False),
            )
            lctx = LevelContext(level, c_path, c_prob, partial, ctx, max_depth, cand_parent=f_node.gather(1, c_from))
            n_add, n_exp = policy.choose(lctx)
            avail = (c_path > 0).sum(1)
            n_add = torch.minimum(n_add.clamp(min=0), avail) * (max_depth >= level)
            n_exp = torch.minimum(n_exp.clamp(min=0), n_add) * (max_depth > level)
            width = int(n_add.max())
            if width == 0:
                break
            ar = torch.arange(width, device=dev)
            ok = ar[None, :] < n_add[:, None]
            new_tok = c_tok[:, :width]
            new_par = f_node.gather(1, c_from[:, :width])
            parts["tok"].append(torch.where(ok, new_tok, 0))
            parts["par"].append(torch.where(ok, new_par, -1))
            parts["dep"].append(ok.long() * level)
            parts["ok"].append(ok)
            parts["p"].append(torch.where(ok, c_prob[:, :width], 0.0))
            parts["smp"].append(ok & sampled)
            if sampled:
                parts["q"].append(f_dist.gather(1, c_from[:, :width, None].expand(-1, -1, f_dist.shape[-1])))
            else:
                parts["q"].append(None)
            node_ids = n_total + ar[None, :].expand(b, width)
            n_total += width
            slot_col = torch.full((b, width), -1, dtype=torch.long, device=dev)
            parts["slot"].append(slot_col)
            e = int(n_exp.max())
            if e == 0 or level == depth_limit:
                break
            # feed the best n_exp nodes of this level (they are sorted by path probability)
            eok = ar[None, :e] < n_exp[:, None]
            e_tok = new_tok[:, :e]
            e_from = c_from[:, :e]
            vis_old = f_vis.gather(1, e_from[:, :, None].expand(-1, -1, f_vis.shape[2]))
            positions = (root_pos + level)[:, None].expand(b, e)
            new_vis = torch.eye(e, dtype=torch.bool, device=dev)[None].expand(b, e, e)
            s0 = self.kv.length
            vis_old = vis_old & eok[:, :, None]
            logits = self.kv.forward(e_tok, positions, new_vis, old_visible=vis_old)
            slots = s0 + torch.arange(e, device=dev)[None, :].expand(b, e)
            slot_col[:, :e] = torch.where(eok, slots, -1)
            # the new frontier
            f_vis = torch.cat([vis_old, torch.zeros(b, e, e, dtype=torch.bool, device=dev)], dim=2)
            f_vis[:, torch.arange(e), s0 + torch.arange(e)] = True
            f_tokens_path = torch.cat(
                [f_tokens_path.gather(1, e_from[:, :, None].expand(-1, -1, f_tokens_path.shape[2])),
                 e_tok[:, :, None]], dim=2)
            f_dist = self._level_distribution(logits, process, prefix_of, rows, f_tokens_path, eok)
            f_node = node_ids[:, :e]
            f_path = torch.where(eok, c_path[:, :e], 0.0)
            f_ok = eok
        if n_total == 0:
            return DraftTree.empty(b, dev)
        tree = DraftTree(
            tokens=torch.cat(parts["tok"], 1), parents=torch.cat(parts["par"], 1),
            depth=torch.cat(parts["dep"], 1), valid=torch.cat(parts["ok"], 1),
            draft_prob=torch.cat(parts["p"], 1), sampled=torch.cat(parts["smp"], 1),
            draft_slot=torch.cat(parts["slot"], 1),
        )
        if any(q is not None for q in parts["q"]):
            v = root_logits.shape[-1]
            tree.q = torch.cat(
                [q if q is not None else torch.zeros(b, t.shape[1], v, device=dev)
                 for q, t in zip(parts["q"], parts["tok"])], 1)
        return tree.select(tree.valid)

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
