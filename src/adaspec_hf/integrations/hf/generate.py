"""Hugging Face entry points: ``enable(model)`` and ``generate(..., adaptive=True)``.

``enable(model)`` makes ``model.generate(**inputs, assistant_model=draft, adaptive=True)`` run
the batched speculative engine and return exactly what HF returns. Without ``adaptive=True`` (given
to the call or saved in a ``GenerationConfig``), or ``candidate_generator=``, the call goes to HF's
own ``generate`` untouched. Importing this module changes nothing. The same engine is reachable
without ``enable`` through transformers' ``custom_generate`` (:mod:`adaspec_hf.integrations.hf.custom_generate`).

Which options are honoured and which refused is :mod:`adaspec_hf.integrations.hf.options`; which
policy runs, :mod:`adaspec_hf.integrations.hf.settings`.
"""
from __future__ import annotations

import logging
import types
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    PreTrainedModel,
    StoppingCriteriaList,
    StopStringCriteria,
)

from adaspec_hf.compat import (
    CandidateGenerator, cache_kwargs, decoder_only_output, execution_device, forward_parameters, logits_processors,
    new_cache, output_cache, prepare_generated_length, prepare_generation_config,
)
from adaspec_hf.config import AdaptiveConfig
from adaspec_hf.core import SpeculativeDecoder, build_proposer
from adaspec_hf.core.architecture import check_cache_support
from adaspec_hf.core.processing import Processing
from adaspec_hf.integrations.hf.candidate import AdaptiveCandidateGenerator, generate_with_candidate_generator
from adaspec_hf.integrations.hf.options import GENERATE_ARGUMENTS, check_model_kwargs, check_options
from adaspec_hf.integrations.hf.settings import OWN_ENTRIES, choose_policy, lookup_settings
from adaspec_hf.core.vocab import check_vocab
from adaspec_hf.policies import DraftPolicy

logger = logging.getLogger("adaspec_hf")

__all__ = ["AdaptiveCandidateGenerator", "adaptive_generate", "check_vocab", "disable", "enable"]
"""``AdaptiveCandidateGenerator`` and ``check_vocab`` live in their own modules; importable from here
too, where callers found them before the split."""


# ---------------------------------------------------------------------------------------------- enable
def _call_adaptive(model: PreTrainedModel, args: tuple, kwargs: dict) -> bool:
    """``adaptive`` from the call's GenerationConfig, else the model's (HF merges custom entries so)."""
    config = kwargs.get("generation_config", args[1] if len(args) > 1 else None)
    for cfg in (config, getattr(model, "generation_config", None)):
        value = getattr(cfg, "adaptive", None) if cfg is not None else None
        if value is not None:
            return bool(value)
    return False


def _enabled_generate(self: PreTrainedModel, *args, adaptive: bool | None = None,
                      candidate_generator: CandidateGenerator | None = None, **kwargs):
    """HF's ``generate`` plus ``adaptive=`` (default: a GenerationConfig's ``adaptive``) and
    ``candidate_generator=``. Bound with ``types.MethodType`` so ``copy.deepcopy`` rebinds it."""
    original = self._adaspec_original_generate
    if candidate_generator is not None:
        if adaptive:
            raise ValueError("pass either adaptive=True or candidate_generator=, not both")
        return generate_with_candidate_generator(self, original, candidate_generator, *args, **kwargs)
    if adaptive is None:
        adaptive = _call_adaptive(self, args, kwargs)
    if not adaptive:
        return original(*args, **kwargs)
    return adaptive_generate(self, *args, **kwargs)


def enable(model: PreTrainedModel) -> PreTrainedModel:
    """Opt ``model`` in: its ``generate`` gains ``adaptive=True`` and ``candidate_generator=``."""
    check_cache_support(model)
    if getattr(model, "_adaspec_original_generate", None) is not None:
        return model
    # a bound method (or a custom_generate partial) of this instance: deepcopy rebinds both to the copy
    model._adaspec_original_generate = model.generate
    model._adaspec_own_generate = "generate" in vars(model)
    model.generate = types.MethodType(_enabled_generate, model)
    return model


def disable(model: PreTrainedModel) -> PreTrainedModel:
    """Undo :func:`enable`: the instance's ``generate`` is HF's (or its custom_generate) again."""
    original = getattr(model, "_adaspec_original_generate", None)
    if original is not None:
        del model.generate
        if getattr(model, "_adaspec_own_generate", False):
            model.generate = original  # e.g. a custom_generate that from_pretrained installed
        model._adaspec_original_generate = None
    return model


# ------------------------------------------------------------------------------------------ preparation
def _has_default(name: str, model: PreTrainedModel, generation_config: GenerationConfig | None, kwargs: dict) -> bool:
    """HF's test for "nobody set this length" (decides 20 *new* tokens vs an explicit max_length)."""
    return (kwargs.get(name) is None
            and (generation_config is None or getattr(generation_config, name, None) is None)
            and getattr(model.generation_config, name, None) is None)


