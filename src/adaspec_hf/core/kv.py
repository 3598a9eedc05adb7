"""One model's batched KV cache with holes, and the masked forward pass over it.

Rejected draft nodes stay in the cache as *holes* (masked out), so a verify step never copies the
cache; :meth:`KVState.compact` gathers the live slots when holes pile up. Every slot carries its
token position, so masks (causal, tree, sliding window) are built from positions, never from
slot indices. Masks are float and additive: a boolean 4-D mask is silently wrong under eager
attention (see docs/design.md). Which models qualify: :mod:`adaspec_hf.core.architecture`.
"""
from __future__ import annotations

import torch
from transformers import PreTrainedModel

from adaspec_hf.compat import (
    alibi_from_positions, alibi_per_row, cache_kwargs, cache_layers, execution_device, forward_parameters, new_cache,
)
from adaspec_hf.core.architecture import ALIBI_FROM_POSITIONS, mask_spec_for


def _slot_aligned(key_pos: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether every row's visible keys sit at their slot index plus a per-row constant (no holes
    and no tree siblings among them): then one ALiBi bias by slot serves the whole batch, since
    softmax ignores a constant added to all of a query's scores."""
    seen = (mask == 0).any(dim=2)[:, 0]  # (B, K): keys some query of the row attends to
    shift = key_pos - torch.arange(key_pos.shape[1], device=key_pos.device)[None, :]
    big = torch.iinfo(shift.dtype).max
    hi = shift.masked_fill(~seen, -big).amax(dim=1)
    lo = shift.masked_fill(~seen, big).amin(dim=1)
    return bool(((hi == lo) | ~seen.any(dim=1)).all())


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
        self._alibi_shared = self._alibi and not alibi_per_row(model)  # MPT: one bias for the whole batch

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
        key_pos = torch.cat([self.pos, positions], dim=1)
        if not self._alibi:
            logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                **cache_kwargs(self.model, self.cache), **extra).logits
        elif self._alibi_shared and key_pos.shape[0] > 1 and not _slot_aligned(key_pos, mask):
            logits = self._forward_by_row(input_ids, mask, key_pos, extra)
        else:
            bias_pos = key_pos
            if self._alibi_shared and key_pos.shape[0] > 1:
                bias_pos = torch.arange(key_pos.shape[1], device=key_pos.device)[None, :]
            with alibi_from_positions(self.model, bias_pos):
                logits = self.model(input_ids=input_ids, attention_mask=mask,
                                    **cache_kwargs(self.model, self.cache), **extra).logits
        self.valid = torch.cat([self.valid, torch.zeros_like(positions, dtype=torch.bool)], dim=1)
        self.pos = key_pos
        return logits.to(caller)

    def _forward_by_row(self, input_ids: torch.Tensor, mask: torch.Tensor, key_pos: torch.Tensor,
                        extra: dict) -> torch.Tensor:
        """One forward per row, for a bias shared by the batch (MPT) when rows' holes differ: each
        row gets the bias of its own key positions; the new slots are gathered back into the cache."""
        layers = self._layers()
        if not layers:
            raise RuntimeError("a per-row ALiBi forward needs a prefilled cache")
        saved = [(layer.keys, layer.values) for layer in layers]
        new_keys: list[list[torch.Tensor]] = [[] for _ in layers]
        new_values: list[list[torch.Tensor]] = [[] for _ in layers]
        logits = []
        s = self.length
        try:
            for b in range(input_ids.shape[0]):
                for layer, (k, v) in zip(layers, saved):
                    layer.keys, layer.values = k[b:b + 1], v[b:b + 1]
                row_extra = {name: t[b:b + 1] for name, t in extra.items()}
                with alibi_from_positions(self.model, key_pos[b:b + 1]):
                    out = self.model(input_ids=input_ids[b:b + 1], attention_mask=mask[b:b + 1],
                                     **cache_kwargs(self.model, self.cache), **row_extra)
                logits.append(out.logits)
                for i, layer in enumerate(layers):
                    new_keys[i].append(layer.keys[:, :, s:])
                    new_values[i].append(layer.values[:, :, s:])
        finally:
            for layer, (k, v) in zip(layers, saved):
                layer.keys, layer.values = k, v
        for i, layer in enumerate(layers):
            layer.keys = torch.cat([layer.keys, torch.cat(new_keys[i], dim=0)], dim=2)
            layer.values = torch.cat([layer.values, torch.cat(new_values[i], dim=0)], dim=2)
        return torch.cat(logits, dim=0)

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
