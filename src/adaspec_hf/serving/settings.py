"""The engine's settings: an :class:`~adaspec_hf.config.EngineConfig`, with ``Engine``'s keyword
shorthands folded in (one setting given both ways with two values is an error, not a silent pick)."""
from __future__ import annotations

import dataclasses
from typing import Any

from adaspec_hf.config import DEFAULT_ENGINE_POLICY, EngineConfig
from adaspec_hf.policies import DraftPolicy

# Engine keyword -> where it lives in the config ("adaptive." = the AdaptiveConfig inside)
SHORTHANDS = {"max_rows": "max_rows", "max_cached_tokens": "max_cached_tokens", "seed": "seed",
              "best_effort_wait_s": "best_effort_wait_s", "compaction_threshold": "adaptive.compaction_threshold",
              "prompt_lookup": "adaptive.prompt_lookup"}


def _get(cfg: EngineConfig, path: str) -> Any:
    value: Any = cfg.to_dict()
    for part in path.split("."):
        value = value[part]
    return value


def engine_config(config: EngineConfig | None, policy: "str | DraftPolicy | None", **given: Any) -> EngineConfig:
    """``config`` (default: ``EngineConfig()``) with the shorthands that were given (not None).
    With an explicit ``config``, a shorthand must agree with it. ``policy`` as a name is the
    config's ``adaptive.policy``; a ready policy object is used as is (see :func:`recorded`)."""
    if config is not None and not isinstance(config, EngineConfig):
        raise TypeError(f"config must be an EngineConfig, got {type(config).__name__}")
    if policy is not None and not isinstance(policy, (str, DraftPolicy)):
        raise TypeError(f"policy must be a policy name or a DraftPolicy, got {type(policy).__name__}")
    base = config if config is not None else EngineConfig()
    if isinstance(policy, DraftPolicy) and config is not None and config.policy not in (DEFAULT_ENGINE_POLICY,
                                                                                        policy.name):
        raise ValueError(f"policy={type(policy).__name__} object ({policy.name!r}) conflicts with "
                         f"config.adaptive.policy={config.policy!r}; give it one way")
    top: dict[str, Any] = {}
    adaptive: dict[str, Any] = {}
    if isinstance(policy, str):
        given = {**given, "policy": policy}
    for name, value in given.items():
        if value is None:
            continue
        path = "adaptive.policy" if name == "policy" else SHORTHANDS[name]
        if config is not None:
            have = _get(config, path)
            same = have == (value.strip().lower() if name == "policy" else value)
            if not same:
                raise ValueError(f"{name}={value!r} conflicts with config.{path}={have!r}; give it one way")
            continue
        if path.startswith("adaptive."):
            adaptive[path.split(".", 1)[1]] = value
        else:
            top[name] = value
    if adaptive:
        top["adaptive"] = dataclasses.replace(base.adaptive, **adaptive)
    return dataclasses.replace(base, **top) if top else base


def recorded(cfg: EngineConfig, policy: DraftPolicy) -> EngineConfig:
    """What ran, for statistics: ``cfg`` with ``adaptive.policy`` naming the policy actually used
    (a ready policy object given to the engine wins over the config's policy name)."""
    if cfg.adaptive.policy == policy.name:
        return cfg
    return dataclasses.replace(cfg, adaptive=dataclasses.replace(cfg.adaptive, policy=policy.name))
