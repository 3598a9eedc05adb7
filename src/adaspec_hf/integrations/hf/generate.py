"""Hugging Face entry points: ``enable(model)`` and an HF ``CandidateGenerator``.

``enable(model)`` makes ``model.generate(**inputs, assistant_model=draft, adaptive=True)`` run
the batched speculative engine and return exactly what HF returns. Without ``adaptive=True`` (given
to the call or saved in a ``GenerationConfig``), or ``candidate_generator=``, the call goes to HF's
own ``generate`` untouched. Importing this module changes nothing. The same engine is reachable
without ``enable`` through transformers' ``custom_generate`` (:mod:`adaspec_hf.integrations.hf.custom_generate`).

Every ``GenerationConfig`` option is either honoured with HF's meaning or refused with a message
naming it and the alternative: :data:`GENERATION_OPTIONS` is the table, :func:`check_options`
enforces it (an option this table does not know, e.g. from a newer transformers, is refused too).
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

from adaspec_hf.core.step import GenerationStats, SpeculativeDecoder
from adaspec_hf.compat import (
    CandidateGenerator, cache_kwargs, candidate_generator_override, decoder_only_output, execution_device,
    forward_parameters, generation_defaults, logits_processors, new_cache, output_cache,
    prepare_generated_length, prepare_generation_config,
)
from adaspec_hf.core.kv import KVState, check_cache_support
from adaspec_hf.core.proposer import TreeDrafter
from adaspec_hf.policies.base import Confidence, DraftPolicy, Heuristic, StaticChain, StepContext, StepOutcome
from adaspec_hf.core.processing import Processing
from adaspec_hf.policies.registry import make_policy

logger = logging.getLogger("adaspec_hf")

HONOURED = "honoured"
REFUSED = "refused"
_NO_ADAPTIVE = "call generate without adaptive=True"

GENERATION_OPTIONS: dict[str, tuple[str, str]] = {
    # --- length and stopping
    "max_length": (HONOURED, "prompt + new tokens, as in HF"),
    "max_new_tokens": (HONOURED, "unset everywhere: HF 5.x's 20 *new* tokens (capped by max_position_embeddings)"),
    "min_length": (HONOURED, "HF's MinLength processor on every drafted node"),
    "min_new_tokens": (HONOURED, "HF's MinNewTokens processor on every drafted node"),
    "max_time": (HONOURED, "checked between steps (HF checks between tokens)"),
    "stop_strings": (HONOURED, "needs tokenizer=, as in HF"),
    "eos_token_id": (HONOURED, "int or list"),
    "pad_token_id": (HONOURED, "fills finished rows, as in HF"),
    "bos_token_id": (HONOURED, "only used by HF without a prompt; adaptive=True needs one"),
    "early_stopping": (HONOURED, "beam-search option: no effect on greedy/sampling, as in HF"),
    "length_penalty": (HONOURED, "beam-search option: no effect on greedy/sampling, as in HF"),
    "decoder_start_token_id": (HONOURED, "encoder-decoder option: no effect on a decoder-only model, as in HF"),
    "encoder_no_repeat_ngram_size": (HONOURED, "HF's EncoderNoRepeatNGram processor (the prompt as 'encoder' ids)"),
    "is_assistant": (REFUSED, "HF's internal flag for an assistant's own drafting calls (it adds a confidence "
                              "stop and cache rollback); never set it on the target of adaptive=True"),
    # --- strategy
    "do_sample": (HONOURED, "lossless speculative sampling"),
    "num_beams": (REFUSED, f"beam search keeps several hypotheses per row, which speculative decoding does not; {_NO_ADAPTIVE}"),
    "num_return_sequences": (REFUSED, "one sequence per prompt row; repeat the rows instead "
                                      "(input_ids.repeat_interleave(n, 0), same for attention_mask)"),
    "use_mtp": (REFUSED, f"multi-token prediction is HF's other speculative method; {_NO_ADAPTIVE}"),
    "use_cache": (HONOURED, "use_cache=False: output identical (verification needs the engine's own cache)"),
    # --- cache
    "cache_implementation": (REFUSED, "adaptive=True keeps its own DynamicCache with holes (rejected drafts are "
                                      "masked, never copied); only None/'dynamic' apply: drop it (the output is "
                                      f"the same) or {_NO_ADAPTIVE}"),
    "cache_config": (REFUSED, "configures static/quantized/offloaded caches, which adaptive=True does not use; "
                              f"drop it or {_NO_ADAPTIVE}"),
    "max_cache_len": (REFUSED, "sizes a static cache, which adaptive=True does not use; drop it or "
                               f"{_NO_ADAPTIVE}"),
    "prefill_chunk_size": (REFUSED, "adaptive=True prefills each prompt in one forward; drop it or "
                                    f"{_NO_ADAPTIVE}"),
    # --- logits processors and warpers (applied to every tree node with HF's exact prefix)
    **{name: (HONOURED, "HF's logits processor on every drafted node") for name in (
        "repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size", "bad_words_ids",
        "renormalize_logits", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
        "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "sequence_bias",
        "watermarking_config",
    )},
    **{name: (HONOURED, "HF's warper (with do_sample=True, as in HF)") for name in (
        "temperature", "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff",
    )},
    "token_healing": (REFUSED, "rewrites the prompt's last tokens before decoding; heal the prompt first "
                               "(model.heal_tokens(input_ids, tokenizer=tok)) or " + _NO_ADAPTIVE),
    "guidance_scale": (REFUSED, "classifier-free guidance runs a second, unconditional forward per token that "
                                f"the speculative engine does not make; {_NO_ADAPTIVE}"),
    # --- outputs
    "output_scores": (HONOURED, "processed scores per step, finished rows included (HF's values)"),
    "output_logits": (HONOURED, "raw logits per step, finished rows included"),
    "return_dict_in_generate": (HONOURED, "GenerateDecoderOnlyOutput with the target's past_key_values "
                                          "(one extra target forward over the output)"),
    "output_attentions": (REFUSED, "the verify forward runs over draft trees and a cache with holes, so per-token "
                                   f"attentions in HF's layout do not exist; {_NO_ADAPTIVE}"),
    "output_hidden_states": (REFUSED, "the verify forward runs over draft trees, so per-token hidden states in "
                                      f"HF's layout do not exist; {_NO_ADAPTIVE}"),
    # --- assisted generation
    "num_assistant_tokens": (HONOURED, "the draft length: schedule 'constant' -> draft_policy='static-K', "
                                       "'heuristic'/'heuristic_transient' -> 'heuristic' starting at K"),
    "num_assistant_tokens_schedule": (HONOURED, "see num_assistant_tokens"),
    "assistant_confidence_threshold": (HONOURED, "-> draft_policy='confidence-T' (at most num_assistant_tokens)"),
    "prompt_lookup_num_tokens": (REFUSED, "prompt-lookup decoding drafts n-grams from the prompt, not from "
                                          f"assistant_model; {_NO_ADAPTIVE} (and without assistant_model)"),
    "max_matching_ngram_size": (REFUSED, f"a prompt-lookup decoding option; {_NO_ADAPTIVE}"),
    "assistant_early_exit": (REFUSED, "self-speculation with the target's early layers; pass a separate draft "
                                      f"model as assistant_model, or {_NO_ADAPTIVE}"),
    "assistant_lookbehind": (REFUSED, "universal assisted generation only (a draft with another tokenizer); "
                                      "adaptive=True needs a draft sharing the target's tokenizer"),
    "target_lookbehind": (REFUSED, "universal assisted generation only (a draft with another tokenizer); "
                                   "adaptive=True needs a draft sharing the target's tokenizer"),
    "assistant_ensemble_weight": (REFUSED, "verifies against a target/draft mixture (lossy); adaspec-hf is "
                                           f"lossless: drop it or {_NO_ADAPTIVE}"),
    "speculation_type": (REFUSED, f"selects another speculative method (e.g. 'dflash'); {_NO_ADAPTIVE}"),
    # --- performance
    "disable_compile": (HONOURED, "nothing is compiled by adaptive=True"),
    "compile_config": (REFUSED, "HF compiles the forward only with a static cache, which adaptive=True does not "
                                "use; torch.compile(model) yourself instead"),
    "continuous_batching_config": (REFUSED, "use adaspec_hf.Engine for continuous batching with speculation"),
    # --- decoding methods HF moved to the Hub
    **{name: (REFUSED, f"a decoding method HF moved to custom_generate repos; {_NO_ADAPTIVE}") for name in (
        "low_memory", "penalty_alpha", "dola_layers", "diversity_penalty", "num_beam_groups", "constraints",
        "force_words_ids",
    )},
}
"""Every ``GenerationConfig`` option: (``"honoured"`` | ``"refused"``, how / why and the alternative)."""

_NEUTRAL: dict[str, tuple] = {
    "num_beams": (1,), "num_return_sequences": (1,), "guidance_scale": (1.0,), "cache_implementation": ("dynamic",),
    "num_beam_groups": (1,), "diversity_penalty": (0.0,), "penalty_alpha": (0.0,),
}
"""Values that mean "off" besides None/False and HF's global default."""

