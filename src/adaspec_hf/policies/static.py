"""Fixed shapes: a constant chain length, a constant tree, or shapes a caller decides per row."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from adaspec_hf.policies.base import DraftPolicy, LevelContext, StepContext


class StaticChain(DraftPolicy):
    """Fixed draft length ``k`` for every row and step (``k=0``: no speculation)."""

    reads_drafts = False  # k levels whatever is drafted

    def __init__(self, k: int):
        if k < 0:
            raise ValueError(f"draft length must be >= 0, got {k}")
        self.k = self.depth_limit = int(k)
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


class StaticTree(DraftPolicy):
    """Fixed tree shape: ``width`` best nodes per level (by path probability), ``depth`` levels."""

    def __init__(self, depth: int, width: int):
        if depth < 1 or width < 1:
            raise ValueError(f"tree depth and width must be >= 1, got {depth}x{width}")
        self.depth, self.width = int(depth), int(width)
        self.depth_limit = self.depth
        self.max_children = self.width
        self.name = f"tree-{depth}x{width}"

    def max_depth(self, ctx: StepContext) -> torch.Tensor:
        return torch.full_like(ctx.context_len, self.depth)

    def choose(self, ctx: LevelContext) -> tuple[torch.Tensor, torch.Tensor]:
        go = ctx.max_depth >= ctx.level
        n = go.long() * self.width
        return n, n * (ctx.max_depth > ctx.level)
