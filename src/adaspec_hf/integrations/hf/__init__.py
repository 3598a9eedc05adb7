"""Hugging Face integration: ``enable(model)`` / ``generate(adaptive=True)``, the options table,
HF's ``CandidateGenerator`` plug point and the ``custom_generate`` method."""
from adaspec_hf.integrations.hf.candidate import AdaptiveCandidateGenerator
from adaspec_hf.integrations.hf.generate import adaptive_generate, disable, enable
from adaspec_hf.integrations.hf.options import (
    GENERATE_ARGUMENTS, GENERATION_OPTIONS, HONOURED, REFUSED, check_options, hf_generation_options,
)
from adaspec_hf.integrations.hf.settings import choose_policy, policy_from_assistant_settings
from adaspec_hf.core.vocab import check_vocab

__all__ = ["GENERATE_ARGUMENTS", "GENERATION_OPTIONS", "HONOURED", "REFUSED", "AdaptiveCandidateGenerator",
           "adaptive_generate", "check_options", "check_vocab", "choose_policy", "disable", "enable",
           "hf_generation_options", "policy_from_assistant_settings"]
