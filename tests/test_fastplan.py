"""`layerwise plan` answered from what an earlier plan kept (_fastplan.py): the very text, JSON and
exit code the command gives, without torch; and nothing answered where the model, the flags, the
source or the kept file changed, or the tree would place the model otherwise than transformers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from layerwise import _fastplan, loading, placetree

from helpers import run_cli

GB = 10**9
CASES = [
    ["plan", "builtin:minimax-m2", "--gpus", "8x141GB"],
    ["plan", "builtin:minimax-m2", "--gpus", "4x80GB", "--json"],  # spills to cpu and disk: exit 1
    ["plan", " builtin:minimax-m2", "--gpus", "8x80GB", "--device-map", "balanced_low_0", "--tokens", "16384"],
    ["plan", "builtin:minimax-m2", "--gpus", "8x80GB", "--device-map", "sequential", "--max-memory",
     "0:60GB,1:60GB,2:60GB,3:60GB,4:60GB,5:60GB,6:60GB,7:60GB,cpu:50GB"],
    ["plan", "builtin:minimax-m2", "--gpus", "2x80GB", "--device-map", "cuda:1", "--dtype", "fp16"],
    ["plan", "builtin:minimax-m2-fp8", "--gpus", "4x80GB", "--quant", "fp8"],
    ["plan", "builtin:minimax-m2-tiny", "--gpus", "2x2GB", "--device-map", "balanced"],
]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache of its own, and host memory fixed (a plan shows it: both answers must see one value)."""
    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading.machine, "host_memory_available", lambda: 64 * GB)
    monkeypatch.setattr(_fastplan, "host_memory_available", lambda: 64 * GB)
    return tmp_path / "cache" / "plans"


def _fast(argv):
    """What `answer` would print and exit with; None where it lets the command run."""
    try:
        return _fastplan._plan_text(argv)
    except Exception:  # noqa: BLE001 - as `answer` itself
        return None


@pytest.mark.parametrize("argv", CASES, ids=lambda a: " ".join(a[1:]).strip())
def test_the_answer_is_what_the_command_prints(cache, capsys, argv):
    assert _fast(argv) is None, "nothing kept yet"
    code, out, _ = run_cli(capsys, *argv)
    assert len(list(cache.glob("*.json"))) == 1, "the command kept its inputs"
    assert _fast(argv) == (out.rstrip("\n"), code)


def test_a_device_map_file_is_answered_too(cache, capsys, tmp_path):
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"model.embed_tokens": 0, "model.layers": 1, "model.norm": 1, "lm_head": 0,
                                   "model.rotary_emb": 1}))
    argv = ["plan", "builtin:minimax-m2-tiny", "--gpus", "2x1GB", "--device-map", str(mapping)]
    code, out, _ = run_cli(capsys, *argv)
    assert _fast(argv) == (out.rstrip("\n"), code)
    mapping.write_text(json.dumps({"model.embed_tokens": 0}))  # leaves parameters unplaced: the command says so
    assert _fast(argv) is None
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "unplaced" in err


def test_a_changed_config_source_or_kept_file_is_not_answered(cache, capsys, tmp_path, tiny_minimax, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    config = json.loads((tiny_minimax.path / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config))
    argv = ["plan", str(model), "--gpus", "2x2GB"]
    run_cli(capsys, *argv)
    assert _fast(argv) is not None
    config["num_hidden_layers"] = 3
    (model / "config.json").write_text(json.dumps(config))
    assert _fast(argv) is None, "another config is another key"
    code, out, _ = run_cli(capsys, *argv)
    assert "all 3 layers" in out and _fast(argv) == (out.rstrip("\n"), code)
    assert _fast(argv[:-2] + ["--gpus", "2x2GB", "--dtype", "fp32"]) is None, "another dtype, another key"
    monkeypatch.setattr(_fastplan, "_source", lambda: "edited")
    assert _fast(argv) is None, "an edit of layerwise's source is another key"
    monkeypatch.undo()
    monkeypatch.setenv("LAYERWISE_CACHE", str(cache.parent))
    for kept in cache.glob("*.json"):
        kept.write_text(kept.read_text()[:100])  # cut short
    assert _fast(argv) is None


def test_nothing_is_kept_where_the_tree_places_otherwise(cache, capsys, monkeypatch):
    monkeypatch.setattr(placetree, "device_map", lambda tree, strategy, budgets: {"": "cpu"})
    code, out, _ = run_cli(capsys, "plan", "builtin:minimax-m2", "--gpus", "8x80GB")
    assert code == 0 and "fits" in out
    assert not cache.exists() or not list(cache.glob("*.json"))


@pytest.mark.parametrize("argv, env", [
    (["plan", "builtin:minimax-m2", "--gpus", "8x80GB", "--help"], {}),
    (["plan", "builtin:minimax-m2", "--gpus", "8x80GB", "--he"], {}),  # argparse's abbreviation of --help
    (["plan", "builtin:minimax-m2"], {}),  # the GPUs present: torch asks them
    (["plan", "builtin:minimax-m2", "--gpus", "8x80GB", "--color"], {}),
    (["plan", "builtin:minimax-m2", "--gpus", "8x80GB"], {"LAYERWISE_PLAN_CACHE": "0"}),
    (["plan", "builtin:minimax-m2", "--gpus", "8x80GB"], {"WORLD_SIZE": "2"}),
    (["plan", "builtin:minimax-m2", "--gpus", "8x80GB"], {"LAYERWISE_READ_THREADS": "many"}),
    (["plan", "builtin:minimax-m2", "--gpus", "8x80GB"], {"LAYERWISE_WRITER": "bogus"}),
    (["-v", "plan", "builtin:minimax-m2", "--gpus", "8x80GB"], {}),
    (["plan", "builtin:minimax-m2", "--gpus", "8x80GB", "--device-map", ""], {}),  # the command refuses it
    (["load", "builtin:minimax-m2", "--gpus", "8x80GB"], {}),
])
def test_the_command_runs_as_before(cache, capsys, monkeypatch, argv, env):
    run_cli(capsys, "plan", "builtin:minimax-m2", "--gpus", "8x80GB")  # kept
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert _fastplan.answer(argv) is None  # returned: no answer, the process goes on
    assert capsys.readouterr() == ("", "")


def test_a_second_plan_imports_no_torch(tmp_path):
    env = {**os.environ, "LAYERWISE_CACHE": str(tmp_path)}
    argv = [sys.executable, "-X", "importtime", "-m", "layerwise", "plan", "builtin:minimax-m2", "--gpus", "8x141GB"]
    first = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == second.returncode == 0, first.stderr[-2000:]
    assert first.stdout == second.stdout and "verdict: fits" in second.stdout
    imported = {line.rpartition("|")[2].strip() for line in second.stderr.splitlines() if "import time:" in line}
    assert "layerwise._fastplan" in imported and "torch" not in imported and "transformers" not in imported
    assert "torch" in {line.rpartition("|")[2].strip() for line in first.stderr.splitlines()}
    assert len(list(Path(tmp_path, "plans").glob("*.json"))) == 1