def _prepare(model: PreTrainedModel, inputs, generation_config, kwargs) -> tuple[GenerationConfig, dict]:
    gen_config, model_kwargs = prepare_generation_config(model, generation_config, kwargs)
    for name in OWN_ENTRIES:  # ours, carried as kwargs when the model's config is HF's
        model_kwargs.pop(name, None)
    check_options(gen_config)
    if inputs is None:
        inputs = model_kwargs.pop("input_ids", None)
    else:
        model_kwargs.pop("input_ids", None)
    if inputs is None:
        raise ValueError("adaptive=True needs input_ids (an empty prompt cannot be speculated on)")
    model_kwargs["input_ids"] = inputs
    check_model_kwargs(model, model_kwargs)
    return gen_config, model_kwargs


def adaptive_generate(
    model: PreTrainedModel,
    inputs: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    logits_processor: LogitsProcessorList | None = None,
    stopping_criteria: StoppingCriteriaList | None = None,
    prefix_allowed_tokens_fn=None,
    synced_gpus: bool | None = None,
    assistant_model: PreTrainedModel | None = None,
    streamer=None,
    negative_prompt_ids=None,
    negative_prompt_attention_mask=None,
    *,
    draft_policy: str | DraftPolicy | None = None,
    adaptive_config: AdaptiveConfig | dict[str, Any] | str | None = None,
    prompt_lookup: bool | None = None,
    tokenizer=None,
    assistant_tokenizer=None,
    **kwargs: Any,
):
    """``model.generate(..., assistant_model=draft, adaptive=True)``; see :func:`enable`.

    ``draft_policy`` picks how much to speculate: ``"adaptive"`` (default: the fitted efficiency
    model, planning token trees when sampling and chains when greedy), ``"adaptive-chain"`` /
    ``"adaptive-tree"`` (one shape always), ``"static-K"``, ``"heuristic"``, ``"confidence"``, ``"smartspec"`` or a
    :class:`~adaspec_hf.policies.base.DraftPolicy`. ``adaptive_config`` (an
    :class:`~adaspec_hf.config.AdaptiveConfig`, its ``to_dict()`` or a policy name) carries the
    policy with its planner tunables; ``draft_policy="static-4"`` is shorthand for its ``policy``.
    Both may be saved in the GenerationConfig (``adaptive_config`` as a dict), and HF's
    ``num_assistant_tokens`` / schedule / ``assistant_confidence_threshold`` map onto a policy (see
    :mod:`~adaspec_hf.integrations.hf.settings`). Options that cannot be honoured raise (see
    :data:`~adaspec_hf.integrations.hf.options.GENERATION_OPTIONS`). Statistics of the call are left
    in ``model.adaspec_stats`` (:class:`~adaspec_hf.core.GenerationStats`), the AdaptiveConfig it
    ran under in ``model.adaspec_config`` (None when a ready DraftPolicy or HF's draft-length
    settings chose the policy).

    ``prompt_lookup=True`` also drafts by prompt lookup (n-grams of each row's own text, no forward):
    alone when ``assistant_model`` is None, else merged with the draft model's tree, the policy
    verifying what pays (see :mod:`adaspec_hf.core.lookup`). HF's ``prompt_lookup_num_tokens=N``
    means the same with ``draft_policy="static-N"``.
    """
    for name, value in (("synced_gpus", synced_gpus), ("negative_prompt_ids", negative_prompt_ids),
                        ("negative_prompt_attention_mask", negative_prompt_attention_mask)):
        if value is not None and value is not False:
            raise ValueError(f"adaptive=True does not support `{name}`: {GENERATE_ARGUMENTS[name][1]}")
    kwargs.pop("adaptive", None)  # custom_generate passes the caller's kwargs through
    check_cache_support(model)
    if assistant_model is not None:
        check_cache_support(assistant_model)
        check_vocab(model, assistant_model, tokenizer, assistant_tokenizer)
    elif assistant_tokenizer is not None:
        raise ValueError("assistant_tokenizer= was given without assistant_model=")
    gen_config, model_kwargs = _prepare(model, inputs, generation_config, kwargs)
    input_ids = model_kwargs["input_ids"]
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a (batch, length) LongTensor")
    if input_ids.shape[1] == 0:
        raise ValueError("empty prompt: input_ids has length 0")
    device = execution_device(model)
    input_ids = input_ids.to(device)
    batch = input_ids.shape[0]
    if streamer is not None and batch > 1:
        raise ValueError("streamer supports batch size 1 only (as in HF generate)")
    eos = gen_config.eos_token_id
    pad = gen_config.pad_token_id
    if pad is None:
        pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else None
    attention_mask = model_kwargs.get("attention_mask")
    if attention_mask is None:
        if pad is not None and gen_config.pad_token_id is not None and (eos is None or pad not in ([eos] if isinstance(eos, int) else eos)):
            attention_mask = (input_ids != pad).long()
        else:
            attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device)
    token_type_ids = model_kwargs.get("token_type_ids")
    input_len = input_ids.shape[1]
    gen_config = prepare_generated_length(
        model, gen_config, _has_default("max_length", model, generation_config, kwargs),
        _has_default("min_length", model, generation_config, kwargs), input_ids,
    )
    max_new = gen_config.max_length - input_len
    if max_new < 1:
        raise ValueError(f"nothing to generate: max_length={gen_config.max_length} <= prompt length {input_len} "
                         "(set max_new_tokens)")
    processors = logits_processors(
        model, gen_config, input_ids, logits_processor, model_kwargs,
        has_attention_mask=model_kwargs.get("attention_mask") is not None,
        prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
    )
    stopping = StoppingCriteriaList(stopping_criteria or [])
    if gen_config.stop_strings is not None:
        if tokenizer is None:
            raise ValueError("stop_strings need tokenizer= (as in HF generate)")
        stopping.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=gen_config.stop_strings))
    if assistant_model is None and not lookup_settings(gen_config, prompt_lookup)[0]:
        raise ValueError("adaptive=True needs a draft model: pass assistant_model=draft, or prompt_lookup=True "
                         "to draft by prompt lookup alone")
    choice = choose_policy(gen_config, model, assistant_model, draft_policy=draft_policy,
                           adaptive_config=adaptive_config, prompt_lookup=prompt_lookup)
    extra: dict[str, Any] = {}
    if choice.config is not None:
        extra["compaction_threshold"] = choice.config.compaction_threshold
    lookup_cfg = choice.config if choice.config is not None else AdaptiveConfig()
    extra["proposer"] = build_proposer(lookup_cfg, choice.policy, has_draft=assistant_model is not None)
    decoder = SpeculativeDecoder(
        model, assistant_model, choice.policy, do_sample=bool(gen_config.do_sample), processors=processors,
        eos_token_id=eos, pad_token_id=pad, stopping_criteria=stopping,
        max_time=gen_config.max_time, output_scores=bool(gen_config.output_scores),
        output_logits=bool(gen_config.output_logits), streamer=streamer, **extra,
    )
    if token_type_ids is not None:
        result = decoder.generate(input_ids, attention_mask, max_new, token_type_ids=token_type_ids.to(device))
    else:
        result = decoder.generate(input_ids, attention_mask, max_new)
    result.stats.config = choice.config.to_dict() if choice.config is not None else None
    model.adaspec_stats = result.stats
    model.adaspec_config = choice.config
    if not gen_config.return_dict_in_generate:
        return result.sequences
    scores, logits, cache = _complete_outputs(model, result, processors, input_ids, attention_mask, token_type_ids)
    return decoder_only_output(result.sequences, scores=scores, logits=logits, cache=cache)


