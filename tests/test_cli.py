import json

import pytest

from layerwise.cli import main

from helpers import assert_one_line_error, copy_checkpoint, run_cli


def test_plan_minimax_8x80gb(capsys):
    code, out, _ = run_cli(capsys, "plan", "builtin:minimax-m2", "--gpus", "8x80GB")
    assert code == 0, out
    assert "cuda:7" in out and "verdict: fits: all 62 layers" in out


def test_plan_minimax_4x80gb_json(capsys):
    code, out, _ = run_cli(capsys, "plan", "builtin:minimax-m2", "--gpus", "4x80GB", "--json")
    data = json.loads(out)
    assert code == 1 and data["fits"] is False and data["shortfall_bytes"] > 137e9
    assert {d["device"] for d in data["devices"]} >= {"cuda:0", "cuda:3", "disk"}


def test_load_prints_placement(capsys):
    code, out, _ = run_cli(capsys, "load", "builtin:minimax-m2-tiny", "--device-map", "cpu", "--dtype", "fp32")
    assert code == 0
    assert "cpu (host RAM)" in out and "whole model" in out and "inputs go to cpu" in out


@pytest.mark.parametrize("argv, fragment", [
    (["plan", "builtin:nope"], "unknown built-in model"),
    (["plan", "/no/such/dir"], "does not exist"),
    (["plan", ""], "no model given"),
    (["plan", "builtin:minimax-m2", "--device-map", "fastest"], "unknown --device-map 'fastest'"),
    (["plan", "builtin:minimax-m2", "--gpus", "2x80GB", "--max-memory", "0:80XB"], "unknown unit"),
    (["plan", "builtin:minimax-m2", "--gpus", "2x80GB", "--max-memory", "5:80GB"], "names GPU 5 but only 2"),
    (["plan", "builtin:minimax-m2", "--gpus", "2x80GB", "--max-memory", "0:0GB"], "larger than zero"),
    (["plan", "builtin:minimax-m2", "--gpus", "8xlots"], "not a size"),
    (["plan", "builtin:minimax-m2", "--gpus", "100000x80GB"], "give 1 to 1024"),  # hung in the placement
    (["plan", "builtin:minimax-m2", "--dtype", "fp4"], "unknown dtype"),
    (["plan"], "the following arguments are required"),
    (["frobnicate"], "invalid choice"),
    (["load", "builtin:minimax-m2"], "configuration without weights"),
])
def test_usage_errors_are_one_line(capsys, argv, fragment):
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, fragment)


def test_model_dir_errors(capsys, tmp_path, tiny_minimax):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, "plan", empty)
    assert_one_line_error(code, err, "is empty")
    notype = tmp_path / "notype"
    notype.mkdir()
    (notype / "config.json").write_text(json.dumps({"hidden_size": 4}))
    code, _, err = run_cli(capsys, "plan", notype)
    assert_one_line_error(code, err, "has no model_type")
    ckpt = copy_checkpoint(tiny_minimax.path, tmp_path / "m")
    shard = sorted(ckpt.glob("model-*.safetensors"))[1]
    shard.unlink()
    code, _, err = run_cli(capsys, "load", ckpt, "--device-map", "cpu")
    assert_one_line_error(code, err, f"shard {shard.name} is listed in the index but missing")
    shard0 = sorted(ckpt.glob("model-*.safetensors"))[0]
    shard0.write_bytes(shard0.read_bytes()[:-1])
    code, _, err = run_cli(capsys, "load", ckpt, "--device-map", "cpu")
    assert_one_line_error(code, err, "truncated")


def test_python_m_entry_point():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "layerwise", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("layerwise ")


def test_flags_not_given_take_the_dataclass_defaults():
    """argparse defaults are None: every option object built from bare arguments is the default one."""
    from layerwise import arguments
    from layerwise.compare import CompareOptions
    from layerwise.extract import ExtractOptions
    from layerwise.layer_test import TestOptions
    from layerwise.loading import LoadOptions
    from layerwise.readiness import CheckOptions
    from layerwise.streaming import StreamOptions

    parse = arguments.build_parser().parse_args
    assert arguments.load_options(parse(["load", "m"])) == LoadOptions()
    assert arguments.load_options(parse(["plan", "m"])) == LoadOptions()
    assert arguments.check_options(parse(["check"])) == CheckOptions()
    extract = parse(["extract", "m", "--out", "x"])
    assert arguments.extract_options(extract) == ExtractOptions()
    assert arguments.stream_options(extract) == StreamOptions()
    assert arguments.test_options(parse(["test", "m"])) == TestOptions()
    assert arguments.compare_options(parse(["compare", "a", "b"])) == CompareOptions()
    assert arguments.import_options(parse(["import", "src", "--out", "x"])) == {"overwrite": False}  # import_run's own
    given = arguments.test_options(parse(["test", "m", "--dtype", "fp32", "--batch-size", "2", "--device-map", "cpu"]))
    assert (given.candidate.dtype, given.load.dtype, given.extract.batch_size) == ("fp32", "fp32", 2)
    assert (given.candidate.device, given.load.device_map) == ("cpu", "cpu")


@pytest.mark.parametrize("command, shown", [
    ("extract", ["(default: 8)", "(default: residual,router,logits)", "(default: 4.0)", "(default: auto)",
                 "(default: transformers)"]),
    ("plan", ["(default: bf16)", "(default: 4096)"]),
    ("import", ["(default: skip)", "(default: detected when unmistakable)"]),
    ("compare", ["docs/COMPARE.md", "(default: 2)", "(default: 5)"]),
    ("test", ["(default: single)", "(default: all)", "(default: runs/test)", "(default: the reference's)"]),
])
def test_help_shows_the_dataclass_defaults(capsys, command, shown):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    missing = [s for s in shown if s not in out]
    assert not missing, missing
