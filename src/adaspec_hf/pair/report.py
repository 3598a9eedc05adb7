"""A built pair's ``report.json``: where it lives, when it counts as a complete pair, its summary.

``report.json`` is written last by a build, so its presence (with ``complete`` and the current
``recipe_version``) is what marks a pair directory as usable; everything that loads or inspects a
pair goes through :func:`read_report`.
"""
from __future__ import annotations

import json
import logging
import pathlib

from adaspec_hf.pair.recipe import RECIPE_VERSION

logger = logging.getLogger("adaspec_hf.pair")

REPORT = "report.json"
PROMPTS = "prompts.jsonl"


def say(progress: bool, msg: str) -> None:
    """A build's progress line: printed when the user watches (``progress``), else logged."""
    if progress:
        print(msg, flush=True)
    else:
        logger.info(msg)


def read_report(pair_dir: pathlib.Path) -> dict | None:
    """The report of a complete pair of the current recipe version in ``pair_dir``, else None."""
    pair_dir = pathlib.Path(pair_dir)
    try:
        rep = json.loads((pair_dir / REPORT).read_text())
    except (OSError, ValueError):
        return None
    if not rep.get("complete") or rep.get("recipe_version") != RECIPE_VERSION:
        return None
    if not all((pair_dir / m / "config.json").is_file() for m in ("target", "draft")):
        return None
    return rep


def summarize(report: dict) -> str:
    """A few lines describing a pair's report: gates first."""
    t, d, c, g = report["target"], report["draft"], report["cost"], report["growth"]
    applies = report.get("gates_apply", True)
    ok = lambda x: "ok" if x else ("MISSED" if applies else "n/a (quick)")  # noqa: E731
    setup = report["training"]["setup"]
    lines = [
        f"pair ({report['recipe']['name']}, seed {report['settings']['seed']}, corpus "
        f"{report['corpus']['source']}: {report['corpus']['files_train']} train / "
        f"{report['corpus']['files_heldout']} held-out files)",
        f"  built in {report['budgets']['build_s']:.0f} s with {setup['precision']} on {setup['threads']} "
        f"thread(s) (chosen by timing: {setup['timings']}); machine load {report['environment']['loadavg_1m_start']}",
    ]
    for name, gate in report["gates"].items():
        sign = "<=" if gate["kind"] == "max" else ">="
        lines.append(f"  {name:<22}{gate['value']:>9.3f}  (gate {sign} {gate['threshold']})  {ok(gate['passed'])}")
    lines += [
        f"  cost                  target {c['target_ms']:.2f} ms / draft {c['draft_ms']:.2f} ms, 1 token @ "
        f"{c['context']} ctx, median of {c['repeats']}; p10 ratio {c.get('ratio_p10', float('nan')):.1f}x",
        f"  target                {t['params'] / 1e6:.2f}M params, {t['layers']} layers ({t['trained_layers']} "
        f"trained), {t['train_steps']} steps ({t['train_tokens']:,} tokens)",
        f"  draft                 {d['params'] / 1e6:.2f}M params, held-out loss {d['heldout_loss']:.3f}, "
        f"{d['joint_steps']} joint + {d['distill_steps']} distill steps",
    ]
    if g["grown"]:
        lines.append(f"  growth                {g['trained_layers']} -> {g['total_layers']} layers with zero "
                     f"o_proj/down_proj (identity blocks); ratio before {g['ratio_before_growth']:.1f}x; "
                     f"logits bit-identical: {g['logits_bit_identical']} (max diff {g['logits_max_abs_diff']:.1e})")
    sample = report["quality"].get("sample")
    if sample:
        lines.append(f"  sample                {sample['prompt'][-60:]!r} -> {sample['continuation'][:80]!r}")
    return "\n".join(lines)
