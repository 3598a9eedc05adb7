"""What a step tells its draft policy: the contexts before drafting and per draft level, and the
outcome after verify. Plain dataclasses of tensors; the policy interface itself lives in
:mod:`adaspec_hf.policies.base`, which re-exports these."""
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
    # Per-row latency objectives, set by the serving engine (None: no row has one). A policy that
    # ignores them is still correct; SLO-aware policies (policies/slo.py) read them.
    tpot: torch.Tensor | None = None  # (B,) seconds per token; inf = no TPOT objective
    tokens_needed: torch.Tensor | None = None  # (B,) expected tokens this step must emit to stay on track
    step_time: float = 0.0  # the engine's running estimate of a step's seconds
    rate_needed: torch.Tensor | None = None  # (B,) tokens per step needed from now on to still meet the
    #                                          TPOT objective at max_new_tokens (inf: can no longer)
    # Seeded sampling: race(d, vocab) -> (B, vocab) Exp(1) noise of each row's token at depth d + 1
    # (see adaspec_hf.core.race), shared by the drafter and the verifier; None: no sampled row has a key
    race: Callable[[int, int], torch.Tensor] | None = None
    # One call over a fixed batch (``generate``): it returns when its slowest row finishes, so a row
    # that will finish early gains the call little (the planner weighs rows by their steps left).
    # False where finished rows are replaced by new requests (the serving engine).
    ends_together: bool = False


@dataclass
class LevelContext:
    """Candidates for tree level ``level`` (depth of the nodes about to be added)."""

    level: int
    cand_path_prob: torch.Tensor  # (B, C) path probability, sorted descending; 0 = no candidate
    cand_prob: torch.Tensor  # (B, C) draft probability of the candidate token itself
    partial: "DraftTree | Callable[[], DraftTree]"  # the nodes so far, or how to build them (see ``tree``)
    step: StepContext
    max_depth: torch.Tensor  # (B,) the depth bound from max_depth()
    cand_parent: torch.Tensor | None = None  # (B, C) node index (in ``tree``) of each candidate's parent, -1 = root
    partial_valid: Callable[[], torch.Tensor] | None = None  # ``tree.valid`` without building the tree
    _valid: torch.Tensor | None = field(default=None, init=False, repr=False)  # partial_valid(), once read

    @property
    def tree(self) -> DraftTree:
        """Nodes added so far (unpacked; may contain padding), built on first read: the chain
        planners never read it, and concatenating it every level cost a batch-1 step ~0.3 ms."""
        if not isinstance(self.partial, DraftTree):
            self.partial = self.partial()
        return self.partial

    @property
    def valid(self) -> torch.Tensor:
        """(B, N) validity of the nodes so far (``tree.valid``): one concatenation where the tree
        is not built, for a planner that keeps its own record of the nodes (the tree planner)."""
        if isinstance(self.partial, DraftTree) or self.partial_valid is None:
            return self.tree.valid
        if self._valid is None:  # read twice a level (the record's check, then the level rule)
            self._valid = self.partial_valid()
        return self._valid


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
