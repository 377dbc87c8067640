import importlib
import importlib.util
import json
import sys

import pytest

from layerwise import machine, readiness
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


def test_check_out_judges_where_runs_would_be_written(tmp_path, monkeypatch, capsys):
    """--out is where extract would write runs: a file there, or under a file, is a FAIL (it passed,
    the disk measured at the file); a directory not made yet is measured where it would be made."""
    monkeypatch.setattr(readiness.machine, "gpus", lambda: [])
    (tmp_path / "f").write_text("x")
    for out, status, detail in [
        (tmp_path / "f", "FAIL", f"--out {tmp_path / 'f'} is a file, not a directory: runs are directories"),
        (tmp_path / "f" / "run", "FAIL", f"--out {tmp_path / 'f' / 'run'} cannot be made: {tmp_path / 'f'} is a file"),
        (tmp_path / "new" / "run", "PASS", f"free at {tmp_path / 'new' / 'run'} (not there yet: measured at "
                                           f"{tmp_path}, where it would be made)"),
        (tmp_path, "PASS", f"free at {tmp_path}"),
        ("/proc/lw-run", "FAIL", "--out /proc/lw-run: /proc takes no new directories: give a directory on a disk"),
    ]:
        disk = by_name(readiness.check_machine(CheckOptions(cpu=True, out_dir=str(out))))["disk"]
        assert disk.status == status and detail in disk.detail, disk
    code, out, _ = run_cli(capsys, "check", "--cpu", "--out", tmp_path / "f")
    assert code == 1 and "NOT READY" in out
    assert [p.name for p in tmp_path.iterdir()] == ["f"]  # the probe left nothing


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


