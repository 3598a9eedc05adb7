"""Draft policies: who drafts, how deep and how wide, decided per step and per row.

The drafter asks a policy twice per step: :meth:`DraftPolicy.max_depth` before any draft work
(0 for every row skips the draft model entirely), then :meth:`DraftPolicy.choose` at each tree
level with the real draft probabilities of the candidates, and finally :meth:`DraftPolicy.select`
picks the nodes to verify. :meth:`DraftPolicy.observe` sees each step's outcome.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from adaspec_hf.core.tree import DraftTree


@dataclass
class StepContext:
    """What a policy knows before drafting."""

    rows: int
    context_len: torch.Tensor  # (B,) committed tokens per row
    remaining: torch.Tensor  # (B,) tokens each row may still emit
    sampling: bool
    step: int
    row_ids: torch.Tensor | None = None  # (B,) stable ids of the rows (requests), for per-row state


@dataclass
class LevelContext:
    """Candidates for tree level ``level`` (depth of the nodes about to be added)."""

    level: int
    cand_path_prob: torch.Tensor  # (B, C) path probability, sorted descending; 0 = no candidate
    cand_prob: torch.Tensor  # (B, C) draft probability of the candidate token itself
    tree: DraftTree  # nodes added so far (unpacked; may contain padding)
    step: StepContext
    max_depth: torch.Tensor  # (B,) the depth bound from max_depth()
    cand_parent: torch.Tensor | None = None  # (B, C) node index (in ``tree``) of each candidate's parent, -1 = root


@dataclass
class StepOutcome:
    """What happened in a step, for online adaptation."""

    tree: DraftTree  # verified tree (packed)
    n_accepted: torch.Tensor  # (B,)
    tested: torch.Tensor  # (B, N)
    accept_prob: torch.Tensor  # (B, N)
    accepted: torch.Tensor  # (B, N)
    step_time: float
    draft_time: float
    verify_time: float
    context_len: torch.Tensor  # (B,)
    row_ids: torch.Tensor | None = None


class DraftPolicy:
    """Base policy: chains (one child per node); subclasses override the decisions."""

    name = "base"
    max_children = 1  # top children per frontier node offered as candidates

    def max_depth(self, ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError

    def choose(self, ctx: LevelContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(n_add, n_expand) per row: nodes to add at this level, and how many of them to expand."""
        b = ctx.cand_path_prob.shape[0]
        go = ctx.max_depth >= ctx.level
        n_add = go.long()
        n_expand = (ctx.max_depth > ctx.level).long()
        return n_add, n_expand

    def select(self, tree: DraftTree, ctx: StepContext) -> torch.Tensor:
        """Nodes to verify (B, N) bool; must be closed under ancestors. Default: all."""
        return tree.valid

    def observe(self, outcome: StepOutcome) -> None:
        pass

    def reset(self) -> None:
        pass

    def forget(self, row_id: int) -> None:
        """Row ``row_id`` (a request) has left for good: drop what is kept for it."""


class StaticChain(DraftPolicy):
    """Fixed draft length ``k`` for every row and step (``k=0``: no speculation)."""

    def __init__(self, k: int):
        if k < 0:
            raise ValueError(f"draft length must be >= 0, got {k}")
        self.k = int(k)
        self.name = f"static-{k}"

    def max_depth(self, ctx: StepContext) -> torch.Tensor:
        return torch.full_like(ctx.context_len, self.k)


@dataclass
class TreeShape:
    """Per-row decisions for :class:`ShapeFunction` policies: nodes added / expanded per level."""

    adds: list[int] = field(default_factory=list)
    expands: list[int] = field(default_factory=list)


