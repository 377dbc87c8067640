"""The GPU benchmark scripts run end to end on the CPU (--tiny), so a GPU session is not spent on a crash."""

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
def test_single_layer_gpu_dry_run(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    import single_layer_gpu

    code = single_layer_gpu.main(["--tiny", "--tokens", "24", "--candidates", "same,eager,bf16-router,scratch",
                                  "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "    24 same" in out and "exact" in out
    assert (tmp_path / "out" / "single_layer_gpu.json").is_file()
    sys.modules.pop("single_layer_gpu", None)
