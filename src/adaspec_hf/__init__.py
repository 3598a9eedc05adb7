"""adaspec-hf: adaptive, lossless speculative decoding for Hugging Face causal LMs.

Importing changes nothing; opt a model in explicitly::

    import adaspec_hf
    adaspec_hf.enable(model)
    model.generate(**inputs, assistant_model=draft, adaptive=True)
"""
from __future__ import annotations

from adaspec_hf.core import DecodeResult, GenerationStats, SpeculativeDecoder, StepRecord
from adaspec_hf.integrations.hf import AdaptiveCandidateGenerator, adaptive_generate, check_vocab, disable, enable
from adaspec_hf.policies import (
    Confidence, DraftPolicy, Heuristic, LevelContext, ShapeFunction, StaticChain, StepContext,
    StepOutcome, TreeShape,
)
from adaspec_hf.config import AdaptiveConfig, EngineConfig
from adaspec_hf.policies.registry import POLICY_NAMES, make_policy, register_policy
from adaspec_hf.policies.slo import SLOPlanner
from adaspec_hf.serving import Chunk, Engine, EngineClosed, RequestHandle, RequestResult
from adaspec_hf.slo import SLO
from adaspec_hf.core.tree import DraftTree

from adaspec_hf._version import __version__

__all__ = [
    "AdaptiveCandidateGenerator", "AdaptiveConfig", "EngineConfig", "register_policy", "Chunk", "Confidence", "Engine", "EngineClosed", "RequestHandle",
    "RequestResult", "SLO", "SLOPlanner", "DecodeResult", "DraftPolicy", "DraftTree",
    "GenerationStats", "Heuristic", "LevelContext", "POLICY_NAMES", "ShapeFunction",
    "SpeculativeDecoder", "StaticChain", "StepContext", "StepOutcome", "StepRecord", "TreeShape",
    "adaptive_generate", "check_vocab", "disable", "enable", "make_policy",
]
