"""Traces: per row, the target's output and what the draft predicts at every position of it.

Why positions, not steps: speculation never changes the target's output (greedy: its argmax path;
sampling with position-keyed draws: the draw at each position), only how many target passes it
takes. So one pass of the draft over ``prompt + output`` (teacher forcing) tells, for *every*
position, the draft's top candidates and whether the one on the output path is there. A chain
drafted from position t is accepted up to the first position whose draft argmax differs from the
output, whatever policy chose it; a tree node is accepted iff its parent is and its token is the
output token at its position. Nodes below a rejected node never count; their draft probabilities
(which a policy may read to decide whether to draft on) are taken from the same position on the
output path, an approximation the simulator's fidelity test bounds.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from adaspec_hf.core.race import RaceNoise, race_sample, race_scores

TRACE_FORMAT = 2  # 2: sampled traces use the engine's race (candidates ranked by the shared noise)
DEFAULT_WIDTH = 4  # draft candidates kept per position: enough for the widest default tree


@dataclass
class RowTrace:
    prompt_len: int
    tokens: list[int]  # the target's output (generated tokens only)
    top_tokens: np.ndarray  # (T, W) the draft's top-W tokens for output position t, given prompt + tokens[:t]
    top_probs: np.ndarray  # (T, W) their draft probabilities (processed: temperature etc.)

    def __post_init__(self) -> None:
        self.top_tokens = np.asarray(self.top_tokens, dtype=np.int64).reshape(len(self.tokens), -1)
        self.top_probs = np.asarray(self.top_probs, dtype=np.float64).reshape(len(self.tokens), -1)

    @property
    def length(self) -> int:
        return len(self.tokens)

    def run_length(self, t: int) -> int:
        """Consecutive output positions from ``t`` on where the draft's argmax is the output token:
        the tokens a chain drafted at ``t`` would have accepted (unbounded by its length)."""
        n = 0
        while t + n < self.length and self.top_tokens[t + n, 0] == self.tokens[t + n]:
            n += 1
        return n

    def acceptance_rate(self) -> float:
        return float(np.mean(self.top_tokens[1:, 0] == np.asarray(self.tokens[1:]))) if self.length > 1 else 0.0


@dataclass
class Trace:
    rows: list[RowTrace]
    sampling: bool = False
    meta: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"format": TRACE_FORMAT, "sampling": self.sampling, "meta": self.meta,
                "rows": [{"prompt_len": r.prompt_len, "tokens": list(map(int, r.tokens)),
                          "top_tokens": r.top_tokens.tolist(), "top_probs": np.round(r.top_probs, 6).tolist()}
                         for r in self.rows]}
        path.write_text(json.dumps(data))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Trace":
        data = json.loads(Path(path).read_text())
        if data.get("format") != TRACE_FORMAT:
            raise ValueError(f"{path}: trace format {data.get('format')!r}, expected {TRACE_FORMAT}")
        return cls([RowTrace(**r) for r in data["rows"]], bool(data["sampling"]), data.get("meta", {}))


class _RaceSampler(LogitsProcessor):
    """Turns greedy ``generate`` into the engine's seeded sampler: the next token is the winner of
    the row's race (:mod:`adaspec_hf.core.race`) over ``softmax(scores / temperature)``."""

    def __init__(self, key: int, temperature: float, noise: RaceNoise):
        self.key, self.temperature, self.noise = key, temperature, noise

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        p = torch.softmax(scores.float() / self.temperature, -1)
        y = race_sample(p, torch.tensor([self.key]), torch.tensor([input_ids.shape[1]]), self.noise)
        out = torch.full_like(scores, -float("inf"))
        out[0, int(y[0])] = 0.0
        return out


@torch.no_grad()
def record_trace(target, draft, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, do_sample: bool = False,
                 temperature: float = 1.0, seed: int = 0, width: int = DEFAULT_WIDTH, pad_token_id: int = 0,
                 eos_token_id: int | None = None, outputs: Sequence[Sequence[int]] | None = None) -> Trace:
    """The target's output per prompt (its own ``generate``: greedy, or sampled by the engine's
    seeded race with key ``seed + i``), then the draft's top-``width`` candidates at every output
    position (one teacher-forced draft forward per row). Sampled: the candidates are ranked by the
    same race over the draft's distribution, as the drafter ranks them, with the draft's top-w
    probabilities as their confidences. ``outputs``: the target's outputs if already known (e.g.
    another draft over the same target, recorded with the same ``seed``)."""
    gen = getattr(target, "_adaspec_original_generate", None) or target.generate
    rows = []
    for i, prompt in enumerate(prompts):
        noise = RaceNoise()  # per row: its sampler and its candidate ranking read the same vectors
        ids = torch.tensor([list(prompt)], dtype=torch.long, device=target.device)
        if outputs is not None:
            y = list(outputs[i])
        else:
            kw = dict(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id,
                      attention_mask=torch.ones_like(ids))
            if eos_token_id is not None:
                kw["eos_token_id"] = eos_token_id
            if do_sample:
                kw["logits_processor"] = LogitsProcessorList([_RaceSampler(seed + i, temperature, noise)])
            out = gen(ids, **kw)
            y = out[0, ids.shape[1]:].tolist()
            if eos_token_id is not None and eos_token_id in y:  # HF pads finished rows: keep through EOS
                y = y[: y.index(eos_token_id) + 1]
        full = torch.tensor([list(prompt) + y], dtype=torch.long, device=draft.device)
        logits = draft(full).logits[0, ids.shape[1] - 1: ids.shape[1] - 1 + len(y)].float()
        probs = torch.softmax(logits / (temperature if do_sample else 1.0), -1)
        k = min(width, probs.shape[-1])
        p, tok = probs.topk(k, dim=-1)
        if do_sample:
            pos = torch.arange(len(prompt), len(prompt) + len(y))
            e = noise(torch.full((len(y),), seed + i), pos, probs.shape[-1], probs.device)
            tok = race_scores(probs, e).topk(k, dim=-1).indices
        rows.append(RowTrace(len(prompt), y, tok.cpu().numpy(), p.cpu().numpy()))
    return Trace(rows, do_sample, {"max_new_tokens": max_new_tokens, "temperature": temperature if do_sample else 0.0,
                                   "width": width, "seed": seed, "sampler": "race" if do_sample else "greedy"})


def synthetic_trace(n_rows: int, length: int, acceptance: float, *, confidence: float | None = None, width: int = 2,
                    seed: int = 0, prompt_len: int = 16) -> Trace:
    """A trace where the draft's argmax is the output token with probability ``acceptance`` at
    every position, and says so with probability ``confidence`` (default: calibrated, = acceptance)."""
    rng = np.random.default_rng(seed)
    conf = acceptance if confidence is None else confidence
    rows = []
    for _ in range(n_rows):
        y = rng.integers(10, 1000, size=length)
        hit = rng.random(length) < acceptance
        top = np.stack([np.where(hit, y, y + 1)] + [y + 2 + j for j in range(width - 1)], 1)
        probs = np.concatenate([np.full((length, 1), conf), np.full((length, width - 1), (1 - conf) / width)], 1)
        rows.append(RowTrace(prompt_len, y.tolist(), top, probs))
    return Trace(rows, False, {"synthetic": {"acceptance": acceptance, "confidence": conf}})