_OWN_ENTRIES = ("adaptive", "draft_policy")
"""Our own settings, saved in a GenerationConfig as custom entries (HF carries them through)."""

DEFAULT_NUM_ASSISTANT_TOKENS = 20
"""HF's default draft length when only a schedule or threshold is set (GenerationConfig default)."""

GENERATE_ARGUMENTS: dict[str, tuple[str, str]] = {
    "logits_processor": (HONOURED, "applied after HF's own processors, on every drafted node"),
    "stopping_criteria": (HONOURED, "checked per emitted token"),
    "prefix_allowed_tokens_fn": (HONOURED, "HF's PrefixConstrainedLogitsProcessor (batch_id = prompt row)"),
    "streamer": (HONOURED, "batch size 1, as in HF"),
    "synced_gpus": (REFUSED, "multi-GPU lockstep decoding (DeepSpeed ZeRO-3) is not supported"),
    "negative_prompt_ids": (REFUSED, "only used by classifier-free guidance, which adaptive=True does not run"),
    "negative_prompt_attention_mask": (REFUSED, "only used by classifier-free guidance"),
    "attention_mask": (HONOURED, "left padding"),
    "token_type_ids": (HONOURED, "for models that take them; new tokens get the row's last type, as in HF"),
    "logits_to_keep": (HONOURED, "a memory option: prefill keeps 1 position, verification the ones it checks "
                                 "(HF's assisted decoding overrides it the same way)"),
    "inputs_embeds": (REFUSED, "drafts are verified as token ids: pass input_ids"),
    "past_key_values": (REFUSED, "continuing from a given cache is not supported: pass the whole prompt"),
    "cache": (REFUSED, "continuing from a given cache is not supported: pass the whole prompt"),
    "cache_position": (REFUSED, "positions come from attention_mask, as in HF generate"),
    "position_ids": (REFUSED, "positions come from attention_mask (left padding), as in HF generate"),
}
"""``generate`` arguments and model kwargs besides GenerationConfig options."""


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
        return _generate_with_candidate_generator(self, original, candidate_generator, *args, **kwargs)
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
    original = getattr(model, "_adaspec_original_generate", None)
    if original is not None:
        del model.generate
        if getattr(model, "_adaspec_own_generate", False):
            model.generate = original  # e.g. a custom_generate that from_pretrained installed
        model._adaspec_original_generate = None
    return model


