"""Every contact with transformers internals that moves between releases.

Supported range: transformers 5.17 (lowest, tested in CI) up to the newest 5.x. Each helper detects
the feature it needs (a forward parameter, an output field, a method's parameters) instead of
comparing version strings, so a release that renames something fails here, in one place, with a
clear message — and the rest of the package never names the moving part.

What moves, and how each is guarded:

- The KV-cache forward argument: ``past_key_values`` up to 5.23, ``cache`` from 5.24 (the old
  name still works there through a shim that warns on every call). :func:`cache_kwargs` reads the
  model's ``forward`` signature once per class and passes the name it declares.
- The output field holding the cache: ``.past_key_values`` / ``.cache`` (:func:`output_cache`),
  and the same field in ``GenerateDecoderOnlyOutput`` (:func:`decoder_only_output`).
- Cache layers: ``DynamicCache().layers[i].keys/.values`` (5.x); layers not yet filled carry
  ``is_initialized=False`` (:func:`cache_layers`).
- ``GenerationMixin._prepare_generation_config`` (merging kwargs into a config copy),
  ``_prepare_special_tokens`` (the ``_eos_token_tensor``/``_pad_token_tensor`` that min-length,
  bad-words and other processors read; ``generate`` sets them, so callers outside it must too),
  ``_get_logits_processor`` (HF's kwargs -> processors): :func:`prepare_generation_config`,
  :func:`logits_processors`. Keyword arguments are filtered by the method's signature, so an
  added or dropped optional parameter does not break us.
- The assisted-generation plug point ``_get_candidate_generator`` and the ``CandidateGenerator``
  base class (:func:`candidate_generator_override`, :data:`CandidateGenerator`).
- ``GenerationConfig._get_default_generation_params`` (the values ``generate`` fills in when nobody
  set them; an option differing from it was set by someone): :func:`generation_defaults`.
- ``GenerationMixin._prepare_generated_length`` (``max_new_tokens`` / ``max_length`` / min-length
  resolution, incl. "20 *new* tokens" when nothing is set): :func:`prepare_generated_length`.
- ``torch.compile`` wrappers (``OptimizedModule._orig_mod``) hide the model's ``forward`` signature:
  :func:`unwrap_compiled`; accelerate offload hooks (``_hf_hook.execution_device``) make
  ``model.device`` report ``meta`` for weights offloaded to disk: :func:`execution_device`.
- ALiBi models take no ``position_ids``. BLOOM's ``transformer.build_alibi_tensor(attention_mask,
  num_heads, dtype)`` derives key positions from a 2-D mask's cumsum (one bias row per batch row);
  MPT's ``transformer.build_mpt_alibi_tensor(num_heads, max_seq_len, alibi_bias_max, device)``
  builds one (heads, 1, max_seq_len) bias for the whole batch that each attention layer slices by
  key *slot*. Under a 4-D tree mask over a cache with holes, :func:`alibi_from_positions` makes
  either builder return the bias of the cache's explicit key positions for one forward; MPT's bias
  has no batch dimension, so it is built for one row (:func:`alibi_per_row` says which kind).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Iterator

import torch
from transformers import DynamicCache, GenerationConfig, LogitsProcessorList, PreTrainedModel
from transformers.generation.candidate_generator import CandidateGenerator
from transformers.generation.utils import GenerateDecoderOnlyOutput

__all__ = [
    "CandidateGenerator", "cache_kwargs", "cache_arg_name", "output_cache", "new_cache", "cache_layers",
    "decoder_only_output", "prepare_generation_config", "prepare_special_tokens", "logits_processors",
    "candidate_generator_override", "forward_parameters", "generation_defaults", "prepare_generated_length",
    "unwrap_compiled", "execution_device", "alibi_from_positions", "alibi_per_row",
]

CACHE_ARG_NAMES = ("cache", "past_key_values")  # newest first
"""Names a causal LM's ``forward`` has used for its KV cache argument (5.24 renamed the latter)."""


