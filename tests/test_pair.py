"""The built-in offline pair: a quick build into a tmp dir, caching, loading, tokenizer, helpers."""
from __future__ import annotations

import argparse
import json
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import adaspec_hf.pair as P
from adaspec_hf.cli import pair as pair_cli
from adaspec_hf.pair import threads
from adaspec_hf.compat import cache_kwargs, output_cache
from adaspec_hf.pair.corpus import load_corpus, stdlib_files


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
    for key in ("corpus", "tokenizer", "target", "draft", "quality", "cost", "growth", "timing", "budgets",
                "gates", "training"):
        assert key in rep
    assert 0.0 <= rep["quality"]["heldout_agreement"] <= 1.0
    assert 0.0 <= rep["quality"]["distinct_4grams"] <= 1.0
    assert rep["cost"]["target_ms"] > 0 and rep["cost"]["draft_ms"] > 0
    assert rep["gates_apply"] is False  # quality gates do not apply to quick pairs
    assert set(rep["gates"]) == {"target_heldout_loss", "draft_agreement", "distinct_4grams",
                                 "draft_confidence_auc", "cost_ratio"}
    # a fixed step budget, whatever the machine; precision/threads measured and recorded
    assert rep["target"]["train_steps"] == P.QUICK.target_steps
    assert rep["draft"]["distill_steps"] == P.QUICK.distill_steps
    setup = rep["training"]["setup"]
    assert setup["precision"] in ("fp32", "bf16") and setup["threads"] >= 1 and setup["timings"]
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
    pair_cli.register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["pair", "info", "--dir", str(d)])
    assert args.func(args) == 0
    assert "draft_agreement" in capsys.readouterr().out


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
    pair_cli.register_cli(parser.add_subparsers(dest="command"))
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
    monkeypatch.setattr(threads.time, "perf_counter", lambda: clock[0])
    cost = {full: 1.0, 1: 0.3}  # a busy machine: 1 thread is faster
    tuner = threads.ThreadTuner(period=10, probe=3)
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


# ------------------------------------------------------------------------------------ gates
def test_distinct_ngrams_scores_loops_low():
    from adaspec_hf.pair.gates import distinct_ngrams

    assert distinct_ngrams([list(range(64))]) == 1.0
    loop = [5, 6, 7] * 21
    assert distinct_ngrams([loop]) == pytest.approx(3 / 60)
    assert distinct_ngrams([list(range(64)), loop]) == pytest.approx((1 + 3 / 60) / 2)
    with pytest.raises(ValueError):
        distinct_ngrams([[1, 2]])


def test_roc_auc_matches_pairwise_definition():
    from adaspec_hf.pair.gates import roc_auc

    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (400,), generator=g).float()  # many ties
    labels = torch.rand(400, generator=g) < 0.3
    pos, neg = scores[labels], scores[~labels]
    brute = ((pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()).mean()
    assert roc_auc(scores, labels) == pytest.approx(float(brute))
    assert roc_auc(torch.tensor([0.1, 0.9]), torch.tensor([False, True])) == 1.0
    assert roc_auc(torch.tensor([0.9, 0.1]), torch.tensor([False, True])) == 0.0
    with pytest.raises(ValueError):
        roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([True, True]))


def test_teacher_forced_stats_of_identical_models():
    from adaspec_hf.pair.gates import teacher_forced_stats

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    m = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 97, (3, 16))
    st = teacher_forced_stats(m, m, ids)
    assert st["agreement"] == 1.0 and st["target_loss"] == pytest.approx(st["draft_loss"])
    assert st["draft_conf_auc"] != st["draft_conf_auc"]  # NaN: no disagreement to rank against


def test_gates_evaluate_and_check():
    from adaspec_hf.pair.gates import Gates, WeakPairError, check_gates, evaluate_gates, failed_gates

    stats = {"target_loss": 4.6, "agreement": 0.7, "draft_conf_auc": 0.8}
    gates = evaluate_gates(stats, distinct4=0.5, ratio=9.0, gates=Gates())
    assert not failed_gates(gates)
    weak = evaluate_gates({**stats, "target_loss": 6.2, "draft_conf_auc": 0.3}, 0.03, 9.0, Gates())
    assert failed_gates(weak) == ["target_heldout_loss", "distinct_4grams", "draft_confidence_auc"]
    report = {"recipe": {"name": "full"}, "gates": weak}
    with pytest.raises(WeakPairError, match="target_heldout_loss 6.2.*--allow-weak-pair"):
        check_gates(report, "here")
    check_gates({"recipe": {"name": "quick"}, "gates": weak}, "here")  # quick pairs are exempt
    check_gates({"recipe": {"name": "full"}, "gates": gates}, "here")


