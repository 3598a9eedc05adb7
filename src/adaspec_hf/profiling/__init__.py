"""Latency profiling of a target/draft pair on the device and dtype they actually run on.

:mod:`~adaspec_hf.profiling.timers` times one forward the way a speculative step runs it,
:mod:`~adaspec_hf.profiling.sweep` measures a rows x tokens x context grid of them,
:mod:`~adaspec_hf.profiling.store` keys and caches the result (:class:`Profile`) and
:mod:`~adaspec_hf.profiling.report` prints, plots and cross-validates it.
"""
from adaspec_hf.profiling.report import format_table, holdout_mape, holdout_predictions, holdout_report, plot_profile
from adaspec_hf.profiling.store import Profile, load_profile, profile_key, save_profile
from adaspec_hf.profiling.sweep import load_or_profile, profile

__all__ = ["Profile", "format_table", "holdout_mape", "holdout_predictions", "holdout_report", "load_or_profile",
           "load_profile", "plot_profile", "profile", "profile_key", "save_profile"]
