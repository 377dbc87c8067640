import json

import pytest

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
