"""Acceptance model: P(target accepts a drafted node | its parent was accepted).

Why: the planner's expected tokens are sums of path products of these probabilities, and the raw draft
probability is a biased estimate of them (drafts are over-confident on hard text, under-confident on
loops). We start from the identity (pred = draft prob) and calibrate online from verify outcomes.

Model: ``pred(p, d) = clamp((p + delta(p)) * f(d), 0, 1)``.
- ``delta`` is a binned residual calibration: per bin of draft probability, the observed mean of
  ``outcome - p`` shrunk toward 0 by a Beta-style prior of ``prior_strength`` pseudo-observations at
  the identity; made monotone (isotonic, pool-adjacent-violators over the bins) and interpolated
  linearly between bin centres, so the map is continuous and non-decreasing in ``p``.
- ``f(d)`` is an optional multiplicative depth factor (observed / predicted per depth, shrunk to 1).
Statistics decay with a half-life in samples so calibration follows drifting text.
Cost: after each :meth:`update` the map is tabulated once per depth on a fine grid of draft
probabilities (numpy, ~10 bins); :meth:`predict` is then a gather + lerp in that table, and
:meth:`update` one bincount -- vectorised over nodes, no Python loop over them.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


_F32_0, _F32_1 = np.float32(0.0), np.float32(1.0)


class AcceptanceModel:
    """Calibrated per-node acceptance probability from draft probability and depth."""

    def __init__(self, n_bins: int = 10, *, max_depth: int = 16, depth_adjust: bool = True,
                 prior_strength: float = 20.0, depth_prior_strength: float = 50.0,
                 half_life: float | None = 5000.0, depth_bounds: tuple[float, float] = (0.25, 4.0)) -> None:
        self.n_bins = int(n_bins)
        self.max_depth = int(max_depth)
        self.depth_adjust = bool(depth_adjust)
        self.prior_strength = float(prior_strength)
        self.depth_prior_strength = float(depth_prior_strength)
        self.half_life = half_life
        self.depth_bounds = (float(depth_bounds[0]), float(depth_bounds[1]))
        # All sufficient statistics in one float64 vector, so that decay and accumulation are one op
        # each: [n | sum_y | sum_p] per probability bin, then [sum_y | sum_pred] per depth.
        self.stats = torch.zeros(3 * self.n_bins + 2 * (self.max_depth + 1), dtype=torch.float64)
        self.seen = 0.0
        self._res = 16 * self.n_bins  # lookup-table resolution; bin centres fall on its knots
        self._centers = (np.arange(self.n_bins) + 0.5) / self.n_bins
        self._grid = np.linspace(0.0, 1.0, self._res + 1)
        self._luts: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._cpu_lut: torch.Tensor | None = None
        self._np_lut64: np.ndarray | None = None  # the table in numpy (None: stale)
        self._np_lut: np.ndarray | None = None  # float32 copy for predict_np
        self._n_total: float | None = None  # cached sum of the bin counts (planners read it every level)

    # -- statistics views ------------------------------------------------------------------------
    @property
    def n(self) -> torch.Tensor:
        return self.stats[: self.n_bins]

    @property
    def sum_y(self) -> torch.Tensor:
        return self.stats[self.n_bins: 2 * self.n_bins]

    @property
    def sum_p(self) -> torch.Tensor:
        return self.stats[2 * self.n_bins: 3 * self.n_bins]

    @property
    def depth_y(self) -> torch.Tensor:
        o = 3 * self.n_bins
        return self.stats[o: o + self.max_depth + 1]

    @property
    def depth_pred(self) -> torch.Tensor:
        o = 3 * self.n_bins + self.max_depth + 1
        return self.stats[o:]

    @property
    def n_total(self) -> float:
        """Decayed number of nodes the calibration rests on (a Python float, cached until the next update)."""
        if self._n_total is None:
            self._n_total = float(self.n.sum())
        return self._n_total

    # -- tables ----------------------------------------------------------------------------------
    def calibration(self) -> tuple[np.ndarray, np.ndarray]:
        """(isotonic calibrated rate at bin centres, depth factors), float64 numpy.

        numpy, not torch: these are ~10-element vectors, where per-op overhead is all that counts.
        """
        B = self.n_bins
        st = self.stats.numpy()
        n, sy, sp = st[:B], st[B:2 * B], st[2 * B:3 * B]
        centers = self._centers
        rate = (centers + (sy - sp) / (n + self.prior_strength)).tolist()
        w = (n + self.prior_strength).tolist()
        # pool adjacent violators: make the rate at bin centres non-decreasing in draft prob
        blocks: list[list[float]] = []  # [value, weight, count]
        for v, wt in zip(rate, w):
            blocks.append([v, wt, 1])
            while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
                v2, w2, c2 = blocks.pop()
                v1, w1, c1 = blocks.pop()
                blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
        iso = np.asarray([b[0] for b in blocks for _ in range(b[2])])
        if self.depth_adjust:
            D = self.max_depth + 1
            dy, dp = st[3 * B:3 * B + D], st[3 * B + D:]
            kd = self.depth_prior_strength
            lo, hi = self.depth_bounds  # minimum/maximum: np.clip's dispatch costs more on short vectors
            f = np.minimum(np.maximum((dy + kd) / (dp + kd), lo), hi)
        else:
            f = np.ones(1)
        return iso, f

    def _tables(self) -> tuple[np.ndarray, np.ndarray]:
        """The lookup table in numpy, float64 and float32 (rebuilt after an update; the torch copies
        of :meth:`_lut` only when a torch prediction asks for them)."""
        if self._np_lut64 is None:
            iso, f = self.calibration()
            centers, grid = self._centers, self._grid
            # np.interp extends the end values: delta is constant beyond the outer bin centres
            base = np.minimum(np.maximum(grid + np.interp(grid, centers, iso - centers), 0.0), 1.0)
            self._np_lut64 = np.concatenate([np.minimum(np.maximum(base[None, :] * f[:, None], 0.0), 1.0), base[None, :]])
            self._np_lut = self._np_lut64.astype(np.float32)
            self._cpu_lut = None
            self._luts.clear()
        return self._np_lut64, self._np_lut

    def _lut(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(depths + 1, res + 1) table of predictions on a grid of draft probs (exact at the knots).

        Row d is depth d (row 0 only, without depth adjustment); the last row is depth-free.
        """
        if self._cpu_lut is None:
            self._cpu_lut = torch.from_numpy(self._tables()[0])
        key = (device, dtype)
        if key not in self._luts:
            self._luts[key] = self._cpu_lut.to(device, dtype)
        return self._luts[key]

    # -- public API ------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, draft_prob: torch.Tensor, depth: torch.Tensor | int) -> torch.Tensor:
        """Acceptance probability of each node (same shape as ``draft_prob``, on its device).

        ``depth`` is 1 for a child of the last committed token, 2 for its child, ... (broadcastable).
        """
        p = draft_prob.detach()
        if not p.is_floating_point():
            p = p.float()
        lut = self._lut(p.device, p.dtype)
        R = self._res
        u = p.clamp(0.0, 1.0) * R
        i0 = u.floor().long().clamp_(max=R - 1)
        w = u - i0
        if self.depth_adjust:
            d = torch.as_tensor(depth, device=p.device).long().clamp(0, self.max_depth)
            lo, hi = lut[d, i0], lut[d, i0 + 1]
        else:
            lo, hi = lut[0, i0], lut[0, i0 + 1]
        return lo + w * (hi - lo)

    def predict_np(self, draft_prob: np.ndarray, depth: "int | np.ndarray") -> np.ndarray:
        """:meth:`predict` for small numpy arrays, in float32 like the torch path (the planners call
        it once per draft level and per verified step: torch's per-op overhead would dominate)."""
        lut = self._tables()[1]
        R = self._res
        # np.minimum/maximum, not np.clip: on a handful of elements clip's dispatch costs ~10x more
        u = np.minimum(np.maximum(np.asarray(draft_prob, dtype=np.float32), np.float32(0)), np.float32(1)) * np.float32(R)
        i0 = np.minimum(np.floor(u).astype(np.int64), R - 1)
        w = u - i0.astype(np.float32)
        if not self.depth_adjust:
            d = 0
        elif np.ndim(depth):
            d = np.minimum(np.maximum(np.asarray(depth, dtype=np.int64), 0), self.max_depth)
        else:
            d = min(max(int(depth), 0), self.max_depth)
        lo, hi = lut[d, i0], lut[d, i0 + 1]
        return lo + w * (hi - lo)

    def predict_one(self, draft_prob: float, depth: int) -> np.float32:
        """:meth:`predict_np` for one node, on float32 scalars: the same float32 operations in the
        same order, so the same value. At batch 1 the chain planner asks for one prediction per draft
        level, where even a handful of numpy calls on one-element arrays cost ~0.1 ms each level
        (measured in the decoding loop, whose forwards leave the CPU's caches cold)."""
        table = self._tables()[1]
        R = self._res
        u = min(max(np.float32(draft_prob), _F32_0), _F32_1) * np.float32(R)
        i0 = min(int(math.floor(u)), R - 1)
        w = u - np.float32(i0)
        d = min(max(int(depth), 0), self.max_depth) if self.depth_adjust else 0
        row = table[d]
        lo, hi = row[i0], row[i0 + 1]
        return lo + w * (hi - lo)

    def predict_list(self, draft_probs: list[float], depth: int) -> list[np.float32]:
        """:meth:`predict_one` for a few nodes at one depth (a tree level's candidates at batch 1):
        the same float32 operations, the table looked up once."""
        row = self._tables()[1][min(max(int(depth), 0), self.max_depth) if self.depth_adjust else 0]
        R = self._res
        scale, top = np.float32(R), R - 1
        out = []
        for x in draft_probs:
            u = min(max(np.float32(x), _F32_0), _F32_1) * scale
            i0 = min(int(math.floor(u)), top)
            lo = row[i0]
            out.append(lo + (u - np.float32(i0)) * (row[i0 + 1] - lo))
        return out

    @torch.no_grad()
    def update(self, draft_prob: torch.Tensor, depth: torch.Tensor | int, accepted: torch.Tensor) -> None:
        """Learn from verified nodes.

        Pass only nodes that were actually tested, i.e. whose parent was accepted (for a chain: the
        accepted prefix and the first rejected node). ``accepted`` is 0/1 (greedy) or, for sampling,
        the acceptance rule's own probability for the node (a lower-variance float target).
        """
        p = draft_prob.detach().reshape(-1).to("cpu", torch.float64).numpy()
        y = np.broadcast_to(torch.as_tensor(accepted).detach().to("cpu", torch.float64).numpy(),
                            tuple(draft_prob.shape)).reshape(-1)
        d = np.broadcast_to(torch.as_tensor(depth).detach().to("cpu").long().numpy(), tuple(draft_prob.shape))
        self.update_np(p, d.reshape(-1), y)

    def update_np(self, draft_prob: np.ndarray, depth: "np.ndarray | int", accepted: np.ndarray) -> None:
        """:meth:`update` on numpy arrays (1-D, or ``depth`` / ``accepted`` broadcastable)."""
        # numpy on the CPU: a step verifies a handful of nodes, where torch's per-op cost dominates (and
        # on so few elements np.clip and np.broadcast_to cost more than the arithmetic: a step calls this
        # once per kind of node, between forwards that leave the CPU's caches cold)
        p = np.minimum(np.maximum(np.asarray(draft_prob, dtype=np.float64).reshape(-1), 0.0), 1.0)
        n = p.size
        if n == 0:
            return
        y = _as_shape(accepted, np.float64, p.shape)
        B, D = self.n_bins, self.max_depth + 1
        b = np.minimum((p * B).astype(np.int64), B - 1)
        if self.depth_adjust:
            d = np.minimum(np.maximum(_as_shape(depth, np.int64, p.shape), 0), self.max_depth)
            # depth-free prediction under the calibration before this batch (honest residuals):
            # the last row of the lookup table
            lut = self._tables()[0][-1]
            u = p * self._res
            i0 = np.minimum(np.floor(u).astype(np.int64), self._res - 1)
            lo = lut[i0]
            base = lo + (u - i0) * (lut[i0 + 1] - lo)
            idx = np.concatenate([b, b + B, b + 2 * B, d + 3 * B, d + 3 * B + D])
            wts = np.concatenate([np.ones_like(p), y, p, y, base])
        else:
            idx = np.concatenate([b, b + B, b + 2 * B])
            wts = np.concatenate([np.ones_like(p), y, p])
        stats = self.stats.numpy()  # shares memory with the tensor
        if self.half_life:
            stats *= 0.5 ** (n / self.half_life)
        stats += np.bincount(idx, weights=wts, minlength=stats.size)
        self.seen += n
        self._cpu_lut = self._np_lut64 = None
        self._n_total = None

    def update_list(self, draft_prob: list[float], depth: list[int], accepted: list[float]) -> None:
        """:meth:`update_np` for a handful of nodes given as Python lists (one row's tested nodes at
        batch 1), with no numpy call per node: the same float64 operations in the same order, so the
        same statistics bit for bit (``np.bincount`` sums each bin's weights in node order from 0,
        then adds the sums to the decayed statistics; bins are disjoint per kind of statistic)."""
        n = len(draft_prob)
        if n == 0:
            return
        B, D, R = self.n_bins, self.max_depth + 1, self._res
        sums: dict[int, float] = {}
        p = [min(max(float(x), 0.0), 1.0) for x in draft_prob]
        bins = [min(int(x * B), B - 1) for x in p]
        parts = [(bins, [1.0] * n), ([b + B for b in bins], accepted), ([b + 2 * B for b in bins], p)]
        if self.depth_adjust:
            d = [min(max(int(x), 0), self.max_depth) for x in depth]
            lut = self._tables()[0][-1].tolist()  # depth-free predictions before this batch, as update_np
            base = []
            for x in p:
                u = x * R
                i0 = min(math.floor(u), R - 1)
                lo = lut[i0]
                base.append(lo + (u - i0) * (lut[i0 + 1] - lo))
            parts += [([k + 3 * B for k in d], accepted), ([k + 3 * B + D for k in d], base)]
        for idx, wts in parts:
            for i, w in zip(idx, wts):
                sums[i] = sums.get(i, 0.0) + float(w)
        stats = self.stats.numpy()  # shares memory with the tensor
        if self.half_life:
            stats *= 0.5 ** (n / self.half_life)
        for i, v in sums.items():
            stats[i] += v
        self.seen += n
        self._cpu_lut = self._np_lut64 = None
        self._n_total = None

    @torch.no_grad()
    def ece(self, draft_prob: torch.Tensor, depth: torch.Tensor | int, outcome: torch.Tensor,
            n_bins: int = 10) -> float:
        """Expected calibration error of this model's predictions on (draft_prob, depth, outcome)."""
        pred = self.predict(draft_prob, depth)
        return expected_calibration_error(pred, torch.as_tensor(outcome), n_bins)

    def state_dict(self) -> dict[str, Any]:
        """Config + statistics (tensors and plain numbers), for torch.save or JSON via .tolist()."""
        return {
            "config": {"n_bins": self.n_bins, "max_depth": self.max_depth, "depth_adjust": self.depth_adjust,
                       "prior_strength": self.prior_strength, "depth_prior_strength": self.depth_prior_strength,
                       "half_life": self.half_life, "depth_bounds": list(self.depth_bounds)},
            "stats": self.stats.clone(),
            "seen": self.seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        cfg = dict(state.get("config", {}))
        if cfg:
            cfg["depth_bounds"] = tuple(cfg.get("depth_bounds", self.depth_bounds))
            self.__init__(**cfg)  # type: ignore[misc]
        stats = torch.as_tensor(state["stats"], dtype=torch.float64).clone()
        if stats.shape != self.stats.shape:
            raise ValueError(f"stats of shape {tuple(stats.shape)} do not fit {tuple(self.stats.shape)}")
        self.stats = stats
        self.seen = float(state.get("seen", 0.0))
        self._cpu_lut = self._np_lut64 = None
        self._n_total = None

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "AcceptanceModel":
        m = cls()
        m.load_state_dict(state)
        return m


def _as_shape(x, dtype, shape: tuple[int, ...]) -> np.ndarray:
    """``x`` as a ``dtype`` array of ``shape``: broadcast only when it is not one already."""
    a = np.asarray(x, dtype=dtype)
    return a if a.shape == shape else np.broadcast_to(a, shape)


def expected_calibration_error(pred: torch.Tensor, outcome: torch.Tensor, n_bins: int = 10) -> float:
    """Sum over equal-width bins of predicted probability: (bin share) * |mean pred - mean outcome|."""
    pred = pred.detach().reshape(-1).to("cpu", torch.float64)
    y = outcome.detach().reshape(-1).to("cpu", torch.float64)
    if pred.numel() == 0:
        return math.nan
    b = (pred * n_bins).long().clamp(0, n_bins - 1)
    sp = torch.bincount(b, weights=pred, minlength=n_bins)
    sy = torch.bincount(b, weights=y, minlength=n_bins)
    return float((sp - sy).abs().sum() / pred.numel())
