"""The one requirement on a target/draft pair that HF's assisted decoding does not share: one vocabulary.

The engine verifies the draft's token ids with the target directly, so both must index the same
vocabulary; a draft with another tokenizer belongs to HF's universal assisted generation.
"""
from __future__ import annotations

from transformers import PreTrainedModel


def check_vocab(target: PreTrainedModel, draft: PreTrainedModel, tokenizer=None, assistant_tokenizer=None) -> None:
    """The draft must score the target's token ids; different tokenizers are HF's business."""
    hint = (
        "adaspec-hf needs a draft that shares the target's tokenizer. For a draft with a different "
        "tokenizer use HF's universal assisted generation instead: model.generate(..., "
        "assistant_model=draft, tokenizer=target_tokenizer, assistant_tokenizer=draft_tokenizer) "
        "without adaptive=True."
    )
    if assistant_tokenizer is not None and tokenizer is not None:
        if tokenizer.get_vocab() != assistant_tokenizer.get_vocab():
            raise ValueError("vocabulary mismatch between tokenizer and assistant_tokenizer. " + hint)
    vt, vd = target.config.vocab_size, draft.config.vocab_size
    if vt != vd:
        raise ValueError(f"vocabulary mismatch: target vocab_size={vt}, draft vocab_size={vd}. " + hint)
