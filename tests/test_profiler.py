"""Profiler: measuring on tiny random models, JSON round trip, keying and rejection of foreign profiles."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from adaspec_hf.cli import profile as profile_cli
from adaspec_hf.profiling import report, store, sweep
from adaspec_hf.profiling import Profile, load_or_profile, load_profile, profile, profile_key, save_profile

TINY_GRID = dict(rows=(1, 2), tokens=(1, 3), contexts=(8, 16), repeats=1, progress=False)


def tiny_llama(hidden: int = 32, layers: int = 1, vocab: int = 97, max_pos: int = 256) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture()
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ADASPEC_HF_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def pair():
    return tiny_llama(32, 2), tiny_llama(16, 1)


@pytest.fixture(scope="module")
def prof(pair):
    return profile(*pair, **TINY_GRID)


def test_profile_measures_every_grid_point(prof):
    for pts in (prof.target, prof.draft):
        assert sorted((int(r), int(t), int(c)) for r, t, c, _ in pts) == sorted(
            (r, t, c) for r in (1, 2) for t in (1, 3) for c in (8, 16))
        assert all(s > 0 for *_, s in pts)
    assert prof.overhead > 0
    assert prof.meta["skipped"] == []


def test_profile_leaves_no_trace_on_model(pair):
    # the timed forwards must not change the models (eval mode, no grads kept)
    target, _ = pair
    assert not target.training
    assert all(p.grad is None for p in target.parameters())


def test_json_round_trip(prof, tmp_path):
    again = Profile.from_json(prof.to_json())
    assert again == prof
    path = prof.save(tmp_path / "p.json")
    assert Profile.load(path) == prof
    json.loads(path.read_text())  # plain JSON


def test_key_names_what_timings_depend_on(pair):
    key = profile_key(*pair)
    for field in ("target_config", "draft_config", "target_dtype", "draft_dtype", "device_name", "torch",
                  "transformers", "adaspec_hf", "threads"):
        assert field in key
    other = profile_key(tiny_llama(32, 3), pair[1])
    assert other["target_config"] != key["target_config"]


def test_save_then_load(pair, prof, cache_env):
    path = save_profile(prof)
    assert path.parent == cache_env / "profiles"
    loaded = load_profile(*pair)
    assert loaded == prof


def test_profile_with_changed_key_field_is_rejected(pair, prof, cache_env, caplog):
    # same file name, but a different torch version inside: must not be used, and must say why
    stale = Profile.from_json(prof.to_json())
    stale.key["torch"] = "0.0.1"
    save_profile(stale, store.profile_path(profile_key(*pair)))
    with caplog.at_level(logging.INFO, logger="adaspec_hf.profiling"):
        assert load_profile(*pair) is None
    assert "torch" in caplog.text and "0.0.1" in caplog.text


def test_profile_for_other_setup_is_not_used(pair, prof, cache_env, caplog, monkeypatch):
    save_profile(prof)
    monkeypatch.setattr(torch, "__version__", "9.9.9")  # the environment changed since profiling
    with caplog.at_level(logging.INFO, logger="adaspec_hf.profiling"):
        assert load_profile(*pair) is None
    assert "9.9.9" in caplog.text
    # a changed config is a different key too
    assert load_profile(tiny_llama(32, 3), pair[1]) is None


def test_load_or_profile_takes_and_saves_a_quick_profile(pair, cache_env, monkeypatch, caplog):
    monkeypatch.setattr(sweep, "QUICK_ROWS", (1, 2))
    monkeypatch.setattr(sweep, "QUICK_TOKENS", (1, 2))
    monkeypatch.setattr(sweep, "QUICK_CONTEXTS", (8, 16))
    monkeypatch.setattr(sweep, "QUICK_REPEATS", 1)
    with caplog.at_level(logging.INFO, logger="adaspec_hf.profiling"):
        first = load_or_profile(*pair)
    assert first.meta["quick"]
    assert "taking a quick one" in caplog.text
    assert load_or_profile(*pair) == first  # now cached


def test_time_budget_skips_largest_points(pair):
    p = profile(*pair, rows=(1, 2, 4), tokens=(1, 2), contexts=(8, 16), repeats=1, progress=False, time_budget_s=0.0)
    # the first (cheapest) group is always measured, the rest is left to extrapolation
    assert len(p.target) >= 1 and p.meta["skipped"]
    measured = {(int(r), int(c)) for r, _, c, _ in p.target}
    assert (1, 8) in measured


def test_contexts_clamped_to_position_table():
    t, d = tiny_llama(32, 1, max_pos=40), tiny_llama(16, 1, max_pos=40)
    p = profile(t, d, rows=(1,), tokens=(1, 4), contexts=(8, 64), repeats=1, progress=False)
    assert max(c for _, _, c, _ in p.target) + 4 <= 40


def test_cli_registers_profile_command():
    import argparse

    parser = argparse.ArgumentParser()
    profile_cli.register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["profile", "--fine", "--plot", "x.png", "--dtype", "bfloat16", "--device", "cpu"])
    assert args.func is profile_cli._cli_profile and args.fine and args.plot == "x.png"
    assert args.target is None and args.draft is None


def test_table_and_plot(prof, tmp_path):
    text = report.format_table(prof)
    assert "target forward ms" in text and "draft forward ms" in text
    png = report.plot_profile(prof, tmp_path / "lat.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_repair_remeasures_disturbed_points():
    class FakeTimer:
        calls: list = []

        def drop_cache(self):
            pass

        def time(self, r, t, c):
            self.calls.append((r, t, c))
            return 1e-3 * (1 + r * t)

    pts = [[r, t, 64, 1e-3 * (1 + r * t)] for r in (1, 2, 4) for t in (1, 2, 4)]
    pts[4][3] *= 30  # another process got in the way of this one
    fake = FakeTimer()
    n = sweep._repair_outliers({"target": pts}, {"target": fake}, None)
    assert n == 1 and fake.calls == [(2, 2, 64)]
    assert pts[4][3] == pytest.approx(5e-3)


def test_token_counts_of_one_cache_take_turns(pair):
    """The points of one (rows, context) are timed in rounds, each round every token count once (in
    alternating order), so that drift moves the whole curve rather than one point of it."""
    from adaspec_hf.profiling.timers import ModelTimer

    model = pair[1]
    seen: list[int] = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        timer = ModelTimer(model, repeats=2, min_time_s=0.0)
        out = timer.time_many(1, [1, 2, 4], 8)
    finally:
        hook.remove()
    assert seen == [8, 4, 2, 1, 1, 2, 4, 4, 2, 1]  # prefill, warm-up round, then two timed rounds
    assert len(out) == 3 and all(t > 0 for t in out)
    assert timer.time(1, 2, 8) > 0  # a single point is a group of one
