"""Profile reports: held-out accuracy of the latency model on a profile's own points."""
from __future__ import annotations

import numpy as np

from adaspec_hf.profiling import holdout_mape, holdout_predictions, holdout_report

from conftest import synthetic_profile as synthetic


def test_holdout_mape_small_on_smooth_costs():
    prof = synthetic(kink=False)
    assert holdout_mape(prof, "target", "axes") < 1e-6  # roofline interpolates exactly
    rep = holdout_report(prof)
    assert set(rep) == {"target", "draft"}
    assert all(v < 0.1 for v in rep["target"].values())


def test_noisy_costs_report_finite_mape():
    rng = np.random.default_rng(0)
    prof = synthetic(kink=True)
    prof.target = [[r, t, c, s * rng.uniform(0.95, 1.05)] for r, t, c, s in prof.target]
    err = holdout_mape(prof, "target", "points")
    assert 0 <= err < 1


def test_kinked_costs_are_missed_between_points():
    # a 2-token kink is invisible when the 2-token column is held out: the check must show the error
    meas, pred = holdout_predictions(synthetic(kink=True), "target", "axes")
    assert len(meas) and np.max(np.abs(pred - meas) / meas) > 0.2


def test_unknown_mode_is_refused():
    import pytest

    with pytest.raises(ValueError, match="unknown mode"):
        holdout_predictions(synthetic(), "target", "sideways")
