"""One model's batched KV cache with holes, and the masked forward pass over it.

Rejected draft nodes stay in the cache as *holes* (masked out), so a verify step never copies the
cache; :meth:`KVState.compact` gathers the live slots when holes pile up. Every slot carries its
token position, so masks (causal, tree, sliding window) are built from positions, never from
slot indices. Masks are float and additive: a boolean 4-D mask is silently wrong under eager
attention (see docs/design.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from adaspec_hf.compat import (
    CACHE_ARG_NAMES, alibi_from_positions, cache_arg_name, cache_kwargs, cache_layers, execution_device,
    forward_parameters, new_cache,
)

SUPPORTED_ATTENTION = ("sdpa", "eager")
MASKABLE_LAYER_TYPES = ("full_attention", "sliding_attention")
RECURRENT_LAYER_TYPES = ("linear_attention", "mamba", "conv", "recurrent", "ssm")
"""Layer types that keep a running state instead of per-token keys/values: a rejected draft token
cannot be masked out of such a state afterwards, so tree verification cannot be lossless."""
RECURRENT_MODEL_TYPES = ("mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm", "recurrent_gemma")
ALIBI_FROM_POSITIONS = ("bloom",)
"""ALiBi models whose bias we rebuild from explicit key positions (see hf_compat.alibi_from_positions)."""
ALIBI_SLOT_RELATIVE = ("mpt",)
"""ALiBi models whose bias is sliced by cache slot inside each attention layer: not supported."""
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
    if "position_ids" not in params and model_type in ALIBI_SLOT_RELATIVE:
        raise ValueError(
            f"{name} ({model_type}) takes no position_ids: each attention layer slices its ALiBi position "
            "bias by cache slot (key length), which over a cache with holes (rejected drafts) and draft "
            "trees is not the tokens' distance, so verification cannot match HF's decoding (not "
            f"supported); {_HF_ASSISTED}")
    needed = ("attention_mask",) if model_type in ALIBI_FROM_POSITIONS else ("position_ids", "attention_mask")
    for arg in needed:
        if arg not in params:
            raise ValueError(f"{name}.forward takes no `{arg}`: adaspec-hf verifies drafts at explicit "
                             "positions under a 4-D mask, so it needs both; no KV cache support for "
                             f"speculation here; {_HF_ASSISTED}")
    mask_spec_for(model)


class KVState:
    """KV cache of ``B`` rows with per-slot validity and positions.

    ``valid[b, s]`` says whether slot ``s`` holds a committed token of row ``b`` (False for left
    padding, holes and not-yet-accepted speculative slots); ``pos[b, s]`` is that token's position.
    """

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.spec = mask_spec_for(model)
        self.cache = new_cache()
        dev = execution_device(model)
        self.device = dev
        self.valid = torch.zeros(0, 0, dtype=torch.bool, device=dev)
        self.pos = torch.zeros(0, 0, dtype=torch.long, device=dev)
        # (B,) token type of each row's new tokens (HF repeats a row's last prompt type), or None
        self.token_type: torch.Tensor | None = None
        params = forward_parameters(model)
        self._takes_logits_to_keep = "logits_to_keep" in params
        self._takes_token_types = "token_type_ids" in params
        self._alibi = getattr(model.config, "model_type", None) in ALIBI_FROM_POSITIONS

    # ---------------------------------------------------------------- sizes
    @property
    def rows(self) -> int:
        return self.valid.shape[0]

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    @property
    def hole_fraction(self) -> float:
        return 0.0 if self.valid.numel() == 0 else 1.0 - float(self.valid.float().mean())

    # -------------------------------------------------------------- forwards
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Run the (left-padded) prompts exactly as HF ``generate`` does; return last logits (B, V).

        ``token_type_ids`` (B, P), for models that take them: every later token of a row gets the
        row's last type, as HF ``generate`` extends them.
        """
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(device=self.device, dtype=torch.long)
        position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        kwargs = {"logits_to_keep": 1} if self._takes_logits_to_keep else {}
        if not self._alibi:  # BLOOM: positions come from the 2-D mask's cumsum, exactly these
            kwargs["position_ids"] = position_ids
        if token_type_ids is not None and self._takes_token_types:
            token_type_ids = token_type_ids.to(self.device)
            kwargs["token_type_ids"] = token_type_ids
            self.token_type = token_type_ids[:, -1].clone()
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask,
            **cache_kwargs(self.model, self.cache), **kwargs,
        )
        self.valid = attention_mask.bool()
        self.pos = position_ids
        return out.logits[:, -1, :]

    def build_mask(
        self, positions: torch.Tensor, new_visible: torch.Tensor, old_visible: torch.Tensor | None
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Float additive mask (B, 1, q, S+q) from slot validity, extra visibility and positions."""
        b, q = positions.shape
        cache_vis = self.valid[:, None, :].expand(b, q, self.length)
        if old_visible is not None:
            cache_vis = cache_vis | old_visible
        vis = torch.cat([cache_vis, new_visible], dim=2)  # (B, q, S+q)
        key_pos = torch.cat([self.pos, positions], dim=1)
        dtype = self.model.dtype
        neg = torch.finfo(dtype).min

        def to_float(v: torch.Tensor) -> torch.Tensor:
            return torch.zeros(v.shape, dtype=dtype, device=v.device).masked_fill_(~v, neg)[:, None]

        def windowed(w: int) -> torch.Tensor:
            near = (positions[:, :, None] - key_pos[:, None, :]) < w
            return vis & near

        spec = self.spec
        if spec.per_layer_type is not None:
            masks = {"full_attention": to_float(vis)}
            masks["sliding_attention"] = to_float(windowed(spec.layer_window))
            return masks
        if spec.window is not None:
            return to_float(windowed(spec.window))
        return to_float(vis)

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        new_visible: torch.Tensor,
        old_visible: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Append ``q`` tokens per row as *uncommitted* slots and return their logits (B, q, V).

        ``new_visible`` (B, q, q): which of the new tokens each new token sees (itself included);
        ``old_visible`` (B, q, S): extra already-cached slots to see besides the committed ones
        (e.g. ancestors drafted at an earlier tree level).
        """
        caller = input_ids.device
        dev = self.valid.device  # the model's device: target and draft may live on different ones
        input_ids, positions, new_visible = input_ids.to(dev), positions.to(dev), new_visible.to(dev)
        if old_visible is not None:
            old_visible = old_visible.to(dev)
        mask = self.build_mask(positions, new_visible, old_visible)
        extra = {}
        if self.token_type is not None:
            extra["token_type_ids"] = self.token_type[:, None].expand_as(input_ids)
        if self._alibi:
            with alibi_from_positions(self.model, torch.cat([self.pos, positions], dim=1)):
                out = self.model(input_ids=input_ids, attention_mask=mask, **cache_kwargs(self.model, self.cache), **extra)
        else:
            out = self.model(
                input_ids=input_ids, attention_mask=mask, position_ids=positions,
                **cache_kwargs(self.model, self.cache), **extra,
            )
        self.valid = torch.cat([self.valid, torch.zeros_like(positions, dtype=torch.bool)], dim=1)
        self.pos = torch.cat([self.pos, positions], dim=1)
        return out.logits.to(caller)

    # ------------------------------------------------------------ bookkeeping
    def checkpoint(self) -> tuple:
        """A shallow snapshot (attribute bindings of this state, its cache and its layers) for
        :meth:`restore`: row surgery and forwards rebind these tensors, so the snapshot undoes them
        without copying the cache. In-place writes (``commit``) are not undone."""
        cache = self.cache
        layers = list(getattr(cache, "layers", []))
        return dict(self.__dict__), cache, dict(cache.__dict__), layers, [dict(layer.__dict__) for layer in layers]

    def restore(self, saved: tuple) -> None:
        """Put this state back exactly as :meth:`checkpoint` saw it."""
        state, cache, cache_state, layers, layer_states = saved
        self.__dict__.clear()
        self.__dict__.update(state)
        cache.__dict__.clear()
        cache.__dict__.update(cache_state)
        if hasattr(cache, "layers"):
            cache.layers[:] = layers
        for layer, st in zip(layers, layer_states):
            layer.__dict__.clear()
            layer.__dict__.update(st)

    def commit(self, slots: torch.Tensor, keep: torch.Tensor) -> None:
        """Mark ``slots`` (B, k) as committed where ``keep`` (B, k) is True."""
        slots, keep = slots.to(self.valid.device), keep.to(self.valid.device)
        keep = keep & (slots >= 0)
        if bool(keep.any()):
            rows = torch.arange(slots.shape[0], device=slots.device)[:, None].expand_as(slots)
            self.valid[rows[keep], slots[keep]] = True

    def _layers(self):
        return cache_layers(self.cache)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (finished requests stop costing compute)."""
        rows = rows.to(self.valid.device)
        for layer in self._layers():
            layer.keys = layer.keys.index_select(0, rows)
            layer.values = layer.values.index_select(0, rows)
        self.valid = self.valid.index_select(0, rows)
        self.pos = self.pos.index_select(0, rows)
        if self.token_type is not None:
            self.token_type = self.token_type.index_select(0, rows)
        self.trim()

    def trim(self) -> None:
        """Drop leading slots that no row uses (cheap: a view)."""
        if self.length == 0:
            return
        used = self.valid.any(0)
        if not bool(used.any()):
            first = self.length
        else:
            first = int(torch.argmax(used.to(torch.int8)))
        if first == 0:
            return
        for layer in self._layers():
            layer.keys = layer.keys[:, :, first:]
            layer.values = layer.values[:, :, first:]
        self.valid = self.valid[:, first:]
        self.pos = self.pos[:, first:]

    def compact(self) -> None:
        """Gather every row's committed slots to the right; holes and padding go left and shrink."""
        s = self.length
        if s == 0:
            return
        counts = self.valid.sum(1)
        keep = int(counts.max())
        ar = torch.arange(s, device=self.valid.device)
        key = torch.where(self.valid, s + ar, ar - s)  # invalid first, then valid in order
        idx = torch.argsort(key, dim=1, stable=True)[:, s - keep:]
        for layer in self._layers():
            h, d = layer.keys.shape[1], layer.keys.shape[3]
            gi = idx[:, None, :, None].expand(-1, h, -1, d)
            layer.keys = layer.keys.gather(2, gi)
            hv, dv = layer.values.shape[1], layer.values.shape[3]
            layer.values = layer.values.gather(2, idx[:, None, :, None].expand(-1, hv, -1, dv))
        self.valid = self.valid.gather(1, idx)
        self.pos = self.pos.gather(1, idx)

    def maybe_compact(self, threshold: float = 0.5, min_length: int = 64) -> bool:
        if self.length >= min_length and self.hole_fraction > threshold:
            self.compact()
            return True
        return False

    def append_rows(self, other: "KVState") -> None:
        """Concatenate another state's rows below ours (continuous batching), left-padding to align."""
        if (self.token_type is None) != (other.token_type is None) and self.rows and other.rows:
            raise ValueError("cannot merge rows with token_type_ids and rows without them")
        if self.rows == 0:
            self.cache, self.valid, self.pos = other.cache, other.valid, other.pos
            self.token_type = other.token_type
            return
        s1, s2 = self.length, other.length
        width = max(s1, s2)

        def pad(t: torch.Tensor, n: int, fill) -> torch.Tensor:
            if n == 0:
                return t
            shape = list(t.shape)
            dim = 2 if t.dim() == 4 else 1
            shape[dim] = n
            return torch.cat([torch.full(shape, fill, dtype=t.dtype, device=t.device), t], dim=dim)

        mine, theirs = self._layers(), other._layers()
        if len(mine) != len(theirs):
            raise RuntimeError("cannot merge caches with different layer counts")
        for a, b in zip(mine, theirs):
            a.keys = torch.cat([pad(a.keys, width - s1, 0), pad(b.keys, width - s2, 0)], dim=0)
            a.values = torch.cat([pad(a.values, width - s1, 0), pad(b.values, width - s2, 0)], dim=0)
        self.valid = torch.cat([pad(self.valid, width - s1, False), pad(other.valid, width - s2, False)])
        self.pos = torch.cat([pad(self.pos, width - s1, 0), pad(other.pos, width - s2, 0)])
        if self.token_type is not None:
            self.token_type = torch.cat([self.token_type, other.token_type])
