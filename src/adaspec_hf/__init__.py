"""adaspec-hf: adaptive, lossless speculative decoding for Hugging Face causal LMs.

Importing changes nothing; opt a model in explicitly::

    import adaspec_hf
    adaspec_hf.enable(model)
    model.generate(**inputs, assistant_model=draft, adaptive=True)
"""
from __future__ import annotations

from .engine import DecodeResult, GenerationStats, SpeculativeDecoder, StepRecord
from .hf import AdaptiveCandidateGenerator, adaptive_generate, check_vocab, disable, enable
from .policies import (
    Confidence, DraftPolicy, Heuristic, LevelContext, ShapeFunction, StaticChain, StepContext,
    StepOutcome, TreeShape,
)
from .registry import POLICY_NAMES, make_policy
from .serving import Chunk, Engine, EngineClosed, RequestHandle, RequestResult, SLOPlanner
from .slo import SLO
from .tree import DraftTree

__version__ = "0.1.0"

__all__ = [
    "AdaptiveCandidateGenerator", "Chunk", "Confidence", "Engine", "EngineClosed", "RequestHandle",
    "RequestResult", "SLO", "SLOPlanner", "DecodeResult", "DraftPolicy", "DraftTree",
    "GenerationStats", "Heuristic", "LevelContext", "POLICY_NAMES", "ShapeFunction",
    "SpeculativeDecoder", "StaticChain", "StepContext", "StepOutcome", "StepRecord", "TreeShape",
    "adaptive_generate", "check_vocab", "disable", "enable", "make_policy",
]
