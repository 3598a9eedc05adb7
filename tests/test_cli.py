"""`adaspec-hf` argument parsing: every subcommand's flags, defaults and choices, and refusals of bad input."""
from __future__ import annotations

import pytest

from adaspec_hf.cli import bench, demo, export, pair, profile
from adaspec_hf.cli.main import build_parser


@pytest.fixture(scope="module")
def parser():
    return build_parser()


def test_commands_in_help_order(parser):
    help_text = parser.format_help()
    positions = [help_text.index(name) for name in ("demo", "pair", "profile", "bench", "export-generate")]
    assert positions == sorted(positions)


def test_a_command_is_required(parser):
    with pytest.raises(SystemExit) as e:
        parser.parse_args([])
    assert e.value.code == 2


def test_demo_defaults(parser):
    a = parser.parse_args(["demo"])
    assert (a.n_prompts, a.max_new_tokens, a.batch_size, a.policy, a.dtype) == (4, 64, 1, "adaptive", "float32")
    assert a.target is None and a.draft is None and not a.sample and not a.save and not a.allow_weak_pair
    assert a.func is demo.run_demo


def test_pair_build_and_info(parser):
    a = parser.parse_args(["pair", "build"])
    assert (a.out, a.corpus, a.quick, a.seed, a.force, a.precision) == (None, None, False, 0, False, "auto")
    assert a.func is pair._cli_build
    a = parser.parse_args(["pair", "build", "--corpus", "a", "b", "--precision", "bf16", "--seed", "3"])
    assert a.corpus == ["a", "b"] and a.precision == "bf16" and a.seed == 3
    a = parser.parse_args(["pair", "info", "--quick", "--json"])
    assert a.quick and a.json and a.dir is None and a.func is pair._cli_info


def test_bare_pair_prints_help_and_fails(parser, capsys):
    a = parser.parse_args(["pair"])
    assert a.func(a) == 2
    assert "build" in capsys.readouterr().out


def test_profile_defaults(parser):
    a = parser.parse_args(["profile"])
    assert (a.fine, a.plot, a.dtype, a.device, a.repeats, a.time_budget) == (False, None, "float32", None, None, None)
    assert a.func is profile._cli_profile
    assert parser.parse_args(["profile", "--time-budget", "2.5"]).time_budget == 2.5


def test_bench_and_bench_serve(parser):
    a = parser.parse_args(["bench"])
    assert a.methods == "vanilla,hf-assisted,hf-assisted-heuristic,static-4,adaptive"
    assert (a.batch_sizes, a.n_prompts, a.repeats, a.temperature, a.name) == ("1", 8, 3, 0.7, "bench")
    assert a.func is bench._cli and a.bench_command is None
    s = parser.parse_args(["bench", "serve", "--rates", "1,2", "--arrival", "gamma", "--cv", "3"])
    assert s.func is bench.serve_cli and s.bench_command == "serve"
    assert (s.rates, s.arrival, s.cv, s.duration, s.max_rows, s.tight, s.loose) == ("1,2", "gamma", 3.0, 20.0, 8, 1.2, 3.0)
    assert s.systems == "static-0,static-4,smartspec,adaptive,slo"


def test_export_generate(parser, tmp_path):
    a = parser.parse_args(["export-generate", str(tmp_path), "--force"])
    assert a.directory == str(tmp_path) and a.force and a.func is export._cli
    assert a.func(a) == 0 and (tmp_path / "custom_generate" / "generate.py").is_file()


@pytest.mark.parametrize("argv", [
    ["demo", "--dtype", "int8"],
    ["demo", "--n-prompts", "many"],
    ["pair", "build", "--precision", "fp8"],
    ["pair", "nonsense"],
    ["profile", "--device", "tpu"],
    ["profile", "--repeats", "1.5"],
    ["bench", "--max-new-tokens", "x"],
    ["bench", "serve", "--arrival", "uniform"],
    ["export-generate"],
    ["no-such-command"],
])
def test_bad_input_is_an_argparse_error(parser, argv, capsys):
    with pytest.raises(SystemExit) as e:
        parser.parse_args(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("text, want", [("data", "data"), ("16-64", (16, 64)), ("32", 32)])
def test_serve_output_len(text, want):
    assert bench._parse_output_len(text) == want
