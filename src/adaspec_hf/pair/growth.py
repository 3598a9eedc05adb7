"""Growing the target function-preservingly until it costs enough more than the draft.

A small target trained on a CPU budget is often barely slower than its draft, and then no draft
policy can show a speed-up. Appending decoder layers that add exactly zero to the residual stream
makes the target's forward as expensive as a bigger model's without changing a single logit, so the
measured acceptance stays that of the trained pair while the cost ratio becomes realistic.
"""
from __future__ import annotations

import copy
import math

import torch

from adaspec_hf.pair.cost import measure_cost
from adaspec_hf.pair.recipe import ModelShape, Recipe

LOGITS_TOLERANCE = 1e-5  # a grown target whose logits move more than this is a bug, never saved
CHECK_ROWS = 4           # held-out rows whose logits are compared before and after growth
GROWTH_METHOD = ("appended pre-norm LlamaDecoderLayers (weights copied from trained layers) whose "
                 "self_attn.o_proj and mlp.down_proj weights are zero: each adds exactly 0 to the "
                 "residual stream, so the function is unchanged, but its attention, MLP and KV cache "
                 "are computed for real (weights are not sparse-aware)")


def new_llama(shape: ModelShape, tok, max_pos: int):
    """An untrained ``LlamaForCausalLM`` of ``shape`` for tokenizer ``tok``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads or shape.heads, max_position_embeddings=max_pos,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(cfg)


def params_of_layers(model, n_layers: int) -> int:
    """Parameters of the embeddings, head and first ``n_layers`` decoder layers (the trained ones)."""
    total = sum(p.numel() for p in model.parameters())
    layers = model.model.layers
    return total - sum(p.numel() for layer in layers[n_layers:] for p in layer.parameters())


def grow_identity_layers(model, extra: int):
    """Return a copy of a pre-norm Llama-style model with ``extra`` decoder layers appended.

    The new layers copy the weights of trained layers (so activations and cost are realistic), except
    ``self_attn.o_proj`` and ``mlp.down_proj``, which are zero: each new block adds exactly 0 to the
    residual stream, so logits are unchanged while the compute (and KV cache) is real. The indices of
    these layers are recorded as ``config.adaspec_identity_layers``.
    """
    if extra <= 0:
        return model
    cfg = copy.deepcopy(model.config)
    n = cfg.num_hidden_layers
    cfg.num_hidden_layers = n + extra
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = list(cfg.layer_types) + [cfg.layer_types[-1]] * extra
    done = list(getattr(cfg, "adaspec_identity_layers", []) or [])
    cfg.adaspec_identity_layers = done + list(range(n, n + extra))
    trained = [i for i in range(n) if i not in done] or list(range(n))
    grown = type(model)(cfg).to(dtype=next(model.parameters()).dtype)
    sd = model.state_dict()
    missing, unexpected = grown.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    layers = grown.model.layers
    with torch.no_grad():
        for k, i in enumerate(range(n, n + extra)):
            src = layers[trained[-1 - (k % len(trained))]]
            layers[i].load_state_dict(src.state_dict())
            for lin in (layers[i].self_attn.o_proj, layers[i].mlp.down_proj):
                lin.weight.zero_()
                if lin.bias is not None:
                    lin.bias.zero_()
    grown.generation_config = copy.deepcopy(model.generation_config)
    return grown.eval() if not model.training else grown


@torch.inference_mode()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def grow_to_ratio(target, draft, context: torch.Tensor, check_ids: torch.Tensor, recipe: Recipe):
    """Grow ``target`` until its cost is ``recipe.aim_ratio`` times the draft's (or the depth cap).

    Returns ``(target, cost, growth)``: the (possibly new) target, its last :func:`measure_cost`
    and the ``growth`` section of ``report.json``. Raises if growth changed the logits on
    ``check_ids``.
    """
    cost0 = measure_cost(target, draft, context, repeats=recipe.cost_repeats)
    cost, growth = cost0, {"grown": False, "trained_layers": recipe.target.layers,
                           "total_layers": recipe.target.layers}
    trained_layers = recipe.target.layers
    max_layers = int(recipe.max_grow_factor * trained_layers)
    check = check_ids[: min(CHECK_ROWS, len(check_ids))]
    ref_logits = _logits(target, check)
    while cost["ratio"] < recipe.aim_ratio and target.config.num_hidden_layers < max_layers:
        # grow in whole multiples of the trained depth (4 -> 8 -> 12 ...), so that the architecture
        # does not depend on the exact timing noise of this machine; after one growth, jump straight
        # to the depth that the measured per-layer cost says is needed (fewer slow cost measurements)
        layers = target.config.num_hidden_layers
        extra = trained_layers
        if layers > trained_layers:
            per_layer = (cost["target_ms"] - cost0["target_ms"]) / (layers - trained_layers)
            if per_layer > 0:
                need = (recipe.aim_ratio * cost["draft_ms"] - cost["target_ms"]) / per_layer
                extra = trained_layers * max(1, math.ceil(need / trained_layers))
        extra = min(extra, max_layers - layers)
        target = grow_identity_layers(target, extra)
        cost = measure_cost(target, draft, context, repeats=recipe.cost_repeats)
    if target.config.num_hidden_layers > trained_layers:
        new_logits = _logits(target, check)
        diff = (new_logits - ref_logits).abs().max().item()
        growth = {
            "grown": True,
            "trained_layers": trained_layers,
            "total_layers": target.config.num_hidden_layers,
            "identity_layers": list(target.config.adaspec_identity_layers),
            "method": GROWTH_METHOD,
            "logits_max_abs_diff": diff,
            "logits_bit_identical": bool(torch.equal(new_logits, ref_logits)),
            "ratio_before_growth": cost0["ratio"],
        }
        if diff > LOGITS_TOLERANCE:
            raise RuntimeError(f"grown target changed the logits (max abs diff {diff})")
    return target, cost, growth
