"""The built-in offline pair: a quick build into a tmp dir, caching, loading, tokenizer, helpers."""
from __future__ import annotations

import argparse
import json
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from adaspec_hf import pair as P
from adaspec_hf.hf_compat import cache_kwargs, output_cache
from adaspec_hf.corpus import load_corpus, stdlib_files


@pytest.fixture(scope="module")
def quick_pair(tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs") / "quick"
    t0 = time.perf_counter()
    d = P.build_pair(out, quick=True, progress=False)
    return d, time.perf_counter() - t0


# ------------------------------------------------------------------------------ the quick build
@pytest.mark.slow
def test_quick_build_layout_and_report(quick_pair):
    d, secs = quick_pair
    assert d.is_dir() and (d / "target" / "config.json").is_file() and (d / "draft" / "config.json").is_file()
    rep = json.loads((d / "report.json").read_text())
    assert rep["complete"] and rep["settings"] == {"quick": True, "seed": 0, "corpus": None}
    for key in ("corpus", "tokenizer", "target", "draft", "quality", "cost", "growth", "timing", "budgets"):
        assert key in rep
    assert 0.0 <= rep["quality"]["heldout_agreement"] <= 1.0
    assert rep["cost"]["target_ms"] > 0 and rep["cost"]["draft_ms"] > 0
    assert rep["budgets"]["applies"] is False  # quality targets do not apply to quick pairs
    # by-file split: no held-out file is a training file
    assert rep["corpus"]["files_heldout"] >= 1 and rep["corpus"]["files_train"] >= 1
    if rep["growth"]["grown"]:
        assert rep["growth"]["logits_max_abs_diff"] <= 1e-5
    assert secs < 120


@pytest.mark.slow
def test_second_call_is_cached(quick_pair):
    d, _ = quick_pair
    before = (d / "report.json").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert P.build_pair(d, quick=True, progress=False) == d
    assert time.perf_counter() - t0 < 2.0
    assert (d / "report.json").stat().st_mtime_ns == before
    with pytest.raises(FileExistsError):  # same dir, other settings: refuses without force
        P.build_pair(d, quick=True, seed=1, progress=False)


@pytest.mark.slow
def test_saved_models_load_with_auto_classes(quick_pair):
    d, _ = quick_pair
    tok = AutoTokenizer.from_pretrained(d / "target")
    for name in ("target", "draft"):
        m = AutoModelForCausalLM.from_pretrained(d / name)
        assert m.config.model_type == "llama"
        assert m.generation_config.eos_token_id == tok.eos_token_id
        assert m.generation_config.pad_token_id == tok.pad_token_id
        ids = tok("def main():\n", return_tensors="pt")
        out = m.generate(**ids, max_new_tokens=5, do_sample=False)
        assert out.shape[1] == ids["input_ids"].shape[1] + 5 or tok.eos_token_id in out[0].tolist()
    assert AutoTokenizer.from_pretrained(d / "draft").get_vocab() == tok.get_vocab()


@pytest.mark.slow
def test_tokenizer_round_trip(quick_pair):
    d, _ = quick_pair
    tok = AutoTokenizer.from_pretrained(d / "target")
    assert len(tok) == 4096
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.pad_token_id != tok.eos_token_id
    for text in ["def f(x):\n\treturn x  # ok\n", "naïve café — 日本語 ✓\r\n", "   leading spaces", "", "\x00\x7f"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    assert tok("x = 1")["input_ids"][0] != tok.bos_token_id  # nothing added implicitly


@pytest.mark.slow
def test_load_pair_prompts_and_grown_target(quick_pair):
    d, _ = quick_pair
    target, draft, tok = P.load_pair(d, build=False)
    assert not target.training and not draft.training
    assert target.dtype == torch.float32
    ds = P.load_prompts(d, n=4)
    assert len(ds) == 4 and {"prompt", "reference"} <= set(ds.column_names)
    assert all(isinstance(p, str) and p for p in ds["prompt"])
    rep = json.loads((d / "report.json").read_text())
    grown = getattr(target.config, "adaspec_identity_layers", None)
    assert bool(grown) == rep["growth"]["grown"]
    t2, d2, _ = P.load_models(d / "target", d / "draft", dtype=torch.bfloat16)
    assert t2.dtype == torch.bfloat16 and d2.dtype == torch.bfloat16


@pytest.mark.slow
def test_cli_info(quick_pair, capsys):
    d, _ = quick_pair
    parser = argparse.ArgumentParser()
    P.register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["pair", "info", "--dir", str(d)])
    assert args.func(args) == 0
    assert "greedy agreement" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ fast tests
def test_load_models_needs_both_or_neither():
    with pytest.raises(ValueError):
        P.load_models("some/target", None)
    with pytest.raises(ValueError):
        P.load_models(None, "some/draft")


def test_load_pair_without_build_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        P.load_pair(tmp_path / "nothing", build=False)


def test_build_refuses_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        P.build_pair(tmp_path, quick=True, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_default_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ADASPEC_HF_CACHE", str(tmp_path))
    assert P.default_cache_dir() == tmp_path
    assert P.default_pair_dir(quick=True).parent == tmp_path
    monkeypatch.delenv("ADASPEC_HF_CACHE")
    assert P.default_cache_dir().name == "adaspec_hf"


def test_cli_parses_build_options():
    parser = argparse.ArgumentParser()
    P.register_cli(parser.add_subparsers(dest="command"))
    a = parser.parse_args(["pair", "build", "--out", "x", "--corpus", "a", "b", "--quick", "--seed", "3",
                           "--force"])
    assert (a.out, a.corpus, a.quick, a.seed, a.force) == ("x", ["a", "b"], True, 3, True)
    assert callable(a.func)


def test_grow_identity_layers_preserves_logits():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=128)
    m = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 97, (2, 20))
    g = P.grow_identity_layers(m, 3)
    assert g.config.num_hidden_layers == 5 and g.config.adaspec_identity_layers == [2, 3, 4]
    assert torch.any(g.model.layers[3].self_attn.q_proj.weight != 0)  # real compute
    with torch.no_grad():
        assert torch.equal(m(ids).logits, g(ids).logits)
        # also with a KV cache, token by token
        out = g(ids[:, :10], use_cache=True)
        step = g(ids[:, 10:11], **cache_kwargs(g, output_cache(out)))
        assert torch.allclose(step.logits[:, -1], m(ids[:, :11]).logits[:, -1], atol=1e-5)
    g2 = P.grow_identity_layers(g, 1)
    assert g2.config.adaspec_identity_layers == [2, 3, 4, 5]


