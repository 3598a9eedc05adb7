"""What a pair build trains: model shapes and the training budget (``FULL`` and ``QUICK``).

A recipe is part of a built pair's identity: ``report.json`` stores it, and a cached pair whose stored
recipe differs from the current one (or whose ``recipe_version`` differs) is rebuilt. Changing any
field here therefore rebuilds every user's pair on next use.
"""
from __future__ import annotations

from dataclasses import dataclass

from adaspec_hf.pair.gates import Gates

RECIPE_VERSION = 3  # 2: step budget, measured precision/threads, quality gates; 3: a second target
#                    initialisation when the first one's greedy text loops


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    kv_heads: int | None = None


@dataclass(frozen=True)
class Recipe:
    """Sizes and training budget of a pair build (``FULL`` or ``QUICK``).

    The budget is in optimizer steps (tokens = steps x batch x block), never in seconds: every machine
    trains the same recipe, a slow or busy one just takes longer (its ETA is printed up front).
    """

    name: str
    target: ModelShape
    draft: ModelShape
    vocab_size: int = 4096
    block_size: int = 256
    batch_size: int = 4                   # target phase: small batches = more updates per token (measured better)
    distill_batch_size: int = 8
    max_chars: int | None = None          # corpus slice (seeded subset of files)
    target_steps: int = 640               # target LM training (with the draft's KL on its logits when joint);
                                          # 480 measured distinct-4grams 0.36 (loops), 640 gave 0.44
    distill_steps: int = 280              # draft distillation on the frozen target
    joint: bool = True                    # the draft learns from the target's logits while it trains
    target_lr: float = 2e-3                # 3e-3 at batch 4 measured worse (held-out loss 5.15 vs ~4.9)
    draft_lr: float = 3e-3
    warmup_steps: int = 20
    min_lr_rate: float = 0.1              # cosine decay down to this fraction of the peak LR
    kd_weight: float = 1.0                # weight of the draft's KL term in the joint phase
    joint_hard_weight: float = 0.0        # + CE on the target's argmax, joint phase (1.0 measured worse)
    distill_hard_weight: float = 1.0      # + CE on the target's argmax, distill phase: raises greedy agreement
                                          # and makes the draft's confidence rank agreement (AUC 0.66 -> 0.78)
    build_budget_s: float = 900.0         # the whole build on the reference machine (2 cores, fp32): reported
    eval_blocks: int = 64                 # held-out blocks for loss / agreement / AUC
    n_prompts: int = 64
    continuation_tokens: int = 64         # greedy continuations for the distinct-4-gram gate
    cost_context: int = 256
    cost_repeats: int = 100
    aim_ratio: float = 12.0               # grow the target until this (margin over the gate's 8x)
    max_grow_factor: float = 10.0         # at most this many times the trained layers in total
    gates: Gates = Gates()
    gates_apply: bool = True

    @property
    def tokens(self) -> dict:
        return {"target": self.target_steps * self.batch_size * self.block_size,
                "distill": self.distill_steps * self.distill_batch_size * self.block_size}


FULL = Recipe(
    name="full",
    target=ModelShape(hidden=256, layers=4, heads=4, intermediate=672),
    draft=ModelShape(hidden=128, layers=2, heads=2, intermediate=320),
)
QUICK = Recipe(
    name="quick",
    target=ModelShape(hidden=128, layers=2, heads=4, intermediate=352),
    draft=ModelShape(hidden=64, layers=1, heads=2, intermediate=176),
    block_size=128,
    batch_size=8,
    max_chars=1_500_000,
    target_steps=40,
    distill_steps=20,
    warmup_steps=5,
    eval_blocks=16,
    n_prompts=16,
    continuation_tokens=24,
    cost_repeats=10,
    aim_ratio=4.0,
    max_grow_factor=2.0,
    gates_apply=False,
)

