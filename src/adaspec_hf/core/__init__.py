"""The one speculative step: draft -> select -> verify -> commit, shared by ``generate`` and serving."""
from adaspec_hf.core.buffer import CommitRule, Cut, TokenBuffer, stop_string_criteria
from adaspec_hf.core.decoder import SpeculativeDecoder
from adaspec_hf.core.lookup import CombinedProposer, LookupProposer, build_proposer
from adaspec_hf.core.proposer import DraftModelProposer, Proposer, TreeDrafter
from adaspec_hf.core.rows import RowBatch, RowSource
from adaspec_hf.core.stats import DecodeResult, GenerationStats, StepRecord
from adaspec_hf.core.step import SpecStep, node_paths
from adaspec_hf.core.verify import NO_TOKEN, NO_TOKEN_MESSAGE, draw_keys

__all__ = ["NO_TOKEN", "NO_TOKEN_MESSAGE", "CombinedProposer", "CommitRule", "Cut", "DecodeResult",
           "DraftModelProposer", "GenerationStats", "LookupProposer", "Proposer", "RowBatch", "RowSource", "SpecStep",
           "SpeculativeDecoder", "StepRecord", "TokenBuffer", "TreeDrafter", "build_proposer", "draw_keys",
           "node_paths", "stop_string_criteria"]