def test_pyc_valid_follows_pythons_own_rules(tmp_path):
    """A timestamp .pyc is valid for its source's mtime and size; an unchecked hash-based one
    always; a checked one for its source's bytes; a wrong magic number never."""
    import os
    import py_compile

    from layerwise.machine import pyc_valid

    source = tmp_path / "mod.py"
    source.write_text("x = 1\n")
    stamp, checked, unchecked = (str(tmp_path / f"{n}.pyc") for n in ("stamp", "checked", "unchecked"))
    py_compile.compile(str(source), stamp, invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
    py_compile.compile(str(source), checked, invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
    py_compile.compile(str(source), unchecked, invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    assert all(pyc_valid(str(source), p) for p in (stamp, checked, unchecked))
    assert not pyc_valid(str(source), str(tmp_path / "absent.pyc"))
    source.write_text("x = 22\n")  # another size and content
    os.utime(source, (1, 1))
    assert not pyc_valid(str(source), stamp) and not pyc_valid(str(source), checked)
    assert pyc_valid(str(source), unchecked)
    broken = tmp_path / "broken.pyc"
    broken.write_bytes(b"\0\0\0\0" + open(unchecked, "rb").read()[4:])
    assert not pyc_valid(str(source), str(broken))


def test_bytecode_counts_the_modules_compiled_at_every_start(tmp_path, monkeypatch):
    """Modules imported where Python may not write bytecode (and finds none) count as compiled;
    modules whose bytecode Python wrote as it imported them do not."""
    import importlib
    import sys

    from layerwise import machine

    for name in ("lw_probe_a", "lw_probe_b", "lw_probe_c"):
        (tmp_path / f"{name}.py").write_text(f"NAME = {name!r}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "pycache_prefix", str(tmp_path / "pycache"))
    before = machine.bytecode()
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    importlib.import_module("lw_probe_a")
    importlib.import_module("lw_probe_b")
    found = machine.bytecode()
    assert (found.modules - before.modules, found.compiled - before.compiled) == (2, 2)
    assert found.compiled_bytes - before.compiled_bytes == 2 * len("NAME = 'lw_probe_a'\n")
    assert not found.writes and found.prefix == str(tmp_path / "pycache")
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    importlib.import_module("lw_probe_c")  # Python writes its bytecode under the prefix
    after = machine.bytecode()
    assert (after.modules - found.modules, after.compiled - found.compiled) == (1, 0)
    for name in ("lw_probe_a", "lw_probe_b", "lw_probe_c"):
        monkeypatch.delitem(sys.modules, name)

    class Lazy:  # a lazy loader's entry: looking at it imports, and that fails
        @property
        def __spec__(self):
            raise ImportError("no module named 'absent'")

    monkeypatch.setitem(sys.modules, "lw_probe_lazy", Lazy())
    assert machine.bytecode().modules == after.modules - 3
    gone = tmp_path / "gone"  # a module imported from a file deleted since: no process compiles it again
    gone.mkdir()
    (gone / "lw_probe_gone.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(gone))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    base = machine.bytecode().compiled
    importlib.import_module("lw_probe_gone")
    assert machine.bytecode().compiled == base + 1
    (gone / "lw_probe_gone.py").unlink()
    assert machine.bytecode().compiled == base
    monkeypatch.delitem(sys.modules, "lw_probe_gone")


@pytest.mark.parametrize("writes, prefix, cause", [
    (False, None, "PYTHONDONTWRITEBYTECODE is set, so Python does not cache them"),
    (True, "/ro/pycache", "Python cannot write them to PYTHONPYCACHEPREFIX /ro/pycache"),
    (True, None, "Python cannot write them to their __pycache__ directories"),
])
def test_check_warns_when_every_process_compiles_its_modules(monkeypatch, capsys, writes, prefix, cause):
    from layerwise.machine import Bytecode

    monkeypatch.setattr(readiness.machine, "gpus", lambda: [])
    monkeypatch.setattr(readiness.machine, "bytecode", lambda: Bytecode(2400, 2356, 40_000_000, writes, prefix))
    code, out, _ = run_cli(capsys, "check", "--cpu", "--json")
    line = {c["name"]: c for c in json.loads(out)["checks"]}["bytecode"]
    assert code == 0 and line["status"] == "WARN"  # slow to start, not unable to run
    assert line["detail"].startswith("2356 of 2400 imported modules (40.0 MB of source) have no usable cached bytecode")
    assert cause in line["detail"] and "export PYTHONPYCACHEPREFIX=$HOME/.cache/pycache" in line["detail"]
    monkeypatch.setattr(readiness.machine, "bytecode", lambda: Bytecode(2400, 62, 600_000, writes, prefix))
    assert readiness.check_bytecode().detail == ("2338 of 2400 imported modules load from cached bytecode; "
                                                 "62 are compiled from source at every start")


def _boot_env(monkeypatch, tmp_path, argv=("python3", "-m", "layerwise", "check"), sentinel_pyc=False):
    """A process as a command sees it where Python keeps no bytecode: a sentinel package (tmp_path)
    with or without bytecode beside its source."""
    from layerwise import _boot

    package = tmp_path / "src" / "lw_sentinel"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("X = 1\n")
    if sentinel_pyc:
        import py_compile
        py_compile.compile(str(package / "__init__.py"), cfile=importlib.util.cache_from_source(
            str(package / "__init__.py")), doraise=True)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    monkeypatch.setattr(_boot, "SENTINELS", ("lw_sentinel", "lw_not_installed"))
    monkeypatch.setattr(sys, "orig_argv", list(argv))
    monkeypatch.setattr(sys, "argv", list(argv[2:] if "-m" in argv else argv[1:]))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.setattr(sys, "pycache_prefix", None)
    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LAYERWISE_BYTECODE_CACHE", raising=False)
    return _boot


def test_a_command_keeps_its_bytecode_in_layerwises_cache_where_python_keeps_none(tmp_path, monkeypatch):
    """PYTHONDONTWRITEBYTECODE set, no bytecode beside the sentinels' sources (an image installed
    without compiling): a command's imports are cached under $LAYERWISE_CACHE/pycache, and a module
    imported then loads from there the next time (machine.bytecode counts it as cached)."""
    boot = _boot_env(monkeypatch, tmp_path)
    assert boot.cache_bytecode() == str(tmp_path / "cache" / "pycache")
    assert sys.pycache_prefix == str(tmp_path / "cache" / "pycache") and sys.dont_write_bytecode is False
    (tmp_path / "src" / "lw_boot_probe.py").write_text("Y = 2\n")
    importlib.import_module("lw_boot_probe")
    try:
        written = list((tmp_path / "cache" / "pycache").rglob("lw_boot_probe*.pyc"))
        assert len(written) == 1 and machine.pyc_valid(str(tmp_path / "src" / "lw_boot_probe.py"), str(written[0]))
        line = readiness.check_bytecode()
        assert line.status == readiness.PASS and f"(kept by layerwise in {tmp_path / 'cache' / 'pycache'}" in line.detail
    finally:
        sys.modules.pop("lw_boot_probe", None)


@pytest.mark.parametrize("case", ["library", "console script", "torchrun rank", "off", "prefix given", "python writes",
                                  "compiled at install"])
def test_the_bytecode_cache_is_left_alone_unless_a_command_would_compile_everything(tmp_path, monkeypatch, case):
    argv = {"library": ("python3", "-c", "import layerwise"), "console script": ("python3", "/venv/bin/layerwise", "plan"),
            "torchrun rank": ("/usr/bin/python3", "-u", "-m", "layerwise", "test")}.get(case, ("python3", "-m", "layerwise"))
    boot = _boot_env(monkeypatch, tmp_path, argv, sentinel_pyc=case == "compiled at install")
    if case == "off":
        monkeypatch.setenv("LAYERWISE_BYTECODE_CACHE", "0")
    elif case == "prefix given":
        monkeypatch.setattr(sys, "pycache_prefix", str(tmp_path / "theirs"))
    elif case == "python writes":
        monkeypatch.setattr(sys, "dont_write_bytecode", False)
    expected = str(tmp_path / "cache" / "pycache") if case in ("console script", "torchrun rank") else None
    assert boot.cache_bytecode() == expected
    assert (sys.pycache_prefix == expected) if expected else sys.pycache_prefix in (None, str(tmp_path / "theirs"))
    if case == "off":  # check says how to have it back
        from layerwise.machine import Bytecode

        monkeypatch.setattr(readiness.machine, "bytecode", lambda: Bytecode(2400, 2356, 40_000_000, False, None))
        assert "unset LAYERWISE_BYTECODE_CACHE=0" in readiness.check_bytecode().detail