def test_weak_full_pair_is_refused_unless_allowed(quick_pair, tmp_path, monkeypatch):
    import shutil

    from adaspec_hf.pair.gates import WeakPairError

    d = tmp_path / "weak"
    shutil.copytree(quick_pair[0], d)
    rep = json.loads((d / "report.json").read_text())
    rep["recipe"]["name"] = "full"
    rep["gates_apply"] = True
    rep["gates"]["distinct_4grams"].update(value=0.03, passed=False)
    rep["gates_passed"] = False
    (d / "report.json").write_text(json.dumps(rep))
    with pytest.raises(WeakPairError, match="distinct_4grams"):
        P.load_pair(d, build=False)
    target, draft, tok = P.load_pair(d, build=False, allow_weak_pair=True)
    assert target.config.vocab_size == draft.config.vocab_size


# ----------------------------------------------------------------------------- setup probe
def test_training_setup_picks_the_fastest_candidate_and_drops_slow_ones():
    from adaspec_hf.pair import setup as S

    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    t, d = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg)
    before = [p.detach().clone() for p in t.parameters()]
    cost = {"fp32": 1.0, "bf16": 30.0}
    clock = [0.0]
    current = []

    def step(tm, dm, ids):
        current.append("bf16" if torch.is_autocast_enabled("cpu") else "fp32")
        clock[0] += cost[current[-1]]
        return tm(input_ids=ids, labels=ids).loss

    opts = [S.Candidate("fp32", 1), S.Candidate("bf16", 1)]
    setup = S.choose_training_setup(step, t, d, torch.randint(0, 97, (4, 8)), options=opts,
                                    timer=lambda: clock[0])
    assert setup.precision == "fp32" and setup.threads == 1
    assert setup.timings["bf16/1thr"] is None          # dropped after its warm-up step
    assert current.count("bf16") == 1 and current.count("fp32") == 1 + S.PROBE_REPEATS
    assert all(torch.equal(a, b) for a, b in zip(before, t.parameters()))  # the real model is untouched
    cost.update(fp32=2.0, bf16=1.0)
    setup = S.choose_training_setup(step, t, d, torch.randint(0, 97, (4, 8)), options=opts,
                                    timer=lambda: clock[0])
    assert setup.precision == "bf16" and setup.bf16 and "fp32/1thr" in setup.reason


@pytest.mark.slow
def test_pair_of_an_older_recipe_is_rebuilt(quick_pair, tmp_path):
    import shutil

    d = tmp_path / "old"
    shutil.copytree(quick_pair[0], d)
    rep = json.loads((d / "report.json").read_text())
    rep["recipe"]["target_steps"] += 1  # as if built by an earlier version of the recipe
    (d / "report.json").write_text(json.dumps(rep))
    assert P.build_pair(d, quick=True, progress=False) == d
    rebuilt = json.loads((d / "report.json").read_text())
    assert rebuilt["recipe"]["target_steps"] == P.QUICK.target_steps


def test_a_pair_that_missed_only_its_cost_gate_is_timed_again(quick_pair, tmp_path, monkeypatch):
    """The cost ratio depends on the machine's state when timed, the other gates on the weights:
    re-timing (not retraining) decides the cost gate again; any other miss is left alone."""
    import dataclasses
    import json
    import shutil

    from adaspec_hf.pair import build as B

    d = tmp_path / "pair"
    shutil.copytree(quick_pair[0], d)
    rep = json.loads((d / "report.json").read_text())
    gate = {"value": 3.0, "threshold": 8.0, "kind": "min", "passed": False}
    rep["gates"] = {"cost_ratio": dict(gate), "draft_agreement": {"value": 0.7, "threshold": 0.6, "kind": "min",
                                                                  "passed": True}}
    rep["gates_passed"] = False
    (d / "report.json").write_text(json.dumps(rep))
    recipe = dataclasses.replace(B.QUICK, gates_apply=True)
    monkeypatch.setattr(B, "measure_cost", lambda t, dr, ctx, repeats: {"target_ms": 20.0, "draft_ms": 1.0, "ratio": 20.0})
    assert B.remeasure_cost(d, recipe, progress=False)
    after = json.loads((d / "report.json").read_text())
    assert after["gates_passed"] and after["gates"]["cost_ratio"]["value"] == 20.0
    assert after["cost_history"][0]["ratio"] == rep["cost"]["ratio"]  # the old measurement is kept
    # a pair that also misses a weight gate is not touched
    rep["gates"]["draft_agreement"]["passed"] = False
    (d / "report.json").write_text(json.dumps(rep))
    assert not B.remeasure_cost(d, recipe, progress=False)
    assert json.loads((d / "report.json").read_text())["gates"]["cost_ratio"]["value"] == 3.0


def test_gate_errors_say_what_to_do():
    from adaspec_hf.pair.gates import WeakPairError, check_gates

    def report(**passed):
        return {"recipe": {"name": "full"}, "gates": {k: {"value": 1.0, "threshold": 2.0, "kind": "min", "passed": v}
                                                      for k, v in passed.items()}}

    with pytest.raises(WeakPairError, match="re-times the pair without retraining"):
        check_gates(report(cost_ratio=False, draft_agreement=True), "x")
    with pytest.raises(WeakPairError, match="--force"):
        check_gates(report(cost_ratio=False, draft_agreement=False), "x")
    check_gates(report(cost_ratio=True), "x")  # all passed: no error
