"""adaspec's drafter as an HF ``CandidateGenerator``, for HF's own assisted loop (batch size 1).

The engine (``generate(adaptive=True)``) verifies batched draft trees itself; this is the other
plug point: HF's loop verifies, adaspec's draft policy decides how much to draft.
"""
from __future__ import annotations

import torch
from transformers import LogitsProcessorList, PreTrainedModel

from adaspec_hf.compat import CandidateGenerator, candidate_generator_override, execution_device
from adaspec_hf.core.architecture import check_cache_support
from adaspec_hf.core.kv import KVState
from adaspec_hf.core.processing import Processing
from adaspec_hf.core.proposer import TreeDrafter
from adaspec_hf.policies import DraftPolicy, StepContext, StepOutcome
from adaspec_hf.policies.registry import make_policy

UNBOUNDED_REMAINING = 10**9
"""HF's loop owns the length limit; the policy is told there is no budget left to respect."""
DEFAULT_MAX_DRAFT = 32
"""Draft tokens per iteration for a policy without a fixed bound (HF's own default schedules stay below it)."""


class AdaptiveCandidateGenerator(CandidateGenerator):
    """HF ``CandidateGenerator`` driven by adaspec's drafter and a draft policy (batch size 1).

    For users who want HF's own assisted loop::

        gen = AdaptiveCandidateGenerator(draft, policy="heuristic")
        model.generate(**inputs, assistant_model=draft, candidate_generator=gen)   # after enable()

    The draft cache is kept with holes exactly as in the engine: tokens HF rejects are masked,
    never recomputed.
    """

    def __init__(self, draft: PreTrainedModel, policy: str | DraftPolicy | None = "heuristic",
                 logits_processor: LogitsProcessorList | None = None, do_sample: bool = False):
        check_cache_support(draft)
        self.draft = draft
        self.policy = make_policy(policy, None, draft, sampling=do_sample)
        limit = self.policy.depth_limit
        # at least 1: HF's loop needs a candidate every iteration (a zero depth drafts one, below)
        self.max_draft = max(int(limit) if limit is not None else DEFAULT_MAX_DRAFT, 1)
        self.process = Processing(logits_processor)
        self.do_sample = do_sample
        self.reset()

    def reset(self) -> None:
        self.kv: KVState | None = None
        self.seen = 0
        self.last_tree = None
        self.step = 0
        self.policy.reset()

    def _sync_with(self, ids: torch.Tensor) -> None:
        """Commit the fed draft nodes that HF accepted; start over if the prompt changed."""
        if self.kv is None:
            self.kv = KVState(self.draft)
            if ids.shape[1] > 1:
                self.kv.prefill(ids[:, :-1], torch.ones_like(ids[:, :-1]))
                self.seen = ids.shape[1] - 1
            else:
                self.kv.valid = torch.zeros(1, 0, dtype=torch.bool, device=ids.device)
                self.kv.pos = torch.zeros(1, 0, dtype=torch.long, device=ids.device)
                self.seen = 0
            return
        tree = self.last_tree
        if tree is not None and tree.width:
            ok = torch.zeros_like(tree.valid)
            for j in range(tree.width):  # a chain: node j sits at position seen_before + j
                col = self._tree_base + j
                if col < ids.shape[1] and int(ids[0, col]) == int(tree.tokens[0, j]) and (j == 0 or bool(ok[0, j - 1])):
                    ok[0, j] = True
            fed = ok & (tree.draft_slot >= 0)
            self.kv.commit(tree.draft_slot, fed)
            self.seen += int(fed.sum())
        self.last_tree = None

    @torch.no_grad()
    def get_candidates(self, input_ids: torch.LongTensor, **kwargs) -> tuple[torch.LongTensor, torch.Tensor | None]:
        if input_ids.shape[0] != 1:
            raise ValueError("AdaptiveCandidateGenerator supports batch size 1 (HF's assisted loop)")
        dev = input_ids.device
        ids = input_ids.to(execution_device(self.draft))
        self._sync_with(ids)
        length = torch.tensor([ids.shape[1]], device=ids.device)
        self.step += 1
        ctx = StepContext(rows=1, context_len=length, remaining=torch.tensor([UNBOUNDED_REMAINING], device=ids.device),
                          sampling=self.do_sample, step=self.step)
        depth = self.policy.max_depth(ctx).clamp(min=0, max=self.max_draft)
        if int(depth[0]) == 0:
            depth = torch.ones_like(depth)  # HF's loop needs at least one candidate
        count = length - self.seen
        toks = ids[:, self.seen:]
        drafter = TreeDrafter(self.kv, self.do_sample)
        root = drafter.catch_up(toks, torch.tensor([self.seen], device=ids.device), count)
        self.seen = ids.shape[1]
        prefix_of = lambda rows, paths: [(0, torch.cat([ids[0], p.to(ids.device)])) for p in paths]  # noqa: E731
        tree = drafter.grow(root, self.policy, ctx, depth, self.process, prefix_of)
        self.last_tree, self._tree_base = tree, ids.shape[1]
        cand = torch.cat([ids, tree.tokens[:, : int(tree.n_nodes[0])]], dim=1).to(dev)
        return cand, None

    @property
    def num_drafting_tokens(self) -> int:
        """The most tokens one iteration drafts (transformers >= 5.25 reads it to keep that many
        steps of a recurrent layer's state for rollback): the policy's depth limit, to which drafts
        are clamped."""
        return self.max_draft

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int):
        tree = self.last_tree
        if tree is None:
            return
        n = tree.width
        acc = torch.arange(n, device=tree.tokens.device)[None, :] < num_matches
        tested = torch.arange(n, device=tree.tokens.device)[None, :] <= num_matches
        self.policy.observe(StepOutcome(
            tree=tree, n_accepted=torch.tensor([num_matches]), tested=tested & tree.valid,
            accept_prob=acc.float(), accepted=acc & tree.valid, step_time=0.0, draft_time=0.0,
            verify_time=0.0, context_len=torch.tensor([input_ids.shape[1]]),
        ))


def generate_with_candidate_generator(model, original_generate, generator: CandidateGenerator, *args, **kwargs):
    """Run HF's own assisted loop with our candidate generator in place of HF's."""
    if kwargs.get("assistant_model") is None:
        raise ValueError("candidate_generator= needs assistant_model=draft as well (HF picks its loop by it)")
    if isinstance(generator, AdaptiveCandidateGenerator):
        generator.reset()
    with candidate_generator_override(model, generator):
        return original_generate(*args, **kwargs)
