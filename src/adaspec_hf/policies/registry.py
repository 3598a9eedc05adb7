"""Draft policies by name: the one documented option (``draft_policy=``) for picking a policy.

Names: ``"adaptive"`` (default; the fitted efficiency-model planner), ``"adaptive-tree"``,
``"static-K"`` (K = 0..64), ``"tree-DxW"`` (static tree: W nodes per level, D levels), ``"heuristic"`` (HF's +2/-1 schedule), ``"confidence"`` or
``"confidence-T"`` (stop below draft probability T, HF/DISCO style), ``"smartspec"``
(batch-uniform goodput with a running acceptance rate).
"""
from __future__ import annotations

import re

from adaspec_hf.policies.base import Confidence, DraftPolicy, Heuristic, StaticChain, StaticTree

POLICY_NAMES = ("adaptive", "adaptive-tree", "static-K", "tree-DxW", "heuristic", "confidence[-T]", "smartspec")


def make_policy(spec, target=None, draft=None, gen_config=None) -> DraftPolicy:
    if isinstance(spec, DraftPolicy):
        return spec
    if spec is None:
        spec = "adaptive"
    if not isinstance(spec, str):
        raise TypeError(f"draft_policy must be a name or a DraftPolicy, got {type(spec).__name__}")
    name = spec.strip().lower()
    if m := re.fullmatch(r"static-(\d+)", name):
        return StaticChain(int(m.group(1)))
    if m := re.fullmatch(r"tree-(\d+)x(\d+)", name):
        return StaticTree(int(m.group(1)), int(m.group(2)))
    if name == "heuristic":
        return Heuristic()
    if m := re.fullmatch(r"confidence(?:-([0-9.]+))?", name):
        return Confidence(float(m.group(1)) if m.group(1) else 0.4)
    if name in ("adaptive", "adaptive-tree", "smartspec"):
        from adaspec_hf.policies.planner import make_planner  # the efficiency model needs a latency profile

        sampling = bool(getattr(gen_config, "do_sample", False))
        return make_planner(name, target, draft, sampling)
    raise ValueError(f"unknown draft_policy {spec!r}; choose one of {', '.join(POLICY_NAMES)}")
