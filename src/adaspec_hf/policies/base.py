"""Draft policies: who drafts, how deep and how wide, decided per step and per row.

The drafter asks a policy twice per step: :meth:`DraftPolicy.max_depth` before any draft work
(0 for every row skips the draft model entirely), then :meth:`DraftPolicy.choose` at each tree
level with the real draft probabilities of the candidates, and finally :meth:`DraftPolicy.select`
picks the nodes to verify. :meth:`DraftPolicy.observe` sees each step's outcome.
"""
from __future__ import annotations

import torch

from adaspec_hf.core.context import LevelContext, StepContext, StepOutcome
from adaspec_hf.core.tree import DraftTree


class DraftPolicy:
    """Base policy: chains (one child per node); subclasses override the decisions.

    What owners of a step (``generate``, the serving engine, benchmarks) may read, declared here so
    that none of them needs ``getattr`` or type switches: :attr:`name`, :attr:`max_children`,
    :attr:`needs_profile`, :attr:`trims`, :attr:`reads_drafts`, :attr:`predicted_time`,
    :attr:`latency`, :attr:`depth_limit`, :meth:`forget`, :meth:`reset`.
    """

    name = "base"
    max_children = 1  # top children per frontier node offered as candidates
    needs_profile = False  # True: built from a latency profile of the pair (the registry loads it)
    predicted_time: float | None = None  # the policy's predicted seconds for the step it just planned
    latency = None  # the LatencyModel it plans with, if any (the engine's admission control reuses it)
    trims = False  # select() keeps the goodput-best part of a tree (so free prompt-lookup levels are worth offering)
    reads_drafts = True  # choose()/select() may depend on the drafted tokens' probabilities (False: fixed shapes only)
    depth_limit: int | None = None  # the most levels max_depth() ever asks for (None: no fixed bound)

    def max_depth(self, ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError

    def choose(self, ctx: LevelContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(n_add, n_expand) per row: nodes to add at this level, and how many of them to expand."""
        go = ctx.max_depth >= ctx.level
        n_add = go.long()
        n_expand = (ctx.max_depth > ctx.level).long()
        return n_add, n_expand

    def select(self, tree: DraftTree, ctx: StepContext) -> torch.Tensor:
        """Nodes to verify (B, N) bool; must be closed under ancestors. Default: all."""
        return tree.valid

    def node_values(self, tree: DraftTree) -> torch.Tensor:
        """(B, N) the policy's predicted probability that each node's whole root path is accepted,
        for the step being planned. Default: the proposer's own path probability."""
        return tree.path_prob()

    def skip_draft(self, values: torch.Tensor, n_lookup: torch.Tensor) -> torch.Tensor | None:
        """(B,) rows that need no draft-model forward this step, given the free prompt-lookup
        proposal (``values``: :meth:`node_values` of its tree, ``n_lookup``: its nodes per row);
        None: no prediction (the proposer then applies its own rule)."""
        return None

    def observe(self, outcome: StepOutcome) -> None:
        pass

    def reset(self) -> None:
        """Start afresh (a new ``generate`` call or engine): per-row state goes, learnt calibration stays."""

    def forget(self, row_id: int) -> None:
        """Row ``row_id`` (a request) has left for good: drop what is kept for it."""
