"""adaspec-hf: adaptive, lossless speculative decoding for Hugging Face causal LMs.

Importing changes nothing; opt a model in explicitly::

    import adaspec_hf
    adaspec_hf.enable(model)
    model.generate(**inputs, assistant_model=draft, adaptive=True)
"""
from __future__ import annotations

from adaspec_hf.core.step import DecodeResult, GenerationStats, SpeculativeDecoder, StepRecord
from adaspec_hf.integrations.hf.generate import AdaptiveCandidateGenerator, adaptive_generate, check_vocab, disable, enable
from adaspec_hf.policies.base import (
    Confidence, DraftPolicy, Heuristic, LevelContext, ShapeFunction, StaticChain, StepContext,
    StepOutcome, TreeShape,
)
from adaspec_hf.policies.registry import POLICY_NAMES, make_policy
from adaspec_hf.serving.engine import Chunk, Engine, EngineClosed, RequestHandle, RequestResult, SLOPlanner
from adaspec_hf.slo import SLO
from adaspec_hf.core.tree import DraftTree

__version__ = "0.1.0"

__all__ = [
    "AdaptiveCandidateGenerator", "Chunk", "Confidence", "Engine", "EngineClosed", "RequestHandle",
    "RequestResult", "SLO", "SLOPlanner", "DecodeResult", "DraftPolicy", "DraftTree",
    "GenerationStats", "Heuristic", "LevelContext", "POLICY_NAMES", "ShapeFunction",
    "SpeculativeDecoder", "StaticChain", "StepContext", "StepOutcome", "StepRecord", "TreeShape",
    "adaptive_generate", "check_vocab", "disable", "enable", "make_policy",
]
