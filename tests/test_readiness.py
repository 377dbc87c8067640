import json

import pytest

from layerwise import readiness
from layerwise.readiness import CheckOptions

from helpers import copy_checkpoint, run_cli


def by_name(result):
    return {c.name: c for c in result.checks}


def test_cpu_only_machine_is_not_ready_without_cpu_flag(monkeypatch):
    monkeypatch.setattr(readiness.machine, "gpus", lambda: [])
    result = readiness.check_machine(CheckOptions())
    assert not result.ready and by_name(result)["gpus"].status == "FAIL"
    result = readiness.check_machine(CheckOptions(cpu=True))
    assert result.ready, [c for c in result.checks if c.status == "FAIL"]


def test_model_checks(tiny_minimax, monkeypatch):
    from layerwise import models

    monkeypatch.setattr(readiness.machine, "gpus", lambda: [])
    checks = by_name(readiness.check_machine(CheckOptions(model="builtin:minimax-m2-tiny", cpu=True)))
    assert checks["config"].status == "PASS" and "minimax_m2" in checks["config"].detail
    assert checks["checkpoint"].status == "PASS"
    assert checks["router-precision"].status == "PASS"
    fixed = models.transformers_version() >= readiness.ROPE_BUG_FIXED_IN
    assert checks["rope-bug"].status == ("PASS" if fixed else "WARN")
    assert checks["fit"].status == "PASS"


def test_router_precision_reads_the_built_dtypes(monkeypatch):
    """The check builds the model as loading does: if the router were built in bf16 it FAILs."""
    from layerwise import models

    config = models.load_config(models.resolve_model("builtin:minimax-m2-tiny")).config
    assert [c.status for c in readiness.check_router_precision(config, "bf16")] == ["PASS"]
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    monkeypatch.setattr(models, "model_class", lambda c: MODEL_FOR_CAUSAL_LM_MAPPING[type(c)])  # transformers alone
    broken = readiness.check_router_precision(config, "bf16")
    assert [c.status for c in broken] == ["FAIL"] and "mlp.gate.weight would be bfloat16" in broken[0].detail
    llama = models.load_config(models.resolve_model("builtin:llama-tiny")).config
    assert readiness.check_router_precision(llama, "bf16") == []


def test_rope_bug_reported_for_old_transformers(monkeypatch):
    from layerwise import models

    config = models.load_config(models.resolve_model("builtin:minimax-m2")).config
    monkeypatch.setattr(readiness.models, "transformers_version", lambda: (5, 17))
    assert by_name_list(readiness.check_known_bugs(config))["rope-bug"].status == "WARN"
    monkeypatch.setattr(readiness.models, "transformers_version", lambda: (5, 18))
    assert by_name_list(readiness.check_known_bugs(config))["rope-bug"].status == "PASS"


def by_name_list(checks):
    return {c.name: c for c in checks}


def test_broken_checkpoint_fails(tiny_minimax, tmp_path, monkeypatch):
    monkeypatch.setattr(readiness.machine, "gpus", lambda: [])
    ckpt = copy_checkpoint(tiny_minimax.path, tmp_path / "m")
    shard = sorted(ckpt.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    result = readiness.check_machine(CheckOptions(model=str(ckpt), cpu=True))
    assert not result.ready
    assert any(c.name == "checkpoint" and c.status == "FAIL" and "truncated" in c.detail for c in result.checks)


def test_simulated_gpus_fit_verdict(monkeypatch):
    gpus = [readiness.machine.Gpu(i, "H100", 80 * 10**9, 80 * 10**9, "9.0") for i in range(4)]
    monkeypatch.setattr(readiness.machine, "gpus", lambda: gpus)
    monkeypatch.setattr("layerwise.loading.gpu_capacities", lambda: [g.free_bytes for g in gpus])
    monkeypatch.setattr(readiness.machine, "peer_access", lambda: {(a, b): True for a in range(4) for b in range(4) if a != b})
    checks = by_name(readiness.check_machine(CheckOptions(model="builtin:minimax-m2")))
    assert checks["fit"].status == "FAIL" and "does NOT fit" in checks["fit"].detail
    assert checks["peer-links"].status == "PASS"


def test_check_cli_json(capsys, monkeypatch):
    monkeypatch.setattr(readiness.machine, "gpus", lambda: [])
    code, out, _ = run_cli(capsys, "check", "--cpu", "--json")
    data = json.loads(out)
    assert code == 0 and data["ready"] is True
    assert {c["name"] for c in data["checks"]} >= {"gpus", "torch", "transformers", "accelerate", "safetensors"}
    code, out, _ = run_cli(capsys, "check")
    assert code == 1 and "NOT READY" in out


def test_root_wrapper_script(monkeypatch, capsys):
    import runpy
    import sys
    from pathlib import Path

    monkeypatch.setattr(readiness.machine, "gpus", lambda: [])
    monkeypatch.setattr(sys, "argv", ["check_gpu_readiness.py", "--cpu"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(Path(__file__).parents[1] / "check_gpu_readiness.py"), run_name="__main__")
    assert exit_info.value.code == 0
    assert "READY" in capsys.readouterr().out