def check_vocab(target: PreTrainedModel, draft: PreTrainedModel, tokenizer=None, assistant_tokenizer=None) -> None:
    """The draft must score the target's token ids; different tokenizers are HF's business."""
    hint = (
        "adaspec-hf needs a draft that shares the target's tokenizer. For a draft with a different "
        "tokenizer use HF's universal assisted generation instead: model.generate(..., "
        "assistant_model=draft, tokenizer=target_tokenizer, assistant_tokenizer=draft_tokenizer) "
        "without adaptive=True."
    )
    if assistant_tokenizer is not None and tokenizer is not None:
        if tokenizer.get_vocab() != assistant_tokenizer.get_vocab():
            raise ValueError("vocabulary mismatch between tokenizer and assistant_tokenizer. " + hint)
    vt, vd = target.config.vocab_size, draft.config.vocab_size
    if vt != vd:
        raise ValueError(f"vocabulary mismatch: target vocab_size={vt}, draft vocab_size={vd}. " + hint)


# --------------------------------------------------------------------------------------------- options
def _is_set(name: str, value: Any, defaults: dict[str, Any]) -> bool:
    """Whether an option asks for something: not None/False, not HF's default, not a neutral value."""
    if value is None or value is False:
        return False
    try:
        if name in defaults and bool(value == defaults[name]):
            return False
        return not any(bool(value == v) for v in _NEUTRAL.get(name, ()))
    except (RuntimeError, TypeError, ValueError):  # e.g. a tensor value: compared only by identity
        return True


def hf_generation_options() -> list[str]:
    """Every option a fresh ``GenerationConfig`` of the installed transformers carries."""
    return sorted(k for k in vars(GenerationConfig()) if not k.startswith("_") and k != "transformers_version")


