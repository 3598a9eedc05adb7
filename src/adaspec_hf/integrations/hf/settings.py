"""Which draft policy, under which :class:`~adaspec_hf.config.AdaptiveConfig`, a call runs.

Four places may say it, and each is honoured: ``draft_policy=`` (a name or a ready policy) and
``adaptive_config=`` on the call, the same two saved in a ``GenerationConfig`` (custom entries HF
carries through ``save_pretrained`` / ``from_pretrained``; the config as a plain dict), and HF's own
draft-length settings (``num_assistant_tokens`` / schedule / ``assistant_confidence_threshold``,
mapped onto the equivalent policy). The call wins over the saved config; two places at the same
level that disagree, or an explicit policy next to HF's settings, are an error rather than a guess.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from transformers import GenerationConfig, PreTrainedModel

from adaspec_hf.compat import generation_defaults
from adaspec_hf.config import AdaptiveConfig
from adaspec_hf.integrations.hf.options import is_set
from adaspec_hf.policies import Confidence, DraftPolicy, Heuristic, StaticChain
from adaspec_hf.policies.registry import make_policy

OWN_ENTRIES = ("adaptive", "draft_policy", "adaptive_config", "prompt_lookup")
"""Our own settings, saved in a GenerationConfig as custom entries (HF carries them through)."""

DEFAULT_NUM_ASSISTANT_TOKENS = 20
"""HF's default draft length when only a schedule or threshold is set (GenerationConfig default)."""


def _assistant_setting(name: str, sources: list, defaults: dict[str, Any]) -> Any:
    for cfg in sources:
        value = getattr(cfg, name, None) if cfg is not None else None
        if is_set(name, value, defaults):
            return value
    return None


def lookup_settings(gen_config: GenerationConfig, prompt_lookup: bool | None) -> tuple[dict[str, Any], int | None]:
    """Prompt lookup asked for by ``prompt_lookup=`` (else a GenerationConfig's ``prompt_lookup``) or
    by HF's ``prompt_lookup_num_tokens`` / ``max_matching_ngram_size``: (AdaptiveConfig fields,
    HF's fixed lookup length N or None)."""
    defaults = generation_defaults()
    if prompt_lookup is None:
        prompt_lookup = getattr(gen_config, "prompt_lookup", None)
    if prompt_lookup is not None and not isinstance(prompt_lookup, bool):
        raise ValueError(f"prompt_lookup must be True or False, got {prompt_lookup!r}")
    n = getattr(gen_config, "prompt_lookup_num_tokens", None)
    n = n if is_set("prompt_lookup_num_tokens", n, defaults) else None
    ngram = getattr(gen_config, "max_matching_ngram_size", None)
    ngram = ngram if is_set("max_matching_ngram_size", ngram, defaults) else None
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"prompt_lookup_num_tokens must be an integer >= 1, got {n!r}")
    if prompt_lookup is False and n is not None:
        raise ValueError("prompt_lookup=False conflicts with prompt_lookup_num_tokens: pass one of them")
    out: dict[str, Any] = {}
    if prompt_lookup or n is not None:
        out["prompt_lookup"] = True
        if ngram is not None:
            out["lookup_max_ngram"] = int(ngram)
            out["lookup_min_ngram"] = 1
    elif ngram is not None:
        raise ValueError("max_matching_ngram_size is a prompt-lookup option: pass prompt_lookup=True "
                         "(or prompt_lookup_num_tokens) with it")
    return out, n


def policy_from_assistant_settings(gen_config: GenerationConfig, assistant_model: PreTrainedModel | None) -> DraftPolicy | None:
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
        set_here = [n for n in names if cfg is not None and is_set(n, getattr(cfg, n, None), defaults)]
        if set_here:
            where.append(f"{', '.join(set_here)} in {label}")
    return "; ".join(where)


@dataclass(frozen=True)
class Choice:
    """The policy a call runs and the config that built it (None: a ready policy or HF's settings)."""

    policy: DraftPolicy
    config: AdaptiveConfig | None


