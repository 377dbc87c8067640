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


@pytest.mark.slow
@pytest.mark.parametrize("part", ["layer", "full-depth", "stream"])
def test_fp8_dry_run(tmp_path, monkeypatch, capsys, part):
    monkeypatch.syspath_prepend(str(BENCH))
    import fp8_minimax as bench

    code = bench.main([part, "--tiny", "--layers", "3", "--tokens", "24", "--work", str(tmp_path / "work"),
                       "--out", str(tmp_path / "out"), "--disk-probe-gib", "0.06"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert (tmp_path / "out" / f"fp8_{part}.json").is_file()
    data = __import__("json").loads((tmp_path / "out" / f"fp8_{part}.json").read_text())
    if part == "full-depth":
        assert [r["layer"] for r in data["rows"]] == [0, 1, 2]
        assert all(r["isolated"] and r["isolated"] > 1e-3 for r in data["rows"]), data["rows"]  # FP8 error, not 0
    if part == "layer":
        assert data["rows"][0]["output"] > 1e-3 and data["rows"][0]["deterministic"] is True
    sys.modules.pop("fp8_minimax", None)