def check_options(gen_config: GenerationConfig) -> None:
    """Refuse, naming it and the alternative, every option set in ``gen_config`` that adaptive=True
    cannot honour, including options this release's table does not know."""
    defaults = generation_defaults()
    for name in hf_generation_options():
        value = getattr(gen_config, name, None)
        if not _is_set(name, value, defaults):
            continue
        verdict, why = GENERATION_OPTIONS.get(name, (REFUSED, "an option this adaspec-hf does not know (newer "
                                                             f"transformers?), so it cannot honour it; {_NO_ADAPTIVE}"))
        if verdict == REFUSED:
            raise ValueError(f"adaptive=True does not support `{name}={value!r}`: {why}")
    wm = getattr(gen_config, "watermarking_config", None)
    if wm is not None and type(wm).__name__ != "WatermarkingConfig":
        raise ValueError(f"adaptive=True does not support `watermarking_config={type(wm).__name__}`: only the "
                         f"green-list WatermarkingConfig is a per-prefix logits processor; {_NO_ADAPTIVE}")


def _assistant_setting(name: str, sources: list, defaults: dict[str, Any]) -> Any:
    for cfg in sources:
        value = getattr(cfg, name, None) if cfg is not None else None
        if _is_set(name, value, defaults):
            return value
    return None


def policy_from_assistant_settings(gen_config: GenerationConfig, assistant_model: PreTrainedModel) -> DraftPolicy | None:
    """HF's draft-length settings as a draft policy, or None when none is set.

    HF reads them from ``assistant_model.generation_config``; set on the call (or its config) they
    win. The output is the same whatever the draft length: only the speed differs.
    """
    defaults = generation_defaults()
    sources = [gen_config, getattr(assistant_model, "generation_config", None)]
    k = _assistant_setting("num_assistant_tokens", sources, defaults)
    schedule = _assistant_setting("num_assistant_tokens_schedule", sources, defaults)
    threshold = _assistant_setting("assistant_confidence_threshold", sources, defaults)
    if k is None and schedule is None and threshold is None:
        return None
    k = int(k if k is not None else defaults.get("num_assistant_tokens", DEFAULT_NUM_ASSISTANT_TOKENS))
    if k < 0:
        raise ValueError(f"num_assistant_tokens must be >= 0, got {k}")
    schedule = schedule or "constant"
    if schedule not in ("constant", "heuristic", "heuristic_transient"):
        raise ValueError(f"num_assistant_tokens_schedule={schedule!r} is not one of HF's 'constant', "
                         "'heuristic', 'heuristic_transient'")
    if threshold is not None:
        if schedule != "constant":
            raise ValueError(f"adaptive=True cannot combine num_assistant_tokens_schedule={schedule!r} with "
                             f"assistant_confidence_threshold={threshold}: pass one of them, or draft_policy=")
        return Confidence(float(threshold), max_k=k)
    if schedule == "constant":
        return StaticChain(k)
    return Heuristic(start=max(k, 1))


def _settings_source(gen_config: GenerationConfig, assistant_model: PreTrainedModel) -> str:
    defaults = generation_defaults()
    names = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")
    where = []
    for label, cfg in (("the call", gen_config), ("assistant_model.generation_config",
                                                  getattr(assistant_model, "generation_config", None))):
        set_here = [n for n in names if cfg is not None and _is_set(n, getattr(cfg, n, None), defaults)]
        if set_here:
            where.append(f"{', '.join(set_here)} in {label}")
    return "; ".join(where)


def _choose_policy(draft_policy, gen_config: GenerationConfig, target: PreTrainedModel,
                   assistant_model: PreTrainedModel) -> DraftPolicy:
    """``draft_policy=`` (or a GenerationConfig's ``draft_policy``), else HF's assistant settings, else adaptive."""
    from_hf = policy_from_assistant_settings(gen_config, assistant_model)
    spec = draft_policy if draft_policy is not None else getattr(gen_config, "draft_policy", None)
    if spec is not None and from_hf is not None:
        raise ValueError(f"draft_policy={spec!r} conflicts with HF's draft-length settings "
                         f"({_settings_source(gen_config, assistant_model)}): pass one of them (unset the "
                         "others, e.g. assistant_model.generation_config.num_assistant_tokens = None)")
    if from_hf is not None:
        return from_hf
    return make_policy(spec, target, assistant_model, gen_config)


# ------------------------------------------------------------------------------------------ preparation
def _has_default(name: str, model: PreTrainedModel, generation_config: GenerationConfig | None, kwargs: dict) -> bool:
    """HF's test for "nobody set this length" (decides 20 *new* tokens vs an explicit max_length)."""
    return (kwargs.get(name) is None
            and (generation_config is None or getattr(generation_config, name, None) is None)
            and getattr(model.generation_config, name, None) is None)


