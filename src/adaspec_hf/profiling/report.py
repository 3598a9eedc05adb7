"""Reading a latency profile: tables, plots, and how well the latency model predicts unseen points.

The held-out checks are what says whether a profile's grid is dense enough: each point left out is
predicted by a :class:`~adaspec_hf.efficiency.latency.LatencyTable` built without it, so a large
error means the planner would be misled between the measured points.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from adaspec_hf.efficiency.latency import LatencyModel, LatencyTable
from adaspec_hf.profiling.store import Profile

PLOT_POINTS = 200   # samples along each predicted curve
PLOT_EXTEND = 1.5   # predicted curves run this far past the largest measured tokens (extrapolation shown)
PLOT_DPI = 110


def format_table(prof: Profile) -> str:
    """Per model and context: a rows x tokens table of forward times in ms."""
    lines = []
    for which in ("target", "draft"):
        pts = prof.points(which)
        if not pts:
            continue
        toks = sorted({int(p[1]) for p in pts})
        for c in sorted({int(p[2]) for p in pts}):
            lines.append(f"{which} forward ms, context {c}   (rows \\ tokens per row)")
            lines.append("rows " + "".join(f"{t:>8d}" for t in toks))
            for r in sorted({int(p[0]) for p in pts}):
                vals = {int(p[1]): p[3] for p in pts if int(p[0]) == r and int(p[2]) == c}
                lines.append(f"{r:>4d} " + "".join(f"{vals[t] * 1e3:8.2f}" if t in vals else f"{'-':>8}" for t in toks))
            lines.append("")
    lines.append(f"fixed per-step overhead: {prof.overhead * 1e3:.3f} ms")
    return "\n".join(lines)


def plot_profile(prof: Profile, path: str | os.PathLike) -> Path:
    """PNG of measured latency vs the model's prediction (with held-out predictions)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = LatencyModel(prof)
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for row, which in enumerate(("target", "draft")):
        pts = np.asarray(prof.points(which), dtype=float)
        ax = axes[row, 0]
        if len(pts):
            ctxs = sorted(set(pts[:, 2]))
            c = ctxs[len(ctxs) // 2]
            tmax = pts[:, 1].max()
            tt = np.linspace(1, PLOT_EXTEND * tmax, PLOT_POINTS)
            fn = model.target_time if which == "target" else model.draft_time
            for i, r in enumerate(sorted(set(pts[:, 0]))):
                sel = (pts[:, 0] == r) & (pts[:, 2] == c)
                col = f"C{i % 10}"
                ax.plot(pts[sel, 1], pts[sel, 3] * 1e3, "o", color=col, label=f"rows={int(r)}")
                ax.plot(tt, [fn(int(r), t, c) * 1e3 for t in tt], "-", color=col, lw=1)
            ax.axvline(tmax, color="grey", ls=":", lw=1)
            ax.set_yscale("log")
        ax.set_title(f"{which}: context {int(c) if len(pts) else '-'} (dots measured, lines predicted)")
        ax.set_xlabel("query tokens per row")
        ax.set_ylabel("forward ms")
        ax.legend(fontsize=7)
        ax = axes[row, 1]
        meas, pred = holdout_predictions(prof, which)
        if len(meas):
            ax.loglog(meas * 1e3, pred * 1e3, ".", alpha=0.7)
            lo, hi = min(meas.min(), pred.min()) * 1e3, max(meas.max(), pred.max()) * 1e3
            ax.plot([lo, hi], [lo, hi], "k--", lw=1)
            mape = float(np.mean(np.abs(pred - meas) / meas)) * 100
            ax.set_title(f"{which}: held-out points, MAPE {mape:.1f}%")
        ax.set_xlabel("measured ms")
        ax.set_ylabel("predicted ms (point held out)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)
    return path


def _split_axes(P: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Hold out every other interior value of each axis in turn (interpolation test)."""
    splits = []
    for axis in range(3):
        vals = sorted(set(P[:, axis].tolist()))
        held = vals[1:-1:2]
        if not held:
            continue
        test = np.isin(P[:, axis], held)
        splits.append((~test, test))
    return splits


def _split_points(P: np.ndarray, frac: float, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Hold out a random ``frac`` of the points that are not on the grid's boundary."""
    interior = np.ones(len(P), dtype=bool)
    for axis in range(3):
        interior &= (P[:, axis] > P[:, axis].min()) & (P[:, axis] < P[:, axis].max())
    cand = np.flatnonzero(interior)
    if len(cand) == 0:
        return []
    rng = np.random.default_rng(seed)
    pick = rng.choice(cand, size=max(1, int(round(frac * len(cand)))), replace=False)
    test = np.zeros(len(P), dtype=bool)
    test[pick] = True
    return [(~test, test)]


def _split_extrapolate(P: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Hold out the largest rows value, then the largest tokens value (extrapolation test)."""
    splits = []
    for axis in (0, 1):
        if len(set(P[:, axis].tolist())) >= 3:
            test = P[:, axis] == P[:, axis].max()
            splits.append((~test, test))
    return splits


def holdout_predictions(profile: Profile, which: str = "target", mode: str = "axes", *, frac: float = 0.25,
                        seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(measured, predicted) seconds of held-out points, each predicted by a table built without them.

    ``mode``: "axes" (every other interior value of each axis, in turn), "points" (a random ``frac`` of
    interior points) or "extrapolate" (the largest rows, then the largest tokens value).
    """
    P = np.asarray(profile.points(which), dtype=float).reshape(-1, 4)
    if mode == "axes":
        splits = _split_axes(P)
    elif mode == "points":
        splits = _split_points(P, frac, seed)
    elif mode == "extrapolate":
        splits = _split_extrapolate(P)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    meas, pred = [], []
    for train, test in splits:
        if train.sum() == 0 or test.sum() == 0:
            continue
        table = LatencyTable(P[train])
        meas.append(P[test, 3])
        pred.append(np.asarray([table.predict(*p[:3]) for p in P[test]]))
    if not meas:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(meas), np.concatenate(pred)


def holdout_mape(profile: Profile, which: str = "target", mode: str = "axes", **kwargs: Any) -> float:
    """Mean absolute percentage error (a fraction: 0.1 = 10%) on held-out grid points; nan if none."""
    meas, pred = holdout_predictions(profile, which, mode, **kwargs)
    return float(np.mean(np.abs(pred - meas) / meas)) if len(meas) else float("nan")


def holdout_report(profile: Profile) -> dict[str, dict[str, float]]:
    """MAPE of both models for interpolation ("axes", "points") and "extrapolate" splits."""
    return {w: {m: holdout_mape(profile, w, m) for m in ("axes", "points", "extrapolate")}
            for w in ("target", "draft") if profile.points(w)}
