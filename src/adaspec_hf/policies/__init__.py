"""Draft policies: how much to speculate, per step and per row. Build one by name with
:func:`make_policy` (the registry); the planners that fit an efficiency model live in
:mod:`~adaspec_hf.policies.planner` and :mod:`~adaspec_hf.policies.slo`."""
from adaspec_hf.policies.base import DraftPolicy, LevelContext, StepContext, StepOutcome
from adaspec_hf.policies.schedules import Confidence, Heuristic
from adaspec_hf.policies.static import ShapeFunction, StaticChain, StaticTree, TreeShape

__all__ = ["Confidence", "DraftPolicy", "Heuristic", "LevelContext", "ShapeFunction", "StaticChain", "StaticTree",
           "StepContext", "StepOutcome", "TreeShape"]