def test_stdlib_corpus_excludes_tests_and_splits_by_file(tmp_path):
    files = stdlib_files()
    assert files and not any({"test", "tests", "idle_test", "site-packages"} & set(f.parts) for f in files)
    for i in range(6):
        (tmp_path / f"f{i}.txt").write_text(f"text number {i}\n" * 5)
    a = load_corpus(tmp_path, seed=0, progress=False)
    b = load_corpus(tmp_path, seed=0, progress=False)
    assert a.heldout_names == b.heldout_names and a.train_names == b.train_names
    assert not set(a.heldout_names) & set(a.train_names)
    assert len(a.heldout_names) + len(a.train_names) == 6


def test_thread_tuner_follows_the_faster_setting(monkeypatch):
    full = torch.get_num_threads()
    if full < 2:
        pytest.skip("needs >= 2 intra-op threads")
    clock = [0.0]
    monkeypatch.setattr(P.time, "perf_counter", lambda: clock[0])
    cost = {full: 1.0, 1: 0.3}  # a busy machine: 1 thread is faster
    tuner = P._ThreadTuner(period=10, probe=3)
    try:
        used = []
        for step in range(60):
            tuner.begin(step)
            used.append(torch.get_num_threads())
            clock[0] += cost[used[-1]]
            tuner.end()
        assert used[-1] == 1 and tuner.switches == 1
        cost = {full: 0.5, 1: 2.0}  # the machine got quiet
        for step in range(60, 200):
            tuner.begin(step)
            used.append(torch.get_num_threads())
            clock[0] += cost[used[-1]]
            tuner.end()
        assert used[-1] == full and tuner.switches == 2
        assert used[120:].count(1) <= 8 and used[20:60].count(full) <= 8  # losing probes are rare
    finally:
        tuner.restore()
    assert torch.get_num_threads() == full