@functools.lru_cache(maxsize=None)
def _forward_parameters(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def unwrap_compiled(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a ``torch.compile`` wrapper (whose own ``forward`` is ``(*args, **kwargs)``)."""
    while isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
        model = model._orig_mod
    return model


def forward_parameters(model: torch.nn.Module) -> frozenset[str]:
    """The parameter names of ``model.forward`` (cached per class: signature reads are slow)."""
    model = unwrap_compiled(model)
    if "forward" in vars(model):  # an instance-level override (hooks, wrappers)
        return frozenset(inspect.signature(model.forward).parameters)
    return _forward_parameters(type(model))


def cache_arg_name(model: torch.nn.Module) -> str | None:
    """The name under which ``model.forward`` takes its KV cache, or None if it takes none."""
    params = forward_parameters(model)
    for name in CACHE_ARG_NAMES:
        if name in params:
            return name
    return None


def cache_kwargs(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """``{<the model's cache argument>: cache, "use_cache": True}`` for a forward call."""
    name = cache_arg_name(model)
    if name is None:
        raise ValueError(f"{type(model).__name__}.forward takes no KV cache argument "
                         f"(looked for {', '.join(CACHE_ARG_NAMES)})")
    return {name: cache, "use_cache": True}


def output_cache(output: Any) -> Any:
    """The cache a forward returned, whatever the release calls the field."""
    for name in CACHE_ARG_NAMES:
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


def execution_device(model: torch.nn.Module) -> torch.device:
    """Where ``model`` computes: its parameters' device, or, for weights accelerate offloaded to disk
    (parameters on ``meta``), the device its offload hooks load them to."""
    device = getattr(model, "device", None)
    if device is None:
        device = next(unwrap_compiled(model).parameters()).device
    device = torch.device(device)
    if device.type != "meta":
        return device
    for module in unwrap_compiled(model).modules():
        hook_device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if hook_device is not None:
            hook_device = torch.device(hook_device if not isinstance(hook_device, int) else f"cuda:{hook_device}")
            if hook_device.type != "meta":
                return hook_device
    raise ValueError(f"{type(model).__name__} has its weights on the meta device and no accelerate offload hook "
                     "says where it runs: load it with device_map=... (accelerate) or move it to a device")


def new_cache() -> DynamicCache:
    """An empty cache whose layers are all plain (full) layers: windows are applied by our masks."""
    return DynamicCache()


def cache_layers(cache: DynamicCache) -> list:
    """The filled layers of ``cache``; each has ``.keys`` / ``.values`` of shape (B, H, S, D)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise RuntimeError("this transformers release has no DynamicCache.layers; adaspec-hf needs 5.17+")
    return [layer for layer in layers if getattr(layer, "is_initialized", True)]


@functools.lru_cache(maxsize=None)
def _output_cache_field() -> str:
    import dataclasses

    names = {f.name for f in dataclasses.fields(GenerateDecoderOnlyOutput)}
    for name in CACHE_ARG_NAMES:
        if name in names:
            return name
    raise RuntimeError(f"GenerateDecoderOnlyOutput has no cache field (fields: {sorted(names)})")


def decoder_only_output(sequences: torch.Tensor, scores=None, logits=None, cache=None) -> GenerateDecoderOnlyOutput:
    """HF's own output type for a decoder-only ``generate`` (no attentions or hidden states)."""
    return GenerateDecoderOnlyOutput(
        sequences=sequences, scores=scores, logits=logits, attentions=None, hidden_states=None,
        **{_output_cache_field(): cache},
    )


def _call_filtered(fn, **kwargs):
    """Call ``fn`` with the keyword arguments its signature declares (optional ones come and go)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in params})


def prepare_generation_config(
    model: PreTrainedModel, generation_config: GenerationConfig | None, kwargs: dict[str, Any]
) -> tuple[GenerationConfig, dict[str, Any]]:
    """HF's merge of the model's defaults, ``generation_config`` and ``kwargs``: (config copy, model kwargs)."""
    fn = getattr(model, "_prepare_generation_config", None)
    if fn is None:
        raise RuntimeError("transformers has no GenerationMixin._prepare_generation_config; adaspec-hf needs 5.17+")
    return fn(generation_config, **kwargs)


def generation_defaults() -> dict[str, Any]:
    """The values HF's ``generate`` gives options nobody set (``max_length=20``, ``top_k=50``...)."""
    fn = getattr(GenerationConfig, "_get_default_generation_params", None)
    if fn is None:
        raise RuntimeError("transformers has no GenerationConfig._get_default_generation_params; adaspec-hf needs 5.17+")
    return dict(fn())


def prepare_generated_length(
    model: PreTrainedModel, generation_config: GenerationConfig, has_default_max_length: bool,
    has_default_min_length: bool, input_ids: torch.Tensor,
) -> GenerationConfig:
    """HF's resolution of ``max_new_tokens``/``max_length``/``min_new_tokens`` for a prompt batch.

    With no length set anywhere, HF 5.x generates ``max_length`` (20) *new* tokens, capped by
    ``max_position_embeddings``; ``max_new_tokens`` wins over ``max_length``.
    """
    fn = getattr(model, "_prepare_generated_length", None)
    if fn is None:
        raise RuntimeError("transformers has no GenerationMixin._prepare_generated_length; adaspec-hf needs 5.17+")
    return _call_filtered(
        fn, generation_config=generation_config, has_default_max_length=has_default_max_length,
        has_default_min_length=has_default_min_length, model_input_name="input_ids",
        input_ids_length=input_ids.shape[1], inputs_tensor=input_ids,
    )


def prepare_special_tokens(
    model: PreTrainedModel, generation_config: GenerationConfig, has_attention_mask: bool | None,
    device: torch.device, batch_size: int | None,
) -> None:
    """Set the special-token tensors (``_eos_token_tensor``…) on ``generation_config`` in place."""
    _call_filtered(
        model._prepare_special_tokens, generation_config=generation_config,
        kwargs_has_attention_mask=has_attention_mask, device=device, batch_size=batch_size,
    )


def logits_processors(
    model: PreTrainedModel, generation_config: GenerationConfig, input_ids: torch.Tensor,
    logits_processor: LogitsProcessorList | None, model_kwargs: dict[str, Any],
    has_attention_mask: bool | None = True, prefix_allowed_tokens_fn=None,
) -> LogitsProcessorList:
    """HF's processors for ``generation_config`` exactly as ``generate`` builds them.

    ``input_ids`` (B, L) is the prompt batch. The special-token tensors are prepared first, as
    ``generate`` does: processors such as min-new-tokens read ``_eos_token_tensor``.
    """
    prepare_special_tokens(model, generation_config, has_attention_mask, input_ids.device, input_ids.shape[0])
    return _call_filtered(
        model._get_logits_processor, generation_config=generation_config,
        input_ids_seq_length=input_ids.shape[1], encoder_input_ids=input_ids,
        prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
        logits_processor=logits_processor, device=input_ids.device, model_kwargs=model_kwargs,
    )


_BLOOM_ALIBI = "build_alibi_tensor"  # (attention_mask, num_heads, dtype) -> (B * H, 1, K)
_MPT_ALIBI = "build_mpt_alibi_tensor"  # (num_heads, sequence_length, alibi_bias_max, device) -> (H, 1, L)


def _alibi_builder(model: PreTrainedModel) -> tuple[Any, str]:
    inner = getattr(unwrap_compiled(model), "transformer", None)
    for name in (_BLOOM_ALIBI, _MPT_ALIBI):
        if callable(getattr(inner, name, None)):
            return inner, name
    raise RuntimeError(f"{type(model).__name__} has no transformer.{_BLOOM_ALIBI} / transformer.{_MPT_ALIBI} on "
                       "this transformers release; its ALiBi bias cannot be built from explicit positions")


def alibi_per_row(model: PreTrainedModel) -> bool:
    """Whether the model's ALiBi bias has a batch dimension (BLOOM) or is one for all rows (MPT)."""
    return _alibi_builder(model)[1] == _BLOOM_ALIBI


@contextlib.contextmanager
def alibi_from_positions(model: PreTrainedModel, key_positions: torch.Tensor) -> Iterator[None]:
    """Make an ALiBi forward build its bias from ``key_positions`` (B, K) instead of its mask / slots.

    ALiBi adds ``slope_h * key_position`` to every score (softmax is shift-invariant per query), so
    explicit positions give exactly what HF's contiguous decoding gives. MPT's bias is shared by the
    batch: there ``key_positions`` must be one row (B == 1), or rows whose visible keys' positions
    differ from row 0's by a per-row constant.
    """
    inner, name = _alibi_builder(model)
    original = getattr(inner, name)
    previous = inner.__dict__.get(name)

    if name == _BLOOM_ALIBI:
        def build(attention_mask: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
            ones = torch.ones(1, 2, device=key_positions.device)
            slopes = original(ones, num_heads, torch.float32).reshape(num_heads, 2)[:, 1]  # HF's slopes: bias at pos 1
            alibi = slopes[None, :, None] * key_positions[:, None, :].to(torch.float32)
            return alibi.reshape(-1, 1, key_positions.shape[1]).to(dtype)
    else:
        def build(num_heads: int, sequence_length: int, *args: Any, **kwargs: Any) -> torch.Tensor:
            two = original(num_heads, 2, *args, **kwargs)  # (H, 1, 2) = slope_h * [-1, 0]: HF's slopes
            slopes = (two[:, 0, 1] - two[:, 0, 0]).to(torch.float32)
            # exactly one bias column per key slot: the layer's slice by key length then keeps all of them
            return slopes[:, None, None] * key_positions[0].to(device=slopes.device, dtype=torch.float32)[None, None, :]

    setattr(inner, name, build)
    try:
        yield
    finally:
        if previous is None:
            delattr(inner, name)
        else:
            setattr(inner, name, previous)


@contextlib.contextmanager
def candidate_generator_override(model: PreTrainedModel, generator: CandidateGenerator) -> Iterator[None]:
    """Make HF's assisted loop use ``generator`` for the duration of the block (this instance only)."""
    if not hasattr(model, "_get_candidate_generator"):
        raise RuntimeError("transformers has no GenerationMixin._get_candidate_generator; cannot plug in a "
                           "candidate generator on this release")
    previous = model.__dict__.get("_get_candidate_generator")
    model._get_candidate_generator = lambda *a, **k: generator
    try:
        yield
    finally:
        if previous is None:
            del model._get_candidate_generator
        else:
            model._get_candidate_generator = previous


POSITION_LIMIT_NAMES = ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length", "seq_length")


def max_positions(model: torch.nn.Module) -> int | None:
    """The longest sequence a model's (text) config allows, or None: architectures name it
    differently (GPT-2 ``n_positions``, MPT ``max_seq_len``, ...)."""
    cfg = unwrap_compiled(model).config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for name in POSITION_LIMIT_NAMES:
        v = getattr(cfg, name, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None