def _check_model_kwargs(model: PreTrainedModel, model_kwargs: dict) -> None:
    for name, (verdict, why) in GENERATE_ARGUMENTS.items():
        if verdict == REFUSED and model_kwargs.get(name) is not None:
            raise ValueError(f"adaptive=True does not support `{name}`: {why}")
    tti = model_kwargs.get("token_type_ids")
    if tti is not None and "token_type_ids" not in forward_parameters(model):
        raise ValueError(f"`token_type_ids` given but {type(model).__name__}.forward takes none "
                         "(HF generate refuses unused model kwargs too)")
    keep = model_kwargs.get("logits_to_keep")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 0):
        raise ValueError(f"logits_to_keep must be an int >= 0, got {keep!r}")
    accepted = {"input_ids", "attention_mask", "use_cache", "token_type_ids", "logits_to_keep"}
    leftover = {k for k, v in model_kwargs.items() if v is not None} - accepted
    if leftover:
        raise ValueError(f"adaptive=True does not support model kwargs {sorted(leftover)}")


def _prepare(model: PreTrainedModel, inputs, generation_config, kwargs) -> tuple[GenerationConfig, dict]:
    gen_config, model_kwargs = prepare_generation_config(model, generation_config, kwargs)
    for name in _OWN_ENTRIES:  # ours, carried as kwargs when the model's config is HF's
        model_kwargs.pop(name, None)
    check_options(gen_config)
    if inputs is None:
        inputs = model_kwargs.pop("input_ids", None)
    else:
        model_kwargs.pop("input_ids", None)
    if inputs is None:
        raise ValueError("adaptive=True needs input_ids (an empty prompt cannot be speculated on)")
    model_kwargs["input_ids"] = inputs
    _check_model_kwargs(model, model_kwargs)
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
    tokenizer=None,
    assistant_tokenizer=None,
    **kwargs: Any,
):
    """``model.generate(..., assistant_model=draft, adaptive=True)``; see :func:`enable`.

    ``draft_policy`` picks how much to speculate: ``"adaptive"`` (default: the fitted efficiency
    model), ``"static-K"``, ``"heuristic"``, ``"confidence"``, ``"smartspec"`` or a
    :class:`~adaspec_hf.policies.base.DraftPolicy`; it may also be saved in the GenerationConfig, and HF's
    ``num_assistant_tokens`` / schedule / ``assistant_confidence_threshold`` map onto it. Options that
    cannot be honoured raise (see :data:`GENERATION_OPTIONS`). Statistics of the call are left in
    ``model.adaspec_stats`` (:class:`~adaspec_hf.core.step.GenerationStats`).
    """
    if assistant_model is None:
        raise ValueError("adaptive=True needs a draft model: pass assistant_model=draft")
    for name, value in (("synced_gpus", synced_gpus), ("negative_prompt_ids", negative_prompt_ids),
                        ("negative_prompt_attention_mask", negative_prompt_attention_mask)):
        if value is not None and value is not False:
            raise ValueError(f"adaptive=True does not support `{name}`: {GENERATE_ARGUMENTS[name][1]}")
    kwargs.pop("adaptive", None)  # custom_generate passes the caller's kwargs through
    check_cache_support(model)
    check_cache_support(assistant_model)
    check_vocab(model, assistant_model, tokenizer, assistant_tokenizer)
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
    policy = _choose_policy(draft_policy, gen_config, model, assistant_model)
    decoder = SpeculativeDecoder(
        model, assistant_model, policy, do_sample=bool(gen_config.do_sample), processors=processors,
        eos_token_id=eos, pad_token_id=pad, stopping_criteria=stopping,
        max_time=gen_config.max_time, output_scores=bool(gen_config.output_scores),
        output_logits=bool(gen_config.output_logits), streamer=streamer,
    )
    if token_type_ids is not None:
        result = decoder.generate(input_ids, attention_mask, max_new, token_type_ids=token_type_ids.to(device))
    else:
        result = decoder.generate(input_ids, attention_mask, max_new)
    model.adaspec_stats = result.stats
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



# ---------------------------------------------------------------------------------------------
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
        self.policy = make_policy(policy, None, draft, None)
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
        ctx = StepContext(rows=1, context_len=length, remaining=torch.tensor([10**9], device=ids.device),
                          sampling=self.do_sample, step=self.step)
        depth = self.policy.max_depth(ctx).clamp(min=0)
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


def _generate_with_candidate_generator(model, original_generate, generator: CandidateGenerator, *args, **kwargs):
    """Run HF's own assisted loop with our candidate generator in place of HF's."""
    if kwargs.get("assistant_model") is None:
        raise ValueError("candidate_generator= needs assistant_model=draft as well (HF picks its loop by it)")
    if isinstance(generator, AdaptiveCandidateGenerator):
        generator.reset()
    with candidate_generator_override(model, generator):
        return original_generate(*args, **kwargs)
