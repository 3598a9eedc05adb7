"""The project's own offline target/draft pair (built from local text) and loading of any HF pair.

Modules, in build order: :mod:`~adaspec_hf.pair.recipe` (what is trained), ``corpus`` (text and
tokenizer), ``setup`` and ``threads`` (precision and thread count, measured), ``train`` (the two
training phases), ``gates`` (quality gates), ``cost`` and ``growth`` (the target/draft cost ratio),
``build`` (the whole build and its cache directory), ``report`` (``report.json``) and ``load``.
"""
from adaspec_hf.pair.build import build_pair, default_cache_dir, default_pair_dir
from adaspec_hf.pair.gates import Gates, WeakPairError
from adaspec_hf.pair.growth import grow_identity_layers
from adaspec_hf.pair.load import load_models, load_pair, load_prompts
from adaspec_hf.pair.recipe import FULL, QUICK, RECIPE_VERSION, ModelShape, Recipe
from adaspec_hf.pair.report import read_report, summarize

__all__ = ["FULL", "QUICK", "RECIPE_VERSION", "Gates", "ModelShape", "Recipe", "WeakPairError", "build_pair",
           "default_cache_dir", "default_pair_dir", "grow_identity_layers", "load_models", "load_pair",
           "load_prompts", "read_report", "summarize"]
