"""The honoured-or-refused table for every HF generation option, and its enforcement.

Every ``GenerationConfig`` option is either honoured with HF's meaning or refused with a message
naming it and the alternative: :data:`GENERATION_OPTIONS` is the table, :func:`check_options`
enforces it (an option this table does not know, e.g. from a newer transformers, is refused too),
so no option is ever silently ignored. :data:`GENERATE_ARGUMENTS` does the same for ``generate``'s
other arguments and model kwargs.
"""
from __future__ import annotations

from typing import Any

from transformers import GenerationConfig, PreTrainedModel

from adaspec_hf.compat import forward_parameters, generation_defaults

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
    "prompt_lookup_num_tokens": (HONOURED, "-> prompt_lookup=True with draft_policy='static-N' (N lookup tokens "
                                           "per step, as HF; any batch size, with or without assistant_model)"),
    "max_matching_ngram_size": (HONOURED, "-> adaptive_config.lookup_max_ngram (the longest n-gram looked up)"),
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
    # --- adaspec's own (also saved in a GenerationConfig as custom entries)
    "adaptive": (HONOURED, "True runs the speculative engine; False (or unset) HF's own generate"),
    "draft_policy": (HONOURED, "a policy name ('static-4', 'adaptive', ...) or a DraftPolicy; shorthand for "
                               "adaptive_config's policy (both given and different: refused)"),
    "adaptive_config": (HONOURED, "an AdaptiveConfig, its to_dict() or a policy name: the policy and its "
                                  "planner tunables; saved as a dict in GenerationConfig.adaptive_config"),
    "prompt_lookup": (HONOURED, "True: draft by prompt lookup too (alone without assistant_model); shorthand "
                                "for adaptive_config.prompt_lookup"),
}
"""``generate`` arguments and model kwargs besides GenerationConfig options."""


# --------------------------------------------------------------------------------------------- options
def is_set(name: str, value: Any, defaults: dict[str, Any]) -> bool:
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
        if not is_set(name, value, defaults):
            continue
        verdict, why = GENERATION_OPTIONS.get(name, (REFUSED, "an option this adaspec-hf does not know (newer "
                                                             f"transformers?), so it cannot honour it; {_NO_ADAPTIVE}"))
        if verdict == REFUSED:
            raise ValueError(f"adaptive=True does not support `{name}={value!r}`: {why}")
    wm = getattr(gen_config, "watermarking_config", None)
    if wm is not None and type(wm).__name__ != "WatermarkingConfig":
        raise ValueError(f"adaptive=True does not support `watermarking_config={type(wm).__name__}`: only the "
                         f"green-list WatermarkingConfig is a per-prefix logits processor; {_NO_ADAPTIVE}")


def check_model_kwargs(model: PreTrainedModel, model_kwargs: dict) -> None:
    """Refuse the model kwargs :data:`GENERATE_ARGUMENTS` refuses, and any it does not list (HF
    would pass an unknown kwarg to the forward; the engine builds its own forward arguments)."""
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