# ------------------------------------------------------------------------------------ HF-shaped outputs
@torch.no_grad()
def _complete_outputs(model, result, processors, input_ids, attention_mask, token_type_ids):
    """What HF returns beyond the engine's own results: the target's cache over the output (all but
    the last token, left-padded as HF's), and the scores/logits HF computes for rows that finished
    early (it keeps decoding them on pad tokens; the engine drops them from the batch).

    One target forward over the output (the engine's cache has holes, so it cannot be returned).
    """
    seqs = result.sequences
    b, p = input_ids.shape
    width = seqs.shape[1] - p
    context = seqs[:, :-1]
    mask = torch.cat([attention_mask.long(), attention_mask.new_ones(b, context.shape[1] - p)], dim=1)
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    extra: dict[str, Any] = {}
    params = forward_parameters(model)
    if "logits_to_keep" in params:
        extra["logits_to_keep"] = width
    if token_type_ids is not None:
        tti = token_type_ids.to(seqs.device)
        extra["token_type_ids"] = torch.cat([tti, tti[:, -1:].expand(b, context.shape[1] - p)], dim=1)
    if "position_ids" in params:  # BLOOM takes none: its ALiBi positions come from the mask's cumsum
        extra["position_ids"] = position_ids
    out = model(input_ids=context, attention_mask=mask, **cache_kwargs(model, new_cache()), **extra)
    cache = output_cache(out)
    scores, logits = result.scores, result.logits
    if scores is None and logits is None:
        return None, None, cache
    n_gen = [len(t) for t in result.new_tokens]
    late = [(r, t) for r in range(b) for t in range(n_gen[r], width)]
    if not late:
        return scores, logits, cache
    raw = out.logits[:, -width:].float()  # step t's logits sit at output position p + t - 1
    rows = torch.tensor([r for r, _ in late], device=raw.device)
    steps = torch.tensor([t for _, t in late], device=raw.device)
    late_raw = raw[rows, steps]
    late_scores = Processing(processors, batch_size=b)(
        late_raw, lambda: [(r, seqs[r, : p + t]) for r, t in late])
    scores = _fill(scores, late, late_scores)
    logits = _fill(logits, late, late_raw)
    return scores, logits, cache


def _fill(per_step, late: list[tuple[int, int]], values: torch.Tensor):
    if per_step is None:
        return None
    per_step = [s.clone() for s in per_step]
    for i, (r, t) in enumerate(late):
        per_step[t][r] = values[i].to(per_step[t].dtype)
    return tuple(per_step)

