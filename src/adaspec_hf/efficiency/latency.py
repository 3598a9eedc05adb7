"""Latency model: forward time of target and draft predicted from a measured profile.

Why interpolation and not a fitted curve: measured costs are not smooth or even monotone (on CPU a
2-token verify was slower than an 8-token one; on GPU cost is flat until compute-bound), and the
planner's decisions hinge on exactly those kinks. So inside the measured grid we interpolate
piecewise-linearly per axis (rows, tokens per row, context) -- exact on grid points. Linear (not log)
coordinates are used because trilinear interpolation then reproduces any cost of the form
``a + b*R*T + c*R*T*C + d*R*C`` exactly, i.e. the roofline form is never worse than the fit between
points. A least-squares roofline fit of that form is used only beyond the grid: the prediction at the
nearest grid boundary is scaled by ``fit(x) / fit(boundary)``, which keeps it continuous and growing
with rows x tokens. Grid cells that were not measured (caps, time budget) are filled the same way.

Online correction: :meth:`LatencyModel.observe` keeps a bounded EMA (in log space) of the ratio
observed / predicted per model, applied to all its predictions.
"""
from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np

_AXES = ("rows", "tokens", "context")


class MeasuredLatency(Protocol):
    """What the latency model reads from a profile: points ``[rows, tokens, context, seconds]`` per
    model and the per-step overhead. :class:`adaspec_hf.profiling.store.Profile` is one; this module
    stays free of profiling's I/O (and of an import cycle with it) by asking only for these fields."""

    target: Sequence[Sequence[float]]
    draft: Sequence[Sequence[float]]
    overhead: float


@dataclass
class _Points:
    """A bare :class:`MeasuredLatency` for :meth:`LatencyModel.from_points`."""

    target: list[list[float]]
    draft: list[list[float]]
    overhead: float = 0.0


