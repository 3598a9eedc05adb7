"""LatencyModel: exact on the grid, piecewise-linear between, roofline beyond, online correction."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from adaspec_hf.efficiency.latency import LatencyModel, LatencyTable, RooflineFit

from conftest import PROFILE_CTXS as CTXS, PROFILE_ROWS as ROWS, PROFILE_TOKENS as TOKENS, roofline
from conftest import synthetic_profile as synthetic


def test_exact_on_grid_points():
    prof = synthetic()
    m = LatencyModel(prof)
    for r, t, c, s in prof.target:
        assert m.target_time(r, t, c) == pytest.approx(s, rel=1e-12)
    for r, t, c, s in prof.draft:
        assert m.draft_time(r, t, c) == pytest.approx(s, rel=1e-12)


def test_kinks_are_kept_not_smoothed():
    m = LatencyModel(synthetic(kink=True))
    assert m.target_time(1, 2, 64) > m.target_time(1, 4, 64)  # measured non-monotonicity survives


def test_piecewise_linear_between_points():
    m = LatencyModel(synthetic(kink=True))
    a, b = m.target_time(2, 4, 64), m.target_time(2, 8, 64)
    assert m.target_time(2, 6, 64) == pytest.approx((a + b) / 2, rel=1e-12)
    # a roofline cost is reproduced exactly between grid points (multilinear in linear coordinates)
    m2 = LatencyModel(synthetic(kink=False))
    assert m2.target_time(3, 5, 100) == pytest.approx(roofline(3, 5, 100), rel=1e-9)


def test_extrapolation_positive_and_growing():
    m = LatencyModel(synthetic(kink=True))
    edge = m.target_time(8, 8, 256)
    prev = edge
    for r, t in [(8, 12), (16, 8), (16, 16), (32, 16), (64, 32)]:
        v = m.target_time(r, t, 256)
        assert v > 0 and v > prev * 0.999
        prev = v
    assert m.target_time(16, 8, 256) > edge and m.target_time(8, 16, 256) > edge
    assert m.target_time(8, 8, 1024) > edge  # longer context costs more
    assert 0 < m.target_time(1, 1, 4) <= m.target_time(1, 1, 16) * 1.0001
    # extrapolation follows the roofline: doubling rows*tokens far out roughly doubles the cost
    assert 1.5 < m.target_time(64, 16, 256) / m.target_time(32, 16, 256) < 2.5


def test_zero_work_costs_nothing():
    m = LatencyModel(synthetic())
    assert m.target_time(0, 4, 64) == 0.0 and m.target_time(4, 0, 64) == 0.0


def test_unmeasured_cells_are_filled():
    prof = synthetic(kink=False)
    prof.target = [p for p in prof.target if p[0] * p[1] <= 8]  # a capped grid, as in the default sweep
    m = LatencyModel(prof)
    v = m.target_time(8, 8, 64)
    assert v > m.target_time(8, 1, 64) and math.isfinite(v)
    assert v == pytest.approx(roofline(8, 8, 64), rel=0.5)


def test_fit_recovers_roofline():
    pts = np.array([[r, t, c, roofline(r, t, c)] for r, t, c in itertools.product(ROWS, TOKENS, CTXS)])
    fit = RooflineFit.fit(pts)
    assert all(x >= 0 for x in fit.coef)
    for r, t, c, s in pts:
        assert fit(r, t, c) == pytest.approx(s, rel=1e-6)


def test_step_time_adds_up():
    m = LatencyModel(synthetic())
    st = m.step_time(4, [(4, 1), (4, 2)], 3, 64)
    assert st == pytest.approx(m.overhead + m.draft_time(4, 1, 64) + m.draft_time(4, 2, 64) + m.target_time(4, 3, 64))
    assert m.target_curve(4, 64, 3) == pytest.approx([0.0] + [m.target_time(4, k, 64) for k in (1, 2, 3)], rel=1e-12)


@pytest.mark.parametrize("rows,context", [(1, 16), (3, 100), (4, 64), (0.5, 5), (64, 4096), (2, 1e5)])
def test_curve_is_the_scalar_prediction(rows, context):
    """The planner's vectorised curve equals the scalar interpolation, inside the grid and beyond
    it on every axis (rows, tokens and context extrapolated by the roofline fit)."""
    m = LatencyModel(synthetic())
    m.observe("target", 4, 2, 64, 0.05)  # an online correction applies to both alike
    max_t = 3 * int(max(m.tables["target"].axes[1]))
    curve = m.target_curve(rows, context, max_t)
    assert curve[0] == 0.0
    assert curve[1:] == pytest.approx([m.target_time(rows, k, context) for k in range(1, max_t + 1)], rel=1e-12)


def test_observe_moves_prediction_toward_observed():
    m = LatencyModel(synthetic())
    base = m.target_time(4, 4, 64)
    m.observe("target", 4, 4, 64, base * 2)
    assert m.target_time(4, 4, 64) == pytest.approx(2 * base)  # the first measurement sets the speed at once
    for _ in range(30):
        m.observe("target", 4, 4, 64, base)
    for _ in range(2):  # later ones move it by an EMA: one noisy step cannot
        m.observe("target", 4, 4, 64, base * 2)
    up = m.target_time(4, 4, 64)
    assert base < up < 1.5 * base
    for _ in range(200):
        m.observe("target", 4, 4, 64, base * 2)
    assert m.target_time(4, 4, 64) == pytest.approx(2 * base, rel=1e-3)
    assert m.draft_time(4, 4, 64) == pytest.approx(synthetic().draft[0][3] * 0 + m.base_time("draft", 4, 4, 64))
    # bounded: an absurd observation cannot blow the model up
    for _ in range(200):
        m.observe("draft", 4, 4, 64, 1e6)
    assert m.correction("draft") <= m.bounds[1] + 1e-9
    m.observe("overhead", 0, 0, 0, 1.0)
    assert m.overhead > 2e-4
    m.reset_corrections()
    assert m.target_time(4, 4, 64) == pytest.approx(base) and m.overhead == pytest.approx(2e-4)


def test_single_context_axis():
    pts = [[r, t, 64, roofline(r, t, 64)] for r, t in itertools.product(ROWS, TOKENS)]
    table = LatencyTable(pts)
    assert table.predict(2, 3, 64) == pytest.approx(roofline(2, 3, 64))
    assert table.predict(2, 3, 512) > 0