def _level_config(draft_policy: Any, adaptive_config: Any, where: str) -> AdaptiveConfig | DraftPolicy | None:
    """One level's (the call's or a GenerationConfig's) ``draft_policy`` + ``adaptive_config``."""
    if isinstance(draft_policy, DraftPolicy):
        if adaptive_config is not None:
            raise ValueError(f"{where}: draft_policy is a ready {type(draft_policy).__name__}, which "
                             "adaptive_config cannot tune; pass one of them")
        return draft_policy
    if draft_policy is not None and not isinstance(draft_policy, str):
        raise TypeError(f"draft_policy must be a policy name or a DraftPolicy, got {type(draft_policy).__name__}")
    if adaptive_config is None:
        return None if draft_policy is None else AdaptiveConfig(policy=draft_policy)
    cfg = AdaptiveConfig.coerce(adaptive_config)
    names_policy = isinstance(adaptive_config, (AdaptiveConfig, str)) or (
        isinstance(adaptive_config, Mapping) and "policy" in adaptive_config)
    if draft_policy is not None:
        wanted = AdaptiveConfig(policy=draft_policy).policy  # normalised as the config normalises it
        if names_policy and cfg.policy != wanted:
            raise ValueError(f"{where}: draft_policy={draft_policy!r} conflicts with adaptive_config's "
                             f"policy={cfg.policy!r}; pass one of them (or the same name in both)")
        cfg = AdaptiveConfig.coerce(cfg, policy=wanted)
    return cfg


def choose_policy(gen_config: GenerationConfig, target: PreTrainedModel, assistant_model: PreTrainedModel | None, *,
                  draft_policy: Any = None, adaptive_config: Any = None, prompt_lookup: bool | None = None) -> Choice:
    """The call's policy/config, else the GenerationConfig's, else HF's assistant settings, else
    the default :class:`AdaptiveConfig` (the adaptive planner); prompt lookup from
    :func:`lookup_settings` on top (HF's ``prompt_lookup_num_tokens=N`` alone means ``static-N``)."""
    lookup, lookup_n = lookup_settings(gen_config, prompt_lookup)
    call = _level_config(draft_policy, adaptive_config, "generate()")
    if lookup_n is not None:
        if call is not None or getattr(gen_config, "draft_policy", None) is not None:
            raise ValueError(f"prompt_lookup_num_tokens={lookup_n} sets a fixed lookup length, which conflicts "
                             "with draft_policy/adaptive_config: pass prompt_lookup=True with the policy instead")
        call = AdaptiveConfig(policy=f"static-{lookup_n}")
    saved = _level_config(getattr(gen_config, "draft_policy", None), getattr(gen_config, "adaptive_config", None),
                          "generation_config")
    spec = call
    if isinstance(call, AdaptiveConfig) and isinstance(saved, AdaptiveConfig) and adaptive_config is None:
        spec = AdaptiveConfig.coerce(saved, policy=call.policy)  # the call's policy, the saved tunables
    elif call is None:
        spec = saved
    from_hf = policy_from_assistant_settings(gen_config, assistant_model) if assistant_model is not None else None
    if from_hf is not None and lookup:
        return Choice(from_hf, AdaptiveConfig(**lookup))  # the config carries the lookup settings only
    if spec is not None and from_hf is not None:
        shown = spec.policy if isinstance(spec, AdaptiveConfig) else type(spec).__name__
        raise ValueError(f"draft_policy={shown!r} conflicts with HF's draft-length settings "
                         f"({_settings_source(gen_config, assistant_model)}): pass one of them (unset the "
                         "others, e.g. assistant_model.generation_config.num_assistant_tokens = None)")
    if from_hf is not None:
        return Choice(from_hf, None)
    if isinstance(spec, DraftPolicy):
        return Choice(spec, AdaptiveConfig(**lookup) if lookup else None)
    cfg = AdaptiveConfig.coerce(spec, **lookup)
    return Choice(make_policy(cfg, target, assistant_model, sampling=bool(gen_config.do_sample)), cfg)
