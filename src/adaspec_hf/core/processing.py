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

# (logits (M, V) float32, provider of (batch row, prefix) pairs) -> processed scores (M, V)
ProcessFn = Callable[[torch.Tensor, Callable[[], list[tuple[int, torch.Tensor]]]], torch.Tensor]

INPUT_FREE = (
    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper,
    TypicalLogitsWarper, EpsilonLogitsWarper, EtaLogitsWarper,
)


class Processing:
    """``prefixes()`` yields ``(row, prefix)`` pairs: the original batch row of each node and its tokens.

    Some processors keep per-row state sized to the original batch (e.g. repetition penalty's
    ``prompt_ignore_length``), so input-dependent processors are called with batches laid out as in
    HF ``generate``: ``batch_size`` rows, each node in its own row's slot (other slots are filler).
    """

    def __init__(self, processors: LogitsProcessorList | None, batch_size: int = 1):
        self.processors = processors if processors is not None else LogitsProcessorList()
        self.input_free = all(isinstance(p, INPUT_FREE) for p in self.processors)
        self.batch_size = batch_size

    def __bool__(self) -> bool:
        return len(self.processors) > 0

    def __call__(
        self, scores: torch.Tensor, prefixes: Callable[[], list[tuple[int, torch.Tensor]]]
    ) -> torch.Tensor:
        """``scores`` (M, V) float32; ``prefixes()`` lazily gives the M (row, prefix) pairs."""
        if not self.processors or scores.shape[0] == 0:
            return scores
        if self.input_free:
            dummy = torch.zeros(scores.shape[0], 1, dtype=torch.long, device=scores.device)
            return self.processors(dummy, scores)
        items = prefixes()
        out = torch.empty_like(scores)
        # rounds: one call per (prefix length, k-th node of a row at that length)
        rounds: dict[tuple[int, int], dict[int, int]] = {}
        seen: dict[tuple[int, int], int] = {}
        for i, (row, seq) in enumerate(items):
            length = int(seq.shape[0])
            k = seen.get((length, row), 0)
            seen[(length, row)] = k + 1
            rounds.setdefault((length, k), {})[row] = i
        for (length, _), members in rounds.items():
            filler = items[next(iter(members.values()))][1]
            ids = torch.stack([items[members[r]][1] if r in members else filler for r in range(self.batch_size)])
            sc = scores.new_zeros(self.batch_size, scores.shape[1])
            rows = torch.tensor(list(members.keys()), device=scores.device)
            idx = torch.tensor(list(members.values()), device=scores.device)
            sc[rows] = scores[idx]
            out[idx] = self.processors(ids.to(scores.device), sc)[rows]
        return out


def identity_process(scores: torch.Tensor, prefixes: Callable[[], list]) -> torch.Tensor:
    """The :data:`ProcessFn` of rows without logits processors."""
    return scores
