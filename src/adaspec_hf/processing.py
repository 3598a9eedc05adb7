"""Apply HF logits processors/warpers to the scores of many tree nodes at once.

A node's processors must see exactly the prefix HF ``generate`` would pass (left padding included,
since e.g. repetition penalty and min-length read ``input_ids``). Warpers that ignore
``input_ids`` (temperature, top-k, top-p, ...) run once over all nodes; others run once per
distinct prefix length.
"""
from __future__ import annotations

from typing import Callable

import torch
from transformers import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

INPUT_FREE = (
    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper,
    TypicalLogitsWarper, EpsilonLogitsWarper, EtaLogitsWarper,
)


class Processing:
    def __init__(self, processors: LogitsProcessorList | None):
        self.processors = processors if processors is not None else LogitsProcessorList()
        self.input_free = all(isinstance(p, INPUT_FREE) for p in self.processors)

    def __bool__(self) -> bool:
        return len(self.processors) > 0

    def __call__(self, scores: torch.Tensor, prefixes: Callable[[], list[torch.Tensor]]) -> torch.Tensor:
        """``scores`` (M, V) float32; ``prefixes()`` lazily gives the M token prefixes."""
        if not self.processors or scores.shape[0] == 0:
            return scores
        if self.input_free:
            dummy = torch.zeros(scores.shape[0], 1, dtype=torch.long, device=scores.device)
            return self.processors(dummy, scores)
        seqs = prefixes()
        out = torch.empty_like(scores)
        by_len: dict[int, list[int]] = {}
        for i, s in enumerate(seqs):
            by_len.setdefault(int(s.shape[0]), []).append(i)
        for idx in by_len.values():
            ids = torch.stack([seqs[i] for i in idx]).to(scores.device)
            sel = torch.tensor(idx, device=scores.device)
            out[sel] = self.processors(ids, scores[sel].clone())
        return out
