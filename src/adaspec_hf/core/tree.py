"""A batch of draft token trees as padded tensors.

Every draft is a tree per row; a chain is a tree whose nodes each have one child. Nodes of a row
are packed at the front (indices ``0 .. n_b-1``) in topological order (a parent precedes its
children). ``parents == -1`` means "child of the root", the row's last committed token.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch


@dataclass
class DraftTree:
    tokens: torch.Tensor  # (B, N) long; 0 where padding
    parents: torch.Tensor  # (B, N) long; -1 = root (also for padding)
    depth: torch.Tensor  # (B, N) long; 1 for the root's children, 0 for padding
    valid: torch.Tensor  # (B, N) bool; True for the first n_b nodes of row b
    draft_prob: torch.Tensor  # (B, N) float; draft probability of the node given its path
    sampled: torch.Tensor  # (B, N) bool; drawn from ``q`` (else chosen deterministically)
    q: torch.Tensor | None = None  # (B, N, V) distribution a sampled node was drawn from
    draft_slot: torch.Tensor | None = None  # (B, N) long; draft-cache slot of a fed node, -1 if none
    lookup: torch.Tensor | None = None  # (B, N) bool; proposed by prompt lookup (else by the draft model)

    @staticmethod
    def empty(batch: int, device: torch.device | str = "cpu") -> "DraftTree":
        z = torch.zeros(batch, 0, dtype=torch.long, device=device)
        return DraftTree(
            tokens=z, parents=z.clone(), depth=z.clone(), valid=z.bool(),
            draft_prob=z.float(), sampled=z.bool(), draft_slot=z.clone(),
        )

    @staticmethod
    def from_lists(
        tokens: list[list[int]], parents: list[list[int]], device: torch.device | str = "cpu"
    ) -> "DraftTree":
        """Build from per-row python lists (tests and simple callers); probabilities set to 1."""
        b, n = len(tokens), max((len(t) for t in tokens), default=0)
        tok = torch.zeros(b, n, dtype=torch.long)
        par = torch.full((b, n), -1, dtype=torch.long)
        valid = torch.zeros(b, n, dtype=torch.bool)
        for i, (t, p) in enumerate(zip(tokens, parents)):
            if len(t) != len(p):
                raise ValueError("tokens and parents must have the same length per row")
            for j, pj in enumerate(p):
                if not -1 <= pj < j:
                    raise ValueError(f"row {i}: parent {pj} of node {j} must precede it (or be -1)")
            tok[i, : len(t)] = torch.tensor(t, dtype=torch.long)
            par[i, : len(p)] = torch.tensor(p, dtype=torch.long)
            valid[i, : len(t)] = True
        tree = DraftTree(
            tokens=tok, parents=par, depth=torch.zeros_like(tok), valid=valid,
            draft_prob=valid.float(), sampled=torch.zeros_like(valid),
        )
        tree.depth = tree.compute_depth()
        return tree.to(device)

    # ------------------------------------------------------------------ shape
    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    @property
    def width(self) -> int:
        return self.tokens.shape[1]

    @property
    def n_nodes(self) -> torch.Tensor:
        return self.valid.sum(dim=1)

    def to(self, device: torch.device | str) -> "DraftTree":
        return replace(
            self,
            **{
                k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                for k, v in self.__dict__.items()
            },
        )

    # -------------------------------------------------------------- structure
    def compute_depth(self) -> torch.Tensor:
        depth = torch.zeros_like(self.tokens)
        for j in range(self.width):  # parents precede children, so one pass suffices
            p = self.parents[:, j]
            pd = depth.gather(1, p.clamp(min=0)[:, None])[:, 0]
            depth[:, j] = torch.where(p >= 0, pd + 1, 1)
        return torch.where(self.valid, depth, 0)

    def ancestors(self) -> torch.Tensor:
        """(B, N, N) bool: ``[b, i, j]`` is True when node j is i itself or an ancestor of i."""
        b, n = self.tokens.shape
        eye = torch.eye(n, dtype=torch.bool, device=self.tokens.device).expand(b, n, n)
        anc = eye.clone()
        cur = self.parents.clone()
        rows = torch.arange(b, device=cur.device)[:, None].expand(b, n)
        cols = torch.arange(n, device=cur.device)[None, :].expand(b, n)
        max_depth = int(self.depth.max()) if n else 0
        for _ in range(max_depth):
            has = (cur >= 0) & self.valid
            if not bool(has.any()):
                break
            anc[rows[has], cols[has], cur[has]] = True
            cur = torch.where(has, self.parents.gather(1, cur.clamp(min=0)), -1)
        return anc & self.valid[:, :, None] & self.valid[:, None, :]

    def path_prob(self) -> torch.Tensor:
        """(B, N) product of draft probabilities from the root down to each node."""
        logp = torch.log(self.draft_prob.clamp_min(1e-30)).masked_fill(~self.valid, 0.0)
        anc = self.ancestors().to(logp.dtype)
        return torch.exp(torch.bmm(anc, logp[:, :, None])[:, :, 0]).masked_fill(~self.valid, 0.0)

    def select(self, keep: torch.Tensor) -> "DraftTree":
        """Keep the nodes where ``keep`` (B, N) is True; keep must be closed under ancestors."""
        keep = keep & self.valid
        if self.width == 0:
            return self
        anc = self.ancestors()
        orphan = (anc & ~keep[:, None, :]).any(-1) & keep
        if bool(orphan.any()):
            raise ValueError("selection is not a connected subtree: a kept node lost an ancestor")
        n_new = int(keep.sum(1).max()) if keep.numel() else 0
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :n_new]  # kept, in order
        new_index = torch.cumsum(keep.long(), 1) - 1  # old -> new index for kept nodes
        par_old = self.parents.gather(1, order)
        par_new = torch.where(par_old >= 0, new_index.gather(1, par_old.clamp(min=0)), -1)
        valid = keep.gather(1, order)

        def g(t: torch.Tensor | None, fill) -> torch.Tensor | None:
            if t is None:
                return None
            idx = order if t.dim() == 2 else order[:, :, None].expand(-1, -1, t.shape[-1])
            out = t.gather(1, idx)
            mask = valid if t.dim() == 2 else valid[:, :, None]
            return out.masked_fill(~mask, fill)

        return DraftTree(
            tokens=g(self.tokens, 0), parents=par_new.masked_fill(~valid, -1),
            depth=g(self.depth, 0), valid=valid, draft_prob=g(self.draft_prob, 0.0),
            sampled=g(self.sampled, False), q=g(self.q, 0.0), draft_slot=g(self.draft_slot, -1),
            lookup=g(self.lookup, False),
        )


def top_among_siblings(prob: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    """(B, N) whether each node is the most probable of its siblings (ties: the first), where
    ``parent`` (B, N) keys the sibling groups (give padding unique keys). A node's top child and its
    runners-up are accepted at different rates for the same draft probability."""
    c = prob.shape[1]
    same = parent[:, :, None] == parent[:, None, :]
    idx = torch.arange(c, device=prob.device)
    better = (prob[:, None, :] > prob[:, :, None]) | (
        (prob[:, None, :] == prob[:, :, None]) & (idx[None, None, :] < idx[None, :, None]))
    return ~(same & better).any(-1)


def top_among_siblings_np(prob: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """(B, C) numpy :func:`top_among_siblings`: whether each entry is the most probable among those
    with its key (ties: the first). The planners' numpy paths call it once per level and per step."""
    c = prob.shape[1]
    same = keys[:, :, None] == keys[:, None, :]
    idx = np.arange(c)
    better = (prob[:, None, :] > prob[:, :, None]) | (
        (prob[:, None, :] == prob[:, :, None]) & (idx[None, None, :] < idx[None, :, None]))
    return ~(same & better).any(-1)
