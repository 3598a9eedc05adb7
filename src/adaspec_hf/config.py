"""The two configuration objects: :class:`AdaptiveConfig` (how the adaptive decoder plans) and
:class:`EngineConfig` (how the serving engine batches). Both are frozen, validated on construction,
and round-trip through plain dicts (``to_dict`` / ``from_dict``), so they can be saved in a
``GenerationConfig``, recorded in statistics and written into benchmark JSON.

Why one object instead of keyword arguments: the same settings reach the planner from four places
(``generate(adaptive=True)``, the serving engine, benchmarks, a saved GenerationConfig); one
validated value means one meaning, one error message and one record of what ran.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

DEFAULT_POLICY = "adaptive"
DEFAULT_ENGINE_POLICY = "slo"


def _check_int(name: str, value: Any, lo: int, hi: int | None = None, none_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be an integer {rng}{' or None' if none_ok else ''}, got {value!r}")


def _check_float(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        raise ValueError(f"{name} must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {value!r}")


def _from_dict(cls, data: Mapping[str, Any]):
    if not isinstance(data, Mapping):
        raise TypeError(f"{cls.__name__}.from_dict needs a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return cls(**dict(data))


@dataclass(frozen=True)
class AdaptiveConfig:
    """How the adaptive decoder speculates. ``policy`` is a registry name (``"adaptive"``: trees
    when sampling, chains when greedy; ``"adaptive-chain"``, ``"adaptive-tree"``, ``"static-4"``,
    ``"tree-4x2"``, ``"heuristic"``, ``"confidence-0.4"``, ``"smartspec"``, ``"slo"``,
    ``"slo-tree"``); the other fields tune the planners (fixed-shape
    policies ignore them).

    The defaults are the values the benchmarks measured; each names a trade-off:

    * ``max_depth`` / ``max_children``: the largest draft (levels; children per node for trees).
    * ``probe_every``: after this many steps without drafting, a short chain is drafted to re-measure
      acceptance and cost, so one bad estimate cannot switch speculation off for good.
    * ``row_prior``: acceptance rate assumed for a new row of a pair never seen before.
    * ``calibration_warmup``: verified nodes after which the fitted acceptance calibration outweighs
      the running rate (weight ``n / (n + warmup)``).
    * ``row_ema``: weight of one step in a row's running acceptance rate (higher: adapts faster,
      noisier). ``pair_rate_ema``: the same for the pair's rate that seeds new rows.
    * ``cost_ema`` / ``cost_confirm``: weight of one measured verify time in the observed cost
      table, and how many measurements above the profile are needed before they are believed.
    * ``compaction_threshold``: fraction of cache slots that may be holes before compaction.
    * ``token_budget`` / ``min_node_value``: SLO planners only (phase-1 nodes per step; nodes worth
      less than this many expected tokens are never forced).
    * ``prompt_lookup``: also draft by prompt lookup (n-gram matches in each row's own text, no
      forward); alone when there is no draft model, else merged with the draft's tree, the policy
      verifying what pays. ``lookup_max_ngram`` / ``lookup_min_ngram``: the n-gram sizes tried,
      longest first (HF's ``max_matching_ngram_size`` sets the first).
    """

    policy: str = DEFAULT_POLICY
    max_depth: int = 12
    max_children: int = 4
    probe_every: int = 8
    row_prior: float = 0.6
    calibration_warmup: float = 200.0
    row_ema: float = 0.3
    pair_rate_ema: float = 0.1
    cost_ema: float = 0.3
    cost_confirm: int = 3
    compaction_threshold: float = 0.5
    token_budget: int | None = None
    min_node_value: float = 0.02
    prompt_lookup: bool = False
    lookup_max_ngram: int = 3
    lookup_min_ngram: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.policy, str) or not self.policy.strip():
            raise ValueError(f"policy must be a non-empty policy name, got {self.policy!r}")
        object.__setattr__(self, "policy", self.policy.strip().lower())
        _check_int("max_depth", self.max_depth, 1, 64)
        _check_int("max_children", self.max_children, 1, 16)
        _check_int("probe_every", self.probe_every, 0)
        _check_float("row_prior", self.row_prior, 0.0, 1.0)
        _check_float("calibration_warmup", self.calibration_warmup, 0.0, 1e9)
        _check_float("row_ema", self.row_ema, 0.0, 1.0, lo_open=True)
        _check_float("pair_rate_ema", self.pair_rate_ema, 0.0, 1.0, lo_open=True)
        _check_float("cost_ema", self.cost_ema, 0.0, 1.0, lo_open=True)
        _check_int("cost_confirm", self.cost_confirm, 1)
        _check_float("compaction_threshold", self.compaction_threshold, 0.0, 1.0)
        _check_int("token_budget", self.token_budget, 0, none_ok=True)
        _check_float("min_node_value", self.min_node_value, 0.0, 1.0)
        if not isinstance(self.prompt_lookup, bool):
            raise ValueError(f"prompt_lookup must be True or False, got {self.prompt_lookup!r}")
        _check_int("lookup_max_ngram", self.lookup_max_ngram, 1, 64)
        _check_int("lookup_min_ngram", self.lookup_min_ngram, 1, self.lookup_max_ngram)

    @classmethod
    def coerce(cls, value: "AdaptiveConfig | str | Mapping[str, Any] | None", **overrides: Any) -> "AdaptiveConfig":
        """A config from the shorthands users pass: a policy name (``"static-4"``), a dict, a config
        or None (defaults); ``overrides`` replace fields (e.g. ``policy=`` from ``draft_policy=``)."""
        if value is None:
            cfg = cls()
        elif isinstance(value, cls):
            cfg = value
        elif isinstance(value, str):
            cfg = cls(policy=value)
        elif isinstance(value, Mapping):
            cfg = cls.from_dict(value)
        else:
            raise TypeError(f"adaptive_config must be an AdaptiveConfig, a policy name or a dict, got {type(value).__name__}")
        overrides = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(cfg, **overrides) if overrides else cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AdaptiveConfig":
        return _from_dict(cls, data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass(frozen=True)
class EngineConfig:
    """How the serving engine batches requests (see :class:`~adaspec_hf.serving.Engine`).

    ``adaptive``: the decoder's :class:`AdaptiveConfig` (its ``policy`` defaults to ``"slo"``).
    ``max_rows``: requests in the running batch at once. ``max_cached_tokens``: bound on each
    model's KV cache slots (rows x cache length, padding and holes included). ``seed``: per-request
    sampling keys, drawn in submission order. ``best_effort_wait_s``: longest a request without a
    TTFT objective waits for admission while SLO requests are protected.
    """

    adaptive: AdaptiveConfig = field(default_factory=lambda: AdaptiveConfig(policy=DEFAULT_ENGINE_POLICY))
    max_rows: int = 8
    max_cached_tokens: int | None = None
    seed: int | None = None
    best_effort_wait_s: float = 2.0

    def __post_init__(self) -> None:
        if not isinstance(self.adaptive, AdaptiveConfig):
            object.__setattr__(self, "adaptive", AdaptiveConfig.coerce(self.adaptive))
        _check_int("max_rows", self.max_rows, 1)
        _check_int("max_cached_tokens", self.max_cached_tokens, 2, none_ok=True)
        _check_int("seed", self.seed, 0, none_ok=True)
        _check_float("best_effort_wait_s", self.best_effort_wait_s, 0.0, 1e9)

    @property
    def policy(self) -> str:
        return self.adaptive.policy

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EngineConfig":
        data = dict(data)
        if isinstance(data.get("adaptive"), Mapping):
            data["adaptive"] = AdaptiveConfig.from_dict(data["adaptive"])
        return _from_dict(cls, data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)
