"""The decoding methods a benchmark compares, by name: plain ``generate``, HF assisted generation, ours.

Each method is one callable ``(target, draft, ids, mask, gen_kw) -> RunOutput`` so the harness can time
them all on the same batches; names are the ones the CLI and the result tables use (``vanilla``,
``hf-assisted``, ``hf-assisted-heuristic``, ``hf-assisted-kK``, ``hf-prompt-lookup-kK`` (HF's own
prompt lookup, batch 1), any draft policy name, ``lookup:POLICY`` (our prompt lookup alone, no draft
model) or ``POLICY+lookup`` (the draft model and prompt lookup merged)).
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Callable

import torch

from adaspec_hf.integrations.hf.generate import adaptive_generate
from adaspec_hf.policies.registry import lookup


@dataclass
class RunOutput:
    sequences: torch.Tensor
    new_tokens: int
    accepted_per_step: float | None = None
    mean_draft_len: float | None = None
    target_forwards: int | None = None
    config: dict | None = None  # the AdaptiveConfig that ran (adaspec methods)
    decision_share: float | None = None  # share of step time inside the policy's calls
    idle_levels: float | None = None  # draft levels per step beyond the deepest verified node


MethodFn = Callable[..., RunOutput]


@dataclass
class Method:
    name: str
    fn: MethodFn
    batch1_only: bool = False


def _vanilla(target, draft, ids, mask, gen_kw) -> RunOutput:
    seq = target.generate(input_ids=ids, attention_mask=mask, **gen_kw)
    return RunOutput(seq, 0, None, None, seq.shape[1] - ids.shape[1])


def _hf_assisted(schedule: str | None, k: int | None):
    def run(target, draft, ids, mask, gen_kw) -> RunOutput:
        saved = copy.deepcopy(draft.generation_config)
        try:
            kw = dict(gen_kw)
            if k is not None:  # isolate overhead: constant k, confidence threshold off
                kw.update(num_assistant_tokens=k, num_assistant_tokens_schedule="constant",
                          assistant_confidence_threshold=0.0)
                draft.generation_config.num_assistant_tokens = k
                draft.generation_config.num_assistant_tokens_schedule = "constant"
                draft.generation_config.assistant_confidence_threshold = 0.0
            elif schedule is not None:
                kw.update(num_assistant_tokens_schedule=schedule)
                draft.generation_config.num_assistant_tokens_schedule = schedule
            seq = _original_generate(target)(input_ids=ids, attention_mask=mask, assistant_model=draft, **kw)
        finally:
            draft.generation_config = saved
        return RunOutput(seq, 0)
    return run


def _ours(policy: str, lookup: str | None = None):
    """``lookup``: None (the draft model), "alone" (prompt lookup, no draft model) or "merged"."""
    def run(target, draft, ids, mask, gen_kw) -> RunOutput:
        kw = dict(gen_kw)
        if lookup is not None:
            kw["prompt_lookup"] = True
        seq = adaptive_generate(target, input_ids=ids, attention_mask=mask,
                                assistant_model=None if lookup == "alone" else draft, draft_policy=policy, **kw)
        st = target.adaspec_stats
        return RunOutput(seq, 0, st.accepted_per_step, st.mean_draft_len, st.target_forwards, st.config,
                         st.decision_share, st.idle_levels_per_step)
    return run


def _hf_prompt_lookup(k: int):
    def run(target, draft, ids, mask, gen_kw) -> RunOutput:
        seq = _original_generate(target)(input_ids=ids, attention_mask=mask, prompt_lookup_num_tokens=k, **gen_kw)
        return RunOutput(seq, 0)
    return run


def _original_generate(model):
    return getattr(model, "_adaspec_original_generate", None) or model.generate


def planner_shapes(sampling: bool) -> tuple[str, str]:
    """(tree method, chain method) of the planner in one decoding mode: the default ``adaptive`` is
    one of the two (trees when sampling, chains when greedy), the other is named by its shape."""
    return ("adaptive", "adaptive-chain") if sampling else ("adaptive-tree", "adaptive")


def our_methods(sampling: bool) -> list[str]:
    """What a benchmark runs as ours in one mode: the default first, then the planner's other shape."""
    return ["adaptive", *(m for m in planner_shapes(sampling) if m != "adaptive")]


def resolve_method(name: str) -> Method:
    """The method called ``name``; an unknown draft policy name raises here, before any timing."""
    if name == "vanilla":
        return Method(name, _vanilla)
    if name == "hf-assisted":
        return Method(name, _hf_assisted(None, None), batch1_only=True)
    if name == "hf-assisted-heuristic":
        return Method(name, _hf_assisted("heuristic", None), batch1_only=True)
    if m := re.fullmatch(r"hf-assisted-k(\d+)", name):
        return Method(name, _hf_assisted("constant", int(m.group(1))), batch1_only=True)
    if m := re.fullmatch(r"hf-prompt-lookup-k(\d+)", name):
        return Method(name, _hf_prompt_lookup(int(m.group(1))), batch1_only=True)
    if m := re.fullmatch(r"lookup:(.+)", name):  # prompt lookup alone, under a policy
        lookup(m.group(1))
        return Method(name, _ours(m.group(1), "alone"))
    if m := re.fullmatch(r"(.+)\+lookup", name):  # the draft model and prompt lookup merged
        lookup(m.group(1))
        return Method(name, _ours(m.group(1), "merged"))
    lookup(name)  # an unknown policy name raises here, before any timing
    return Method(name, _ours(name))
