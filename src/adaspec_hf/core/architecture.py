"""Which architectures a cache with holes can drive exactly, and how each wants its 4-D mask.

A rejected draft stays in the cache as a masked-out *hole*, and tree siblings share a position, so
anything a model applies by cache *slot* rather than through the mask or explicit positions
(running recurrent states, GPT-Neo's local windows, Llama 4's chunks) would see tokens HF's own
decoding does not: such models are refused up front, saying why and what to use instead.
"""
from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedModel

from adaspec_hf.compat import CACHE_ARG_NAMES, cache_arg_name, forward_parameters

SUPPORTED_ATTENTION = ("sdpa", "eager")
MASKABLE_LAYER_TYPES = ("full_attention", "sliding_attention")
RECURRENT_LAYER_TYPES = ("linear_attention", "mamba", "conv", "recurrent", "ssm")
"""Layer types that keep a running state instead of per-token keys/values: a rejected draft token
cannot be masked out of such a state afterwards, so tree verification cannot be lossless."""
RECURRENT_MODEL_TYPES = ("mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm", "recurrent_gemma")
ALIBI_FROM_POSITIONS = ("bloom", "mpt")
"""ALiBi models (no ``position_ids``) whose bias we rebuild from explicit key positions
(see compat.alibi_from_positions): MPT's would otherwise follow cache slots, which holes and tree
siblings separate from the tokens' positions."""
_HF_ASSISTED = "use HF's assisted generation instead: generate(..., assistant_model=draft) without adaptive=True"


@dataclass(frozen=True)
class MaskSpec:
    """How a model wants its 4-D mask: one mask, or one per layer type (hybrid models)."""

    window: int | None  # sliding window for the single mask (Mistral-style), else None
    per_layer_type: tuple[str, ...] | None = None  # layer types when the model takes a dict
    layer_window: int | None = None  # window of "sliding_attention" layers in the dict case


def mask_spec_for(model: PreTrainedModel) -> MaskSpec:
    """Read the attention layout from the config; refuse layouts we cannot mask exactly."""
    cfg = model.config
    name = type(model).__name__
    _check_architecture(model)
    impl = getattr(cfg, "_attn_implementation", None) or "eager"
    if impl not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"{type(model).__name__} uses attn_implementation={impl!r}; adaspec-hf needs a custom "
            f"4-D float mask for tree verification, which only {SUPPORTED_ATTENTION} accept. Load the "
            "model with attn_implementation='sdpa' (or 'eager')."
        )
    layer_types = getattr(cfg, "layer_types", None)
    window = getattr(cfg, "sliding_window", None)
    if layer_types:
        kinds = set(layer_types)
        recurrent = sorted(kinds & set(RECURRENT_LAYER_TYPES))
        if recurrent:
            raise ValueError(
                f"{name} has {recurrent} layers (config.layer_types): they keep a running state instead of "
                "per-token keys and values, so rejected draft tokens cannot be masked out of them and tree "
                f"verification cannot be lossless; {_HF_ASSISTED}")
        unknown = kinds - set(MASKABLE_LAYER_TYPES)
        if unknown:
            raise ValueError(
                f"unsupported attention layer types {sorted(unknown)} in {name} (config.layer_types): "
                f"adaspec-hf builds exact tree masks for {MASKABLE_LAYER_TYPES} layers only (e.g. Llama 4's "
                f"chunked_attention layers need a per-chunk mask it does not build); {_HF_ASSISTED}")
        if "sliding_attention" in kinds:
            if not window:
                raise ValueError("sliding_attention layers but no config.sliding_window")
            return MaskSpec(window=None, per_layer_type=tuple(sorted(kinds)), layer_window=int(window))
        return MaskSpec(window=None)
    if window and getattr(cfg, "use_sliding_window", True):
        return MaskSpec(window=int(window))
    return MaskSpec(window=None)


def _check_architecture(model: PreTrainedModel) -> None:
    """Refuse, saying why, architectures whose state or windows a cache with holes cannot represent."""
    cfg = model.config
    if getattr(cfg, "model_type", None) in RECURRENT_MODEL_TYPES:
        raise ValueError(
            f"{type(model).__name__} ({cfg.model_type}) is a recurrent/state-space model: it keeps one running "
            "state per row instead of per-token keys and values, so a rejected draft token cannot be dropped "
            f"from it and tree verification cannot be lossless; {_HF_ASSISTED}")
    _check_local_attention(model)


def _check_local_attention(model: PreTrainedModel) -> None:
    """GPT-Neo-style local layers window by *cache slot* inside the attention module, not via the mask.

    With holes (rejected drafts) and tree nodes, slot distance exceeds position distance, so such a
    window would hide keys HF's own decoding sees; a window at least as long as any sequence is a no-op.
    """
    cfg = model.config
    kinds = set(getattr(cfg, "attention_layers", None) or ())
    window = getattr(cfg, "window_size", None)
    if "local" in kinds and window is not None and window < getattr(cfg, "max_position_embeddings", window + 1):
        raise ValueError(
            f"{type(model).__name__} has local attention layers (config.attention_layers, window_size={window}) "
            "whose window is applied by cache slot index inside the attention module, not through the "
            "attention mask; over a cache with holes (rejected drafts) it would hide tokens HF's own "
            f"decoding attends to; {_HF_ASSISTED}")


def check_cache_support(model: PreTrainedModel) -> None:
    """A model we cannot drive through a DynamicCache gets a clear error up front, saying why."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError("adaspec-hf supports decoder-only causal LMs; got an encoder-decoder model")
    # config.use_cache=False is only a default (training configs often carry it): the engine passes
    # use_cache=True itself. What matters is that the forward can take and fill a cache.
    name = type(model).__name__
    _check_architecture(model)
    params = forward_parameters(model)
    if cache_arg_name(model) is None:
        raise ValueError(f"{name}.forward takes no KV cache argument "
                         f"({' / '.join(CACHE_ARG_NAMES)}): no KV cache support")
    model_type = getattr(model.config, "model_type", None)
    needed = ("attention_mask",) if model_type in ALIBI_FROM_POSITIONS else ("position_ids", "attention_mask")
    for arg in needed:
        if arg not in params:
            raise ValueError(f"{name}.forward takes no `{arg}`: adaspec-hf verifies drafts at explicit "
                             "positions under a 4-D mask, so it needs both; no KV cache support for "
                             f"speculation here; {_HF_ASSISTED}")
    mask_spec_for(model)
