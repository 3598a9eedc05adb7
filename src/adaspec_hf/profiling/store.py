"""Latency profiles on disk: the :class:`Profile` record, the key that says where it is valid, the cache.

Why a key of everything: forward times depend on the model config, dtype, attention kernel, device,
library versions and thread count, and a profile taken under any other setting silently misleads the
planner. So a profile is used only when its key is equal, and a rejected one is logged with the
fields that differ (a user who expects it to load can see what changed).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adaspec_hf._version import __version__

logger = logging.getLogger("adaspec_hf.profiling")

PROFILE_FORMAT = 1
KEY_HASH_CHARS = 16  # hex digits of the sha256 in file names and config hashes: collisions are negligible
SLUG_CHARS = 48      # model-name part of a profile's file name (the tail, where names differ)


@dataclass
class Profile:
    """Measured forward times of a target/draft pair, plus the key that says where they are valid.

    ``target`` and ``draft`` are lists of ``[rows, tokens_per_row, context, seconds]``.
    """

    key: dict[str, Any]
    target: list[list[float]]
    draft: list[list[float]]
    overhead: float
    meta: dict[str, Any] = field(default_factory=dict)

    def points(self, which: str) -> list[list[float]]:
        """The measured points of ``"target"`` or ``"draft"``."""
        if which not in ("target", "draft"):
            raise ValueError(f"which must be 'target' or 'draft', not {which!r}")
        return self.target if which == "target" else self.draft

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Profile":
        data = json.loads(text)
        return cls(
            key=dict(data["key"]),
            target=[list(map(float, p)) for p in data["target"]],
            draft=[list(map(float, p)) for p in data["draft"]],
            overhead=float(data["overhead"]),
            meta=dict(data.get("meta", {})),
        )

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
        tmp.write_text(self.to_json())
        tmp.replace(path)  # atomic: concurrent readers never see half a file
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Profile":
        return cls.from_json(Path(path).read_text())


NO_DRAFT = "no-draft"  # the draft name in the key of a target-only profile (prompt lookup)

def cache_dir() -> Path:
    """``$ADASPEC_HF_CACHE`` or ``~/.cache/adaspec_hf``."""
    env = os.environ.get("ADASPEC_HF_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "adaspec_hf"


def _model_name(model: torch.nn.Module) -> str:
    name = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    return str(name or "")


_VOLATILE_CONFIG_KEYS = {"_name_or_path", "name_or_path", "transformers_version", "_commit_hash", "dtype", "torch_dtype"}


def config_hash(model: torch.nn.Module) -> str:
    """Hash of the model config (minus fields that do not change timings, such as its path)."""
    cfg = model.config.to_dict()
    cfg = {k: v for k, v in cfg.items() if k not in _VOLATILE_CONFIG_KEYS}
    text = json.dumps(cfg, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_HASH_CHARS]


def device_name(device: torch.device) -> str:
    """A human-readable name of the hardware: the GPU's name, or the CPU model."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine() or "cpu"
    return device.type


def _attn_impl(model: torch.nn.Module) -> str:
    return str(getattr(model.config, "_attn_implementation", None) or "")


def profile_key(target: torch.nn.Module, draft: torch.nn.Module | None) -> dict[str, Any]:
    """Everything a latency profile depends on. A profile is used only if its key is equal.
    ``draft=None``: the target alone (drafting by prompt lookup)."""
    import transformers


    tp = next(target.parameters())
    if draft is None:  # prompt lookup alone: the target's profile, no draft forwards to time
        return {
            "format": PROFILE_FORMAT, "target": _model_name(target), "target_config": config_hash(target),
            "target_dtype": str(tp.dtype).replace("torch.", ""), "target_attn": _attn_impl(target),
            "draft": NO_DRAFT, "draft_config": "", "draft_dtype": "", "draft_attn": "",
            "device": str(tp.device.type), "draft_device": "", "device_name": device_name(tp.device),
            "torch": torch.__version__, "transformers": transformers.__version__, "adaspec_hf": __version__,
            "threads": torch.get_num_threads(),
        }
    dp = next(draft.parameters())
    return {
        "format": PROFILE_FORMAT,
        "target": _model_name(target),
        "target_config": config_hash(target),
        "target_dtype": str(tp.dtype).replace("torch.", ""),
        "target_attn": _attn_impl(target),
        "draft": _model_name(draft),
        "draft_config": config_hash(draft),
        "draft_dtype": str(dp.dtype).replace("torch.", ""),
        "draft_attn": _attn_impl(draft),
        "device": str(tp.device.type),
        "draft_device": str(dp.device.type),
        "device_name": device_name(tp.device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "adaspec_hf": __version__,
        "threads": torch.get_num_threads(),
    }


def key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:KEY_HASH_CHARS]


def _slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.")
    return s[-SLUG_CHARS:] if s else "unnamed"


def profile_path(key: dict[str, Any]) -> Path:
    """Where the profile for ``key`` lives: ``<cache>/profiles/<target>--<draft>--<keyhash>.json``."""
    stem = f"{_slug(str(key.get('target', '')))}--{_slug(str(key.get('draft', '')))}"
    return cache_dir() / "profiles" / f"{stem}--{key_hash(key)}.json"


def key_diff(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Human-readable differences between a stored key and the current one."""
    out = []
    for k in sorted(set(stored) | set(wanted)):
        if stored.get(k) != wanted.get(k):
            out.append(f"{k}: {stored.get(k)!r} (profile) != {wanted.get(k)!r} (now)")
    return out


def save_profile(prof: Profile, path: str | os.PathLike | None = None) -> Path:
    """Save under the cache dir (or ``path``); returns the path written."""
    return prof.save(path if path is not None else profile_path(prof.key))


def load_profile(
    target: torch.nn.Module, draft: torch.nn.Module | None, *, path: str | os.PathLike | None = None
) -> Profile | None:
    """The cached profile for exactly this pair and setup, or None.

    A profile whose key differs in anything (config, dtype, device, library versions, threads) is never
    used; we log why it was rejected so that a user who expects one to load can see what changed.
    """
    key = profile_key(target, draft)
    p = Path(path) if path is not None else profile_path(key)
    if p.exists():
        try:
            prof = Profile.load(p)
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("ignoring unreadable latency profile %s: %s", p, e)
            return None
        diff = key_diff(prof.key, key)
        if not diff:
            return prof
        logger.warning("ignoring latency profile %s, made for a different setup: %s", p, "; ".join(diff))
        return None
    # No exact match: explain any profile for the same pair that we are not using.
    stem = p.name.rsplit("--", 1)[0]
    for other in sorted(p.parent.glob(f"{glob_escape(stem)}--*.json")) if p.parent.exists() else []:
        try:
            diff = key_diff(Profile.load(other).key, key)
        except (OSError, ValueError, KeyError, TypeError) as e:
            diff = [f"unreadable ({e})"]
        logger.info("not using latency profile %s, made for a different setup: %s", other, "; ".join(diff))
    return None


def glob_escape(s: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", s)
