"""Seeded sampling by an exponential race, with the noise shared by the target and the draft.

The token at sequence position ``t`` of a row is ``argmax_x p(x) / E_x``, where ``E`` is a vector of
i.i.d. Exp(1) variables over the vocabulary that depends only on the row's key and ``t``. This is
the Gumbel-max trick in multiplicative form: ``P(argmax = x) = p(x)`` exactly, so the text follows
the target's (processed) distribution.

Why this sampler: the draft may read the same ``E``. A draft that ranks its candidates by
``q(x) / E_x`` proposes the token the target will pick whenever the two distributions agree on
that race, which happens with probability close to speculative sampling's ``1 - TV(p, q)`` (at
least ``(1 - TV) / (1 + TV)``), where a draft independent of ``E`` is accepted with only ``p(x)``.
Its second, third ... candidates in that ranking are the natural siblings of a tree. Exactness
never depends on the draft: the target's token is a fixed function of ``p`` and ``E``, so any
drafting or pruning decision is lossless, and a seed gives the same text whatever is drafted.

The noise comes from a CPU ``torch.Generator`` seeded by a 64-bit hash of (key, position), so it is
the same on every device; one step asks for a handful of (row, position) vectors, and
:class:`RaceNoise` makes each once and hands it to both the drafter and the verifier.
"""
from __future__ import annotations

import torch

NO_TOKEN = -1  # token of a row whose distribution has no valid token
_M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def race_seed(key: int, position: int) -> int:
    """The generator seed of a row's race at one sequence position (a 64-bit hash of both)."""
    return _splitmix64(_splitmix64(int(key)) ^ (int(position) & _M64))


class RaceNoise:
    """Exp(1) noise per (row key, position) over a vocabulary of ``vocab`` tokens (float64, CPU
    generated), cached for the life of the object (one step: the drafter's levels and the verify
    walk ask for the same positions)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, int, int], torch.Tensor] = {}
        self._gen = torch.Generator()

    def row(self, key: int, position: int, vocab: int) -> torch.Tensor:
        k = (int(key), int(position), int(vocab))
        e = self._cache.get(k)
        if e is None:
            self._gen.manual_seed(race_seed(key, position))
            e = torch.empty(vocab, dtype=torch.float64).exponential_(generator=self._gen)
            self._cache[k] = e
        return e

    def __call__(self, keys: torch.Tensor, positions: torch.Tensor, vocab: int,
                 device: torch.device | str | None = None) -> torch.Tensor:
        """(B, vocab) noise of rows ``keys`` (B,) at sequence positions ``positions`` (B,)."""
        rows = [self.row(k, t, vocab) for k, t in zip(keys.tolist(), positions.tolist())]
        out = torch.stack(rows) if rows else torch.zeros(0, vocab, dtype=torch.float64)
        return out.to(device if device is not None else keys.device)


def race_scores(p: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``p / E`` with tokens of probability 0 (or below) ranked last: argmax / topk of it is the
    race's winner / its runners-up."""
    p = p.to(noise.dtype)
    return torch.where(p > 0, p / noise, torch.full_like(p, -1.0))


def race_sample(p: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
                noise: RaceNoise | None = None) -> torch.Tensor:
    """(B,) the seeded sample of rows ``keys`` (B,) at sequence positions ``positions`` (B,) from
    ``p`` (B, V): the race's winner under their noise (from ``noise``'s cache when given)."""
    noise = noise if noise is not None else RaceNoise()
    return race_token(p, noise(keys, positions, p.shape[-1], p.device))


def race_token(p: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """(B,) winner of each row's race over ``p`` (B, V), ``NO_TOKEN`` for a row whose distribution
    has no valid token (all probabilities 0, a negative or a non-finite one)."""
    ok = torch.isfinite(p).all(-1) & (p >= 0).all(-1) & (p > 0).any(-1)
    y = race_scores(p, noise).argmax(-1)
    return torch.where(ok, y, NO_TOKEN)