def _features(r: np.ndarray, t: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Roofline-like terms: fixed, compute (R*T), attention (R*T*C), KV read (R*C)."""
    one = np.ones_like(r, dtype=float)
    return np.stack([one, r * t, r * t * c, r * c], axis=-1)


class RooflineFit:
    """``a + b*R*T + c*R*T*C + d*R*C`` with non-negative coefficients, fit on relative error."""

    def __init__(self, coef: Sequence[float]) -> None:
        self.coef = [float(x) for x in coef]

    @classmethod
    def fit(cls, points: np.ndarray) -> "RooflineFit":
        P = np.asarray(points, dtype=float)
        X = _features(P[:, 0], P[:, 1], P[:, 2])
        y = P[:, 3]
        w = 1.0 / np.maximum(y, 1e-12)  # relative error: small points matter as much as big ones
        scale = np.maximum(np.abs(X).max(axis=0), 1e-12)
        Xs = X / scale
        best: tuple[float, np.ndarray] | None = None
        # Tiny active-set NNLS: try every subset of terms that contains a growth term (R*T or R*T*C).
        for k in range(1, 5):
            for cols in itertools.combinations(range(4), k):
                if 1 not in cols and 2 not in cols:
                    continue
                A = Xs[:, cols] * w[:, None]
                if np.linalg.matrix_rank(A) < len(cols):
                    continue
                sol, *_ = np.linalg.lstsq(A, y * w, rcond=None)
                if np.any(sol < 0) or not np.any(sol[[i for i, c in enumerate(cols) if c in (1, 2)]] > 0):
                    continue
                res = float(np.sum((A @ sol - y * w) ** 2))
                if best is None or res < best[0] - 1e-12:
                    coef = np.zeros(4)
                    coef[list(cols)] = sol / scale[list(cols)]
                    best = (res, coef)
        if best is None:  # degenerate data: proportional to rows*tokens
            rt = P[:, 0] * P[:, 1]
            return cls([0.0, float(y.sum() / max(rt.sum(), 1e-12)), 0.0, 0.0])
        return cls(best[1])

    def __call__(self, r: Any, t: Any, c: Any) -> Any:
        a, b, cc, d = self.coef
        return max(a + b * r * t + cc * r * t * c + d * r * c, 1e-12) if np.isscalar(r) and np.isscalar(t) and np.isscalar(c) \
            else np.maximum(a + b * r * t + cc * r * t * c + d * r * c, 1e-12)


def _bracket(ax: list[float], x: float) -> tuple[int, int, float]:
    """Indices and weight of ``x`` (already clamped into ``ax``) between two grid values."""
    if len(ax) == 1:
        return 0, 0, 0.0
    i = min(max(bisect.bisect_right(ax, x) - 1, 0), len(ax) - 2)
    return i, i + 1, (x - ax[i]) / (ax[i + 1] - ax[i])


class LatencyTable:
    """One model's measured grid, filled where unmeasured, with interpolation + extrapolation."""

    def __init__(self, points: Sequence[Sequence[float]]) -> None:
        P = np.asarray(points, dtype=float).reshape(-1, 4)
        if len(P) == 0:
            raise ValueError("no measured points")
        self.points = P
        self.fit = RooflineFit.fit(P)
        self.axes = [sorted(set(P[:, i].tolist())) for i in range(3)]
        shape = tuple(len(a) for a in self.axes)
        idx = [np.searchsorted(np.asarray(self.axes[i]), P[:, i]) for i in range(3)]
        V = np.full(shape, np.nan)
        V[idx[0], idx[1], idx[2]] = P[:, 3]
        self.measured = ~np.isnan(V)
        self.grid = self._fill(V)
        self._grid_list = self.grid.tolist()  # fast scalar path

    def _fill(self, V: np.ndarray) -> np.ndarray:
        """Fill unmeasured cells: interpolate the ratio to the fit along tokens, then rows, then context."""
        g = np.meshgrid(*[np.asarray(a) for a in self.axes], indexing="ij")
        F = self.fit(g[0], g[1], g[2])
        R = V / F
        while np.isnan(R).any():
            progressed = False
            for axis in (1, 0, 2):
                coords = np.asarray(self.axes[axis])
                Rm = np.moveaxis(R, axis, -1)
                for line in np.ndindex(Rm.shape[:-1]):
                    vals = Rm[line]
                    known = ~np.isnan(vals)
                    if known.any() and not known.all():
                        vals[~known] = np.interp(coords[~known], coords[known], vals[known])
                        progressed = True
            if not progressed:  # cannot happen with >= 1 point, but never loop forever
                R[np.isnan(R)] = 1.0
        return R * F

    def _interp(self, r: float, t: float, c: float) -> float:
        ir = _bracket(self.axes[0], r)
        it = _bracket(self.axes[1], t)
        ic = _bracket(self.axes[2], c)
        G = self._grid_list
        out = 0.0
        for i, wi in ((ir[0], 1 - ir[2]), (ir[1], ir[2])):
            if wi == 0.0:
                continue
            for j, wj in ((it[0], 1 - it[2]), (it[1], it[2])):
                if wj == 0.0:
                    continue
                for k, wk in ((ic[0], 1 - ic[2]), (ic[1], ic[2])):
                    if wk == 0.0:
                        continue
                    out += wi * wj * wk * G[i][j][k]
        return out

    def predict(self, rows: float, tokens: float, context: float) -> float:
        """Seconds for one forward of ``tokens`` new tokens in each of ``rows`` rows over ``context``."""
        if rows <= 0 or tokens <= 0:
            return 0.0
        ax = self.axes
        qr = min(max(rows, ax[0][0]), ax[0][-1])
        qt = min(max(tokens, ax[1][0]), ax[1][-1])
        qc = min(max(context, ax[2][0]), ax[2][-1])
        v = self._interp(qr, qt, qc)
        if qr != rows or qt != tokens or qc != context:
            v *= self.fit(float(rows), float(tokens), float(context)) / self.fit(qr, qt, qc)
        return v

    def predict_curve(self, rows: float, context: float, max_tokens: int) -> np.ndarray:
        """``predict(rows, t, context)`` for t = 1..max_tokens in a few numpy ops: a planner asks for
        this curve every step, and ~15 scalar interpolations cost a visible share of a CPU step."""
        t = np.arange(1, max_tokens + 1, dtype=float)
        if rows <= 0 or max_tokens <= 0:
            return np.zeros(max(max_tokens, 0))
        ax = self.axes
        qr = min(max(rows, ax[0][0]), ax[0][-1])
        qc = min(max(context, ax[2][0]), ax[2][-1])
        ir, ic = _bracket(ax[0], qr), _bracket(ax[2], qc)
        line = np.zeros(len(ax[1]))  # the grid along tokens at (qr, qc), bilinear in rows and context
        for i, wi in ((ir[0], 1 - ir[2]), (ir[1], ir[2])):
            for k, wk in ((ic[0], 1 - ic[2]), (ic[1], ic[2])):
                if wi and wk:
                    line += wi * wk * self.grid[i, :, k]
        qt = np.clip(t, ax[1][0], ax[1][-1])
        v = np.interp(qt, np.asarray(ax[1], dtype=float), line)
        out_of_grid = (qt != t) | (qr != rows) | (qc != context)
        if out_of_grid.any():
            ratio = self.fit(float(rows), t, float(context)) / self.fit(qr, qt, qc)
            v = np.where(out_of_grid, v * ratio, v)
        return v

    def predict_many(self, rows: Any, tokens: Any, context: Any) -> np.ndarray:
        """:meth:`predict` elementwise over broadcast arrays (a loop: for tables and plots, not hot paths)."""
        r, t, c = np.broadcast_arrays(*(np.asarray(x, dtype=float) for x in (rows, tokens, context)))
        flat = [self.predict(a, b, d) for a, b, d in zip(r.ravel().tolist(), t.ravel().tolist(), c.ravel().tolist())]
        return np.asarray(flat, dtype=float).reshape(r.shape)


class LatencyModel:
    """Predicted seconds for target/draft forwards and whole steps, corrected online."""

    def __init__(self, profile: MeasuredLatency | None = None, *, ema: float = 0.1,
                 bounds: tuple[float, float] = (0.2, 5.0)) -> None:
        self.ema = float(ema)
        self.bounds = (float(bounds[0]), float(bounds[1]))
        self.profile = profile
        self.tables: dict[str, LatencyTable] = {}
        self._overhead = 0.0
        if profile is not None:
            self.tables = {"target": LatencyTable(profile.target)}
            if len(profile.draft):  # none: no draft model (prompt lookup), drafting costs no forward
                self.tables["draft"] = LatencyTable(profile.draft)
            self._overhead = float(profile.overhead)
        self._log_ratio = {"target": 0.0, "draft": 0.0}
        self._seen = {"target": 0, "draft": 0}  # observations folded into each correction
        self._overhead_obs: float | None = None

    @classmethod
    def from_points(cls, target: Sequence[Sequence[float]], draft: Sequence[Sequence[float]],
                    overhead: float = 0.0, **kwargs: Any) -> "LatencyModel":
        """Build from raw ``[rows, tokens, context, seconds]`` lists (tests, synthetic models)."""
        return cls(_Points([list(p) for p in target], [list(p) for p in draft], overhead), **kwargs)

    # -- predictions ---------------------------------------------------------------------------
    def correction(self, which: str) -> float:
        """Current observed/predicted factor applied to ``which`` ("target" or "draft")."""
        return math.exp(self._log_ratio[which])

    def base_time(self, which: str, rows: float, tokens_per_row: float, context: float) -> float:
        """Prediction from the profile alone (no online correction); 0 for a draft that is not there."""
        if which == "draft" and "draft" not in self.tables and self.profile is not None:
            return 0.0
        return self.tables[which].predict(rows, tokens_per_row, context)

    def target_time(self, rows: float, tokens_per_row: float, context: float) -> float:
        """Seconds of one target forward (e.g. a verify of ``tokens_per_row`` nodes per row)."""
        return self.base_time("target", rows, tokens_per_row, context) * math.exp(self._log_ratio["target"])

    def draft_time(self, rows: float, tokens_per_row: float, context: float) -> float:
        """Seconds of one draft forward."""
        return self.base_time("draft", rows, tokens_per_row, context) * math.exp(self._log_ratio["draft"])

    def target_curve(self, rows: float, context: float, max_tokens: int) -> np.ndarray:
        """``target_time(rows, k, context)`` for k = 0..max_tokens (k=0 costs 0), for planners."""
        curve = self.tables["target"].predict_curve(rows, context, max_tokens)
        return np.concatenate([[0.0], curve * math.exp(self._log_ratio["target"])])

    @property
    def overhead(self) -> float:
        """Fixed per-step seconds besides the forwards (profiled, then the observed EMA)."""
        return self._overhead if self._overhead_obs is None else self._overhead_obs

    def step_time(self, rows: float, draft_levels: Sequence[tuple[float, float]], verify_tokens_per_row: float,
                  context: float) -> float:
        """Overhead + one draft forward per ``(rows, tokens)`` level + one verify forward.

        ``verify_tokens_per_row`` counts every query token of the target forward (the last committed
        token plus the drafted nodes); 0 means no target forward.
        """
        t = self.overhead
        for r, k in draft_levels:
            t += self.draft_time(r, k, context)
        return t + self.target_time(rows, verify_tokens_per_row, context)

    # -- online correction -----------------------------------------------------------------------
    def observe(self, which: str, rows: float, tokens_per_row: float, context: float, seconds: float) -> None:
        """Fold one observed duration into the EMA correction of ``which``.

        ``which`` is "target", "draft" or "overhead" (for "overhead" the shape arguments are ignored).
        """
        if not (seconds > 0 and math.isfinite(seconds)):
            return
        if which == "overhead":
            prev = self.overhead
            self._overhead_obs = (1 - self.ema) * prev + self.ema * seconds
            return
        base = self.base_time(which, rows, tokens_per_row, context)
        if base <= 0:
            return
        lo, hi = math.log(self.bounds[0]), math.log(self.bounds[1])
        obs = min(max(math.log(seconds / base), lo), hi)
        # a running mean until 1/ema observations, an EMA after: the first steps of a session set
        # the machine's speed at once instead of creeping toward it (a lagging correction made every
        # shape measured early look dearer than the profile, for as long as it was not re-measured)
        self._seen[which] += 1
        w = max(self.ema, 1.0 / self._seen[which])
        self._log_ratio[which] = min(max((1 - w) * self._log_ratio[which] + w * obs, lo), hi)

    def reset_corrections(self) -> None:
        self._log_ratio = {"target": 0.0, "draft": 0.0}
        self._seen = {"target": 0, "draft": 0}
        self._overhead_obs = None
