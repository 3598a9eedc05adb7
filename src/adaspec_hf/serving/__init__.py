"""Continuous-batching serving: :class:`Engine` (submit, stream, SLOs) and what a caller holds."""
from adaspec_hf.config import EngineConfig
from adaspec_hf.policies.slo import SLOPlanner
from adaspec_hf.serving.engine import Engine
from adaspec_hf.serving.handle import Chunk, EngineClosed, RequestHandle, RequestResult
from adaspec_hf.slo import SLO

__all__ = ["SLO", "SLOPlanner", "Chunk", "Engine", "EngineClosed", "EngineConfig", "RequestHandle", "RequestResult"]