class ShapeFunction(DraftPolicy):
    """Caller-decided shapes: ``fn(step, row) -> TreeShape`` (or an int k for a chain).

    Level ``d`` adds ``adds[d-1]`` nodes (best path probabilities among the children of the
    previous level's expanded nodes) and expands the best ``expands[d-1]`` of them.
    """

    name = "shape-fn"

    def __init__(self, fn: Callable[[int, int], "TreeShape | int"], max_children: int = 4):
        self.fn = fn
        self.max_children = max_children
        self._shapes: list[TreeShape] = []

    def max_depth(self, ctx: StepContext) -> torch.Tensor:
        shapes = []
        for r in range(ctx.rows):
            s = self.fn(ctx.step, r)
            if isinstance(s, int):
                s = TreeShape(adds=[1] * s, expands=[1] * max(s - 1, 0))
            shapes.append(s)
        self._shapes = shapes
        return torch.tensor([len(s.adds) for s in shapes], dtype=torch.long, device=ctx.context_len.device)

    def choose(self, ctx: LevelContext) -> tuple[torch.Tensor, torch.Tensor]:
        d = ctx.level - 1
        add = [s.adds[d] if d < len(s.adds) else 0 for s in self._shapes]
        exp = [s.expands[d] if d < len(s.expands) else 0 for s in self._shapes]
        dev = ctx.cand_path_prob.device
        return torch.tensor(add, device=dev), torch.tensor(exp, device=dev)


class Heuristic(DraftPolicy):
    """HF's ``heuristic`` schedule per row: +2 after a fully accepted draft, -1 otherwise."""

    name = "heuristic"

    def __init__(self, start: int = 5, max_k: int = 32):
        self.start, self.max_k = start, max_k
        self.k: dict[int, int] = {}

    def reset(self) -> None:
        self.k.clear()

    def forget(self, row_id: int) -> None:
        self.k.pop(row_id, None)

    def _ids(self, n: int, row_ids: torch.Tensor | None) -> list[int]:
        return row_ids.tolist() if row_ids is not None else list(range(n))

    def max_depth(self, ctx: StepContext) -> torch.Tensor:
        ks = [self.k.get(r, self.start) for r in self._ids(ctx.rows, ctx.row_ids)]
        return torch.tensor(ks, dtype=torch.long, device=ctx.context_len.device)

    def observe(self, outcome: StepOutcome) -> None:
        drafted = outcome.tree.n_nodes.tolist() if outcome.tree.width else [0] * len(outcome.n_accepted)
        for r, n, a in zip(self._ids(len(drafted), outcome.row_ids), drafted, outcome.n_accepted.tolist()):
            if n == 0:
                continue
            k = self.k.get(r, self.start)
            self.k[r] = min(k + 2, self.max_k) if a == n else max(k - 1, 1)


class Confidence(DraftPolicy):
    """Draft while the draft's own probability stays above a threshold (HF / DISCO style)."""

    def __init__(self, threshold: float = 0.4, max_k: int = 20):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"confidence threshold must be in [0, 1], got {threshold}")
        self.threshold, self.max_k = threshold, max_k
        self.name = f"confidence-{threshold:g}"

    def max_depth(self, ctx: StepContext) -> torch.Tensor:
        return torch.full_like(ctx.context_len, self.max_k)

    def choose(self, ctx: LevelContext) -> tuple[torch.Tensor, torch.Tensor]:
        go = ctx.max_depth >= ctx.level
        confident = ctx.cand_prob[:, 0] >= self.threshold if ctx.cand_prob.shape[1] else go
        return go.long(), (go & confident & (ctx.max_depth > ctx.level)).long()


class StaticTree(DraftPolicy):
    """Fixed tree shape: ``width`` best nodes per level (by path probability), ``depth`` levels."""

    def __init__(self, depth: int, width: int):
        if depth < 1 or width < 1:
            raise ValueError(f"tree depth and width must be >= 1, got {depth}x{width}")
        self.depth, self.width = int(depth), int(width)
        self.max_children = self.width
        self.name = f"tree-{depth}x{width}"

    def max_depth(self, ctx: StepContext) -> torch.Tensor:
        return torch.full_like(ctx.context_len, self.depth)

    def choose(self, ctx: LevelContext) -> tuple[torch.Tensor, torch.Tensor]:
        go = ctx.max_depth >= ctx.level
        n = go.long() * self.width
        return n, n * (ctx.max_depth > ctx.level)
