"""Two more drafts for a built-in pair, to bracket what a planner must do:

* ``perfect_draft``: the target without its identity layers (the layers the pair build appended,
  which add exactly zero to the residual stream): the target's own function at a fraction of its
  cost, so every draft token is accepted and the right policy drafts deep.
* ``random_draft``: the draft's architecture with fresh random weights: nothing it proposes is
  accepted beyond chance, so the right policy stops speculating and probes rarely.
"""
from __future__ import annotations

import copy

import torch


def perfect_draft(target):
    """A copy of ``target`` keeping only its trained layers (ValueError if it has no identity layers)."""
    extra = list(getattr(target.config, "adaspec_identity_layers", None) or [])
    if not extra:
        raise ValueError("the target has no identity layers (config.adaspec_identity_layers): only a pair "
                         "grown by `adaspec-hf pair build` has a perfect draft")
    model = copy.deepcopy(target)
    keep = [i for i in range(len(model.model.layers)) if i not in set(extra)]
    model.model.layers = torch.nn.ModuleList([model.model.layers[i] for i in keep])
    for new, layer in enumerate(model.model.layers):
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new
    model.config.num_hidden_layers = len(keep)
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    model.config.adaspec_identity_layers = []
    model.config._name_or_path = (getattr(target.config, "_name_or_path", "") or "target") + "-perfect-draft"
    return model.eval()


def random_draft(draft, seed: int = 0):
    """The draft's architecture with freshly initialised weights."""
    torch.manual_seed(seed)
    model = type(draft)(copy.deepcopy(draft.config)).to(dtype=next(draft.parameters()).dtype).eval()
    model.config._name_or_path = (getattr(draft.config, "_name_or_path", "") or "draft") + "-random"
    return model
