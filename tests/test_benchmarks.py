"""Every script in benchmarks/ runs end to end on the CPU (--tiny or small sizes), so a refactor
that breaks a benchmark fails here, not in a GPU session."""

import json
import os
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def bench(monkeypatch, name):
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop(name, None)
    return __import__(name)


def test_every_script_has_a_dry_run_here():
    scripts = {p.stem for p in BENCH.glob("*.py")} - {"synthetic"}
    covered = {"single_layer_gpu", "fp8_minimax", "extract_overhead", "streaming", "compare_throughput", "full_depth",
               "distributed", "isolated_profile", "manifest_cost", "first_forward", "digest_speed",
               "read_paths", "tensor_reads", "compare_profile", "compare_knobs", "capture_ab", "writer_processes",
               "capture_variants", "command_exit", "plan_time", "compare_trace", "wake_latency", "cold_reads", "metrics_batch",
               "gc_counts", "exit_teardown"}
    assert scripts == covered, f"benchmarks without a dry run in this file: {sorted(scripts - covered)}"


@pytest.mark.slow
def test_single_layer_gpu_dry_run(tmp_path, monkeypatch, capsys):
    code = bench(monkeypatch, "single_layer_gpu").main(
        ["--tiny", "--tokens", "24", "--candidates", "same,eager,bf16-router,scratch",
         "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "    24 same" in out and "exact" in out
    assert (tmp_path / "out" / "single_layer_gpu.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("part", ["layer", "full-depth", "stream"])
def test_fp8_dry_run(tmp_path, monkeypatch, capsys, part):
    code = bench(monkeypatch, "fp8_minimax").main(
        [part, "--tiny", "--layers", "3", "--tokens", "24", "--work", str(tmp_path / "work"),
         "--out", str(tmp_path / "out"), "--disk-probe-gib", "0.06"])
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads((tmp_path / "out" / f"fp8_{part}.json").read_text())
    if part == "full-depth":
        assert [r["layer"] for r in data["rows"]] == [0, 1, 2]
        assert all(r["isolated"] and r["isolated"] > 1e-3 for r in data["rows"]), data["rows"]  # FP8 error, not 0
    if part == "layer":
        assert data["rows"][0]["output"] > 1e-3 and data["rows"][0]["deterministic"] is True


@pytest.mark.slow
def test_extract_overhead_dry_run(tmp_path, monkeypatch, capsys):
    code = bench(monkeypatch, "extract_overhead").main(
        ["--tiny", "--layers", "2", "--tokens", "16,32", "--batches", "1,2", "--reps", "1", "--passes", "1,3",
         "--profile", "1x16",
         "--e2e", "2x32", "--e2e-repeat", "2", "--writer-threads", "2,3", "--switch-interval", "5,1",
         "--writer", "process,threads", "--process-threads", "1", "--out", str(tmp_path / "out"),
         "--work", str(tmp_path / "work")])
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads((tmp_path / "out" / "extract_overhead_1gpu.json").read_text())
    assert [(r["batch"], r["tokens"], r["passes"]) for r in data["rows"]] == [
        (b, t, n) for b in (1, 2) for t in (16, 32) for n in (1, 3)]
    assert data["rows"][0]["lw_bytes"] > 0
    # three passes a round capture what one does, each pass: the bytes are counted per pass
    assert [r["lw_bytes"] for r in data["rows"][::2]] == [r["lw_bytes"] for r in data["rows"][1::2]]
    ends = data["end_to_end"]
    settings = [(w, n, i) for w in ("process", "threads") for n in (2, 3) for i in (5, 1)]
    assert [(e["writer"], e["writer_threads"], e["switch_interval_ms"]) for e in ends] == settings
    assert {e["process_threads"] for e in ends} == {1}  # 2 or 3 writer processes of one thread each
    for e in ends:
        assert e["bytes"] > 0 and len(e["rounds"]) == 2 and e["files"] == 2 * 2  # 2 prompts x 2 layers
        trace = e["median_round"]["trace"]
        assert 0 < trace["first_file_start_s"] <= trace["last_file_end_s"] <= trace["wall_s"], trace
        assert 1 <= trace["writer_threads"] <= e["writer_threads"] and trace["digest_s"] > 0
        ends_s = trace["ends_s"]  # the manifest drafted, completed, encoded and written, in that order
        assert ends_s["manifest_draft"] <= ends_s["manifest_build"] <= ends_s["manifest_write"], ends_s
        assert trace["manifest_draft_s"] > 0 and trace["manifest_text_s"] > 0, trace
        # the tiny model's CPU tensors are small: the writer's process writes every file, or none
        assert trace["files_in_writer_process"] == (e["files"] if e["writer"] == "process" else 0), trace
    assert data["profile"]["layerwise_functions"], "the profile found no layerwise function"


def test_extract_overhead_puts_settings_back_when_an_extract_fails(tmp_path, monkeypatch, capsys):
    module = bench(monkeypatch, "extract_overhead")
    monkeypatch.delenv("LAYERWISE_WRITER", raising=False)
    interval = sys.getswitchinterval()

    def fail(self, *args, **kwargs):
        raise RuntimeError("the extract failed")

    monkeypatch.setattr(module.Bench, "end_to_end", fail)
    with pytest.raises(RuntimeError, match="the extract failed"):
        module.main(["--tiny", "--layers", "1", "--tokens", "8", "--batches", "1", "--reps", "1", "--profile", "",
                     "--e2e", "1x8", "--writer", "threads", "--switch-interval", "1", "--out", str(tmp_path / "out"),
                     "--work", str(tmp_path / "work")])
    assert "LAYERWISE_WRITER" not in os.environ, "a failed extract leaves the writer setting it ran with"
    assert sys.getswitchinterval() == interval


@pytest.mark.slow
def test_streaming_dry_run(tmp_path, monkeypatch, capsys):
    code = bench(monkeypatch, "streaming").main(
        ["--tiny", "--layers", "2", "--tokens", "24", "--prompts", "2", "--dir", str(tmp_path / "ckpt"),
         "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().out


@pytest.mark.slow
def test_compare_throughput_dry_run(tmp_path, monkeypatch, capsys):
    """On a copy of the project's own BENCHMARKS.md (whose heading names the script): the row of
    this machine is written into its section."""
    md = tmp_path / "BENCHMARKS.md"
    md.write_text((BENCH.parent / "BENCHMARKS.md").read_text())
    code = bench(monkeypatch, "compare_throughput").main(
        ["--gb", "0.01", "--tokens", "64", "--vocab", "512", "--dir", str(tmp_path / "runs"), "--out", str(md),
         "--stream-mb", "64,1", "--stream-rounds", "2", "--readers", "1,2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert re.search(r"tensors of 1 MiB or more streamed: [\d.]+ / [\d.]+ GB/s", out), out
    assert re.search(r"reading alone \(read_units\), 2 thread\(s\), not verified: [\d.]+ GB/s", out), out
    def section(text):
        return text.split("## compare throughput", 1)[1].split("\n## ", 1)[0]

    assert section(md.read_text()) != section((BENCH.parent / "BENCHMARKS.md").read_text())  # a row added or updated


@pytest.mark.slow
def test_full_depth_dry_run(tmp_path, monkeypatch, capsys):
    code = bench(monkeypatch, "full_depth").main(
        ["--tiny", "--layers", "2", "--tokens", "16", "--prompts", "1", "--reps", "1", "--work", str(tmp_path / "work"),
         "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().out


@pytest.mark.slow
def test_distributed_dry_run(tmp_path, monkeypatch, capsys):
    """The commands of the GPU session, on the CPU: torchrun with gloo, 2 ranks, the tiny dimensions."""
    code = bench(monkeypatch, "distributed").main(
        ["--tiny", "--layers", "4", "--prompts", "4", "--tokens", "16", "--batch-size", "1", "--ranks", "2",
         "--dir", str(tmp_path / "ckpt"), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
         "--dist-timeout", "60", "--repeat", "2", "--parts", "extract,test,tp,read,write"])
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads((tmp_path / "out" / "distributed.json").read_text())
    assert len(data["parts"]["extract"]["rounds"]) == 2 and len(data["parts"]["test"]["rounds"]) == 2
    assert set(data["parts"]["read"]["gbps_by_threads"]) == {"1", "4", "8"}, data["parts"]["read"]
    assert data["parts"]["write"]["gbps_1"] > 0 and data["parts"]["write"]["gbps_2"] > 0, data["parts"]["write"]
    assert "2 side by side" in out and not list((tmp_path / "work").glob("write*"))
    assert re.search(r"testN rank 1: .*build \d.*chain_wait \d.*; first chain out at \d", out), out
    assert re.search(r"process wall [\d.]+ vs [\d.]+ s .*before the replay .*of which comparing [\d.]+ / [\d.]+ s", out), out
    assert data["parts"]["test"]["reports_equal"] and "bit-identical, same report" in out
    runs = data["parts"]["test"]["runs"]
    assert all(0 < r["before_s"] < r["wall_s"] and 0 < r["compare_s"] < r["after_s"] for r in runs.values()), runs
    assert "2 rounds:" in out and "tp" not in [k for k in data["parts"] if len(data["parts"][k].get("rounds", [])) > 1]
    assert data["parts"]["extract"]["bit_identical"] and data["parts"]["test"]["bit_identical"], data["parts"]
    assert data["parts"]["extract"]["speedup"] > 0 and data["parts"]["test"]["runs"]["testN"]["seconds"] > 0
    rows = data["parts"]["tp"]["layers"]
    assert [r["layer"] for r in rows] == [0, 1, 2, 3]
    assert all(r["attn_rel_l2"] is not None and r["moe_rel_l2"] is not None and "flips" in r for r in rows)
    assert "TP=2 candidate vs the one-process (device_map) reference" in out
    assert not (tmp_path / "work" / "dp").exists()  # runs deleted once measured


def test_distributed_test_part_per_read_thread_count(monkeypatch):
    """--read-threads 8,16: the test part once per value, each with LAYERWISE_READ_THREADS set on
    its processes only."""
    dist = bench(monkeypatch, "distributed")
    assert dist.expand("extract,test", "8, 16") == ["extract", "test@8", "test@16"]
    assert dist.expand("test,tp", "") == ["test", "tp"]
    seen = []
    monkeypatch.setattr(dist.Bench, "_test", lambda self, out: seen.append(dict(self.env)) or {})
    b = dist.Bench.__new__(dist.Bench)
    b.env = {"A": "1"}
    b.part_test({}, "16")
    b.part_test({})
    assert seen == [{"A": "1", "LAYERWISE_READ_THREADS": "16"}, {"A": "1"}] and b.env == {"A": "1"}


def test_plan_time_dry_run(tmp_path, monkeypatch, capsys):
    """plan in fresh processes, quiet and with every core busy: the first plan, one planned before, a base."""
    base = Path(__file__).resolve().parents[1] / "src"
    code = bench(monkeypatch, "plan_time").main(["--tiny", "--rounds", "1", "--base", str(base),
                                                 "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads((tmp_path / "plan_time.json").read_text())
    assert set(data["quiet"]) == set(data["loaded"]) == {"first plan", "planned before", "base"}
    assert all(0 < w < 120 for walls in data["quiet"].values() for w in walls), data
    assert "loaded planned before" in out
    with pytest.raises(SystemExit) as usage:
        bench(monkeypatch, "plan_time").main(["--tiny", "--base", str(tmp_path), "--out", str(tmp_path)])
    assert usage.value.code == 2


def test_command_exit_dry_run(tmp_path, monkeypatch, capsys):
    """A command's end, step by step after its manifest, in fresh processes."""
    code = bench(monkeypatch, "command_exit").main(["--tiny", "--rounds", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    (only,) = json.loads((tmp_path / "command_exit.json").read_text())["rounds"]
    after = list(only["after_manifest"].values())
    assert after == sorted(after) and 0 <= after[0] < 30 and only["manifest_s"] < only["wall_s"], only
    assert "process ended:" in out
    assert only["locked_gb"] == {"torch pinned": 0, "registered": 0} and "page-locked (registered)" in out  # no GPU
    with pytest.raises(SystemExit) as usage:  # neither a command nor --tiny
        bench(monkeypatch, "command_exit").main(["--out", str(tmp_path)])
    assert usage.value.code == 2


def test_exit_teardown_dry_run(tmp_path, monkeypatch, capsys):
    """A fresh process's teardown after os._exit, timed by its parent."""
    code = bench(monkeypatch, "exit_teardown").main(["--tiny", "--rounds", "2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = json.loads((tmp_path / "exit_teardown.json").read_text())["results"]["host"]
    assert len(rows) == 2 and all(0 <= r["teardown_s"] < 30 and r["free_s"] is None for r in rows), rows
    assert "host" in out and "teardown" in out


@pytest.mark.slow
def test_isolated_profile_dry_run(tmp_path, monkeypatch, capsys):
    """The headline path's commands (streamed extract, every layer tested alone), fresh processes."""
    code = bench(monkeypatch, "isolated_profile").main(
        ["--tiny", "--layers", "2", "--tokens", "16", "--dir", str(tmp_path / "ckpt"), "--work", str(tmp_path / "work"),
         "--out", str(tmp_path / "out"), "--profile", "--bytecode-cache", "--no-prefetch"])
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads((tmp_path / "out" / "isolated_profile.json").read_text())
    assert data["cold_read_s"] > 0 and data["extract_s"] > data["startup_s"] > 0 and data["ratio"] > 0, data
    assert any("layerwise" in line for line in data["test_profile"]), data["test_profile"]
    assert out.count("(extract + test) / cold read") == 3 and out.count("(one read for both)") == 3
    assert data["noprefetch_joint_s"] > 0 and data["noprefetch_ratio"] > 0, data
    assert data["joint_s"] > data["startup_s"] and data["joint_ratio"] > 0 and data["joint_test_s"] > 0, data
    startup, cached = data["startup_bytecode"], data["cached_startup_bytecode"]
    assert startup["modules"] > 500 and cached["compiled"] == 0 and cached["writes"], (startup, cached)
    assert data["cached_ratio"] > 0 and any((tmp_path / "work" / "pycache").rglob("*.pyc"))
    for name, last in (("extract", "run started"), ("test", "runs started"), ("joint", "run started")):
        timeline = data[f"{name}_timeline"]  # seconds after the command's launch
        names = [stage for stage, _ in timeline["stages"]]
        assert names[names.index(last):][-2:] == ["capture closed", "files written"] and 0 < timeline["stages"][0][1], \
            timeline  # the start-up's stages, then the work's end
        assert timeline["stages"][-1][1] < timeline["manifest_s"] + 0.01 <= timeline["wall_s"] + 0.01, timeline
        assert timeline["wall_s"] == data[f"{name}_s"], timeline
        phases = {(phase, layer) for phase, layer, start, end in timeline["phases"] if 0 < start <= end}
        assert {("read", 0), ("compute", 0)} <= phases, timeline  # each layer's, from the run's stats
    assert out.count("  extract: imported") == 3 and out.count("    layer 1: ") >= 3, out
    code = bench(monkeypatch, "isolated_profile").main(
        ["--tiny", "--layers", "2", "--tokens", "16", "--dir", str(tmp_path / "ckpt"), "--work", str(tmp_path / "work"),
         "--out", str(tmp_path / "out2"), "--no-joint"])
    data = json.loads((tmp_path / "out2" / "isolated_profile.json").read_text())
    assert code == 0 and "joint_s" not in data and data["ratio"] > 0 and "test_timeline" in data, data


def test_manifest_cost_dry_run(tmp_path, monkeypatch, capsys):
    code = bench(monkeypatch, "manifest_cost").main(["--tiny", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads((tmp_path / "out" / "manifest_cost.json").read_text())
    assert data["files"] == 4 and data["tensors"] == 20 and data["writer_entries"]["median_ms"] > 0, data
    assert "from the writer's entries" in out


def test_first_forward_dry_run(tmp_path, monkeypatch, capsys):
    code = bench(monkeypatch, "first_forward").main(["--tiny", "--rounds", "1", "--batch", "2", "--tokens", "8",
                                                       "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads((tmp_path / "out" / "first_forward.json").read_text())
    rows = {r["mode"]: r for r in data["rows"]}
    assert rows["rehearsed"]["rehearsed"] is True and rows["plain"]["rehearsed"] is None, rows
    assert all(len(r["passes_s"]) == 3 and r["outputs_equal"] for r in data["rows"])
    assert "| rehearsed |" in out


def test_digest_speed_dry_run(tmp_path, monkeypatch, capsys):
    code = bench(monkeypatch, "digest_speed").main(["--tiny", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads((tmp_path / "out" / "digest_speed.json").read_text())
    rows = {r["operation"]: r for r in data["rows"]}
    assert {"nonfinite (bf16)", "sha256", "page-cache write (new files)"} <= set(rows), rows
    assert all(r["1_threads_gbps"] > 0 and r["2_threads_gbps"] > 0 for r in rows.values())
    assert data["cpu"]["logical_cpus"] >= 1 and "| sha256 |" in out


def test_read_paths_dry_run(tmp_path, monkeypatch, capsys):
    code = bench(monkeypatch, "read_paths").main(["--tiny", "--threads", "1,2", "--repeat", "1", "--procs", "2",
                                                  "--dir", str(tmp_path / "files"), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads((tmp_path / "out" / "read_paths.json").read_text())
    got = {(r["mode"], r["threads"], r["procs"]) for r in data["rows"]}
    assert got == {(m, t, p) for m in ("pread", "copy") for t in (1, 2) for p in (1, 2)}, got
    assert all(g > 0 for r in data["rows"] for g in r["gbps"]) and "| copy | 2 | 2 |" in out


def test_tensor_reads_dry_run(tmp_path, monkeypatch, capsys):
    code = bench(monkeypatch, "tensor_reads").main(["--tiny", "--threads", "2", "--consume", "none,gpu",
                                                    "--dir", str(tmp_path / "files"), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads((tmp_path / "out" / "tensor_reads.json").read_text())
    got = {(r["mode"], r["verify"], r["consumer"]) for r in data["rows"]}
    modes = ("mapped", "pread", "pieces") + (("pinned",) if torch.cuda.is_available() else ())
    assert got == {(m, v, c) for m in modes for v in (True, False) for c in ("-", data["rows"][-1]["consumer"])}, got
    assert all(g > 0 for r in data["rows"] for g in r["gbps"]) and "| pieces | yes | 2 |" in out


def test_compare_profile_dry_run(monkeypatch, capsys):
    from layerwise import measuring

    before = measuring.tensor_metrics
    code = bench(monkeypatch, "compare_profile").main(["--tiny", "--readers", "2:64", "--top", "5"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert re.search(r"verify=True: [\d.]+ s, [\d.]+ GB, \d+ units, \d+ tensors; .*tensor_metrics [\d.]+ s \(\d+\)", out)
    assert "2 readers, 64 MiB ahead:" in out and "Ordered by: internal time" in out
    assert measuring.tensor_metrics is before, "the timers are taken off again"


def test_compare_knobs_dry_run(tmp_path, monkeypatch, capsys):
    import sys as _sys

    from layerwise import measuring, readahead, tensorfile

    def state():
        return (measuring.tensor_metrics, measuring.batch_tensor_metrics, tensorfile.PLAIN_READS,
                tensorfile.PAGE_IN_HEAD,
                readahead.READ_WORKERS, readahead.WHOLE_READERS, readahead.WHOLE_READERS_CPU, readahead.SWITCH_INTERVAL, readahead.STREAM_BYTES,
                measuring.CHUNK_ELEMENTS, measuring.BATCH_BYTES, _sys.getswitchinterval())

    before = state()
    out_file = tmp_path / "knobs.md"
    knobs = bench(monkeypatch, "compare_knobs")
    code = knobs.main(["--tiny", "--out", str(out_file)])
    out = capsys.readouterr().out
    assert code == 0, out
    table = out_file.read_text()
    for variant in knobs.VARIANTS:
        assert re.search(rf"\| 1 \| {re.escape(variant)} \| [\d.]+ \| [\d.]+ \([\d.]+ s\) \| \*\*[\d.]+\*\* \|", table), table
    assert state() == before, "every setting is put back"
    with pytest.raises(SystemExit):
        bench(monkeypatch, "compare_knobs").main(["--tiny", "--variants", "fast"])


def test_capture_ab_dry_run(tmp_path, monkeypatch, capsys):
    src = Path(__file__).resolve().parents[1] / "src"
    code = bench(monkeypatch, "capture_ab").main(["--tiny", "--base", str(src), "--shapes", "1x8", "--reps", "1",
                                                  "--run-batches", "2", "--book-rounds", "1", "--book-profile", "15",
                                                  "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads((tmp_path / "capture_ab.json").read_text())
    row = data["rows"][0]
    assert (row["batch"], row["tokens"]) == (1, 8) and row["new"]["median"] > 0 and row["base"]["median"] > 0
    assert row["run_batches"] == 2 and row["new_run"]["median"] > 0 and "new_minus_base_run" in row
    assert data["bookkeeping"]["hooks"] == 24 and set(data["bookkeeping"]["ms_per_batch"]) == {"new", "base"}
    stages = data["bookkeeping"]["stages_ms"]["new"]
    assert list(stages) == ["take", "pack_and_launch", "copy_wait", "cut_and_hand"] and stages["cut_and_hand"] > 0
    top = data["bookkeeping"]["profile_ms_per_batch"]
    # the top 15 by own time: on a busy machine waits and torch's own calls can fill the first few
    assert len(top) == 15 and any("collector.py" in fn for fn, *_ in top) and all(own > 0 for _, _, own, _ in top)
    assert not [m for m in sys.modules if m.startswith("layerwise_base")], "the base copy is forgotten with its directory"
    with pytest.raises(SystemExit) as usage:
        bench(monkeypatch, "capture_ab").main(["--tiny", "--base", str(tmp_path), "--out", str(tmp_path)])
    assert usage.value.code == 2 and "no layerwise/collector.py" in capsys.readouterr().err


def test_capture_variants_dry_run(tmp_path, monkeypatch, capsys):
    import torch

    event = torch.cuda.Event
    code = bench(monkeypatch, "capture_variants").main(["--tiny", "--shapes", "1x8", "--reps", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    row = json.loads((tmp_path / "capture_variants.json").read_text())["rows"][0]
    assert (row["batch"], row["tokens"]) == (1, 8) and row["plain_ms"] > 0
    assert all(row[n]["median"] > 0 for n in ("full", "hooks", "hold", "samestream", "spin", "nowait", "torchpinned",
                                             "spinflush")), row
    assert torch.cuda.Event is event, "the spin variant puts torch's Event back"
    assert "LAYERWISE_WRITER" not in os.environ, "the torchpinned variant puts the writer's setting back"
    with pytest.raises(SystemExit) as usage:
        bench(monkeypatch, "capture_variants").main(["--tiny", "--variants", "full,fast"])
    assert usage.value.code == 2 and "unknown fast" in capsys.readouterr().err


def test_writer_processes_dry_run(tmp_path, monkeypatch, capsys):
    from layerwise import writerproc

    if not writerproc.supported():
        pytest.skip("no writer processes here")
    for nonfinite in ([], ["--nonfinite"]):
        code = bench(monkeypatch, "writer_processes").main(["--tiny", "--out", str(tmp_path), "--work", str(tmp_path),
                                                            "--batches", "1,4", *nonfinite])
        assert code == 0, capsys.readouterr().out
    data = json.loads((tmp_path / "writer_processes.json").read_text())
    assert data["nonfinite"] and [(r["processes"], r["threads_each"], r["batch"]) for r in data["rows"]] == [
        (1, 2, 1), (1, 2, 4), (2, 1, 1), (2, 1, 4)]
    assert all(r["files"] == 8 and r["wall_s"]["median"] > 0 for r in data["rows"])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("lw-writers-")] == [], "its files are gone"


def test_compare_trace_dry_run(tmp_path, monkeypatch, capsys):
    code = bench(monkeypatch, "compare_trace").main(["--tiny", "--variants", "as-is,stream-all", "--vocab", "1000",
                                                     "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "## as-is, cold: compare" in out and "## stream-all, warm: compare" in out and "measuring thread (1)" in out
    assert (tmp_path / "out" / "summary.md").read_text().splitlines()[0].endswith("+ logits, two runs")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    measuring = summary["stream-all"]["warm"]["groups"]["measuring thread"]
    assert measuring["in_ops_s"] > 0 and measuring["span_s"] >= measuring["in_ops_s"] and "stalls" in measuring
    assert (tmp_path / "out" / "trace-as-is-cold.json").is_file()
    with pytest.raises(SystemExit):
        bench(monkeypatch, "compare_trace").main(["--tiny", "--variants", "fast"])


def test_compare_trace_union_counts_overlaps_once(monkeypatch):
    union = bench(monkeypatch, "compare_trace").union
    assert union([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == 4
    assert union([]) == 0


def test_wake_latency_dry_run(tmp_path, monkeypatch, capsys):
    code = bench(monkeypatch, "wake_latency").main(["--tiny", "--out", str(tmp_path / "wake.md")])
    out = capsys.readouterr().out
    assert code == 0, out
    table = (tmp_path / "wake.md").read_text()
    assert table.count("| idle |") == 3 and table.count("| 1 spinning process |") == 3
    with pytest.raises(SystemExit):
        bench(monkeypatch, "wake_latency").main(["--pairs", "0"])


def test_compare_trace_summary_of_a_made_up_trace(monkeypatch):
    """Top-level ops only (a nested op is not counted twice), stalls over 1 ms (an op or a gap), the
    runtime calls by name, the GPU's union of kernels and copies."""
    summarise = bench(monkeypatch, "compare_trace").summarise
    x = lambda ts, dur, cat, name="op", tid=7: {"ph": "X", "ts": ts, "dur": dur, "cat": cat, "name": name, "tid": tid}  # noqa: E731
    trace = {"traceEvents": [
        x(0, 100, "cpu_op"), x(10, 50, "cpu_op", "nested"), x(20, 5, "cuda_runtime", "cudaLaunchKernel"),
        x(1500, 2000, "cpu_op"),  # a 1.4 ms gap before it, and itself 2 ms long
        x(3600, 100, "cpu_op"), x(0, 5000, "cpu_op", tid=8),
        x(100, 300, "kernel"), x(200, 300, "gpu_memcpy"), x(1000, 100, "kernel"),
        {"ph": "M", "name": "thread_name", "tid": 7},
    ]}
    s = summarise(trace, 7)
    main = s["groups"]["measuring thread"]
    assert main["threads"] == 1 and main["span_s"] == pytest.approx(3700e-6)
    assert main["in_ops_s"] == pytest.approx(2200e-6) and main["outside_ops_s"] == pytest.approx(1500e-6)
    assert main["stalls"] == 2 and main["stalled_s"] == pytest.approx(3400e-6)
    assert main["runtime_s"] == {"cudaLaunchKernel": pytest.approx(5e-6)}
    assert s["groups"]["other threads"]["in_ops_s"] == pytest.approx(5000e-6)
    assert s["gpu"]["busy_s"] == pytest.approx(500e-6) and s["gpu"]["span_s"] == pytest.approx(1000e-6)


def test_cold_reads_dry_run(tmp_path, monkeypatch, capsys):
    code = bench(monkeypatch, "cold_reads").main(
        ["--tiny", "--dir", str(tmp_path / "files"), "--threads", "1,3", "--chunk-mb", "1", "--repeat", "2",
         "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads((tmp_path / "out" / "cold_reads.json").read_text())
    assert data["bytes"] == 32_000_000 and len(data["files"]) == 4
    assert list(data["results"]) == ["1 thread, one file after another", "1 threads x 1 MiB", "3 threads x 1 MiB"]
    for rows in data["results"].values():
        assert len(rows) == 2 and all(r["gbps"] > 0 for r in rows)
        # what /proc says came from storage (a tmpfs gives none: not asserted cold here)
        assert all(r["from_storage"] is None or 0 <= r["from_storage"] <= 1.5 for r in rows), rows


def test_metrics_batch_dry_run(tmp_path, monkeypatch, capsys):
    code = bench(monkeypatch, "metrics_batch").main(["--tiny", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads((tmp_path / "out" / "metrics_batch.json").read_text())
    ways = data["ways"]
    assert list(ways) == ["each", "batched x 2", "batched x 6"]
    # one batched pass over the 6 pairs costs a fraction of the calls of measuring each pair
    assert ways["batched x 6"]["aten_calls_per_pair"] * 4 < ways["each"]["aten_calls_per_pair"]
    assert all(len(w["seconds"]) == 2 for w in ways.values())


def test_metrics_batch_refuses_figures_that_differ(tmp_path, monkeypatch):
    mb = bench(monkeypatch, "metrics_batch")
    real = mb.batched
    monkeypatch.setattr(mb, "batched", lambda r, c, k: [replace(m, rel_l2=m.rel_l2 * 1.001) for m in real(r, c, k)])
    with pytest.raises(RuntimeError, match="differ from tensor_metrics"):
        mb.main(["--tiny", "--out", str(tmp_path)])


def test_gc_counts_dry_run(tmp_path, monkeypatch, capsys):
    code = bench(monkeypatch, "gc_counts").main(["--tiny", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = json.loads((tmp_path / "gc_counts.json").read_text())["rows"]
    assert [(r["batch"], r["pause"]) for r in rows] == [(1, True), (1, False)]
    assert all(r["collections"] == sum(r["by_phase_generation"].values()) == sum(r["by_thread"].values())
               for r in rows)
    assert not any(k.startswith("layers:") for k in rows[0]["by_phase_generation"]), "collected while paused"


def test_device_session_scripts_parse_and_pass_only_flags_their_benchmarks_take():
    """A device session's script runs where device time is short: every one in benchmarks/ parses
    (`bash -n`), and every benchmark it starts exists and takes each flag it is given (up to a
    `--`, after which the flags are the layerwise command's). A flag renamed in a script's argparse
    fails here, not on the GPU machine."""
    import subprocess

    scripts = sorted(BENCH.glob("*.sh"))
    assert len(scripts) > 50
    wrong = []
    for sh in scripts:
        parsed = subprocess.run(["bash", "-n", str(sh)], capture_output=True, text=True)
        if parsed.returncode:
            wrong.append(f"{sh.name}: {parsed.stderr.strip()}")
        text = sh.read_text().replace("\\\n", " ")
        for m in re.finditer(r'python3 "?\$?\S*?benchmarks/(\w+)\.py"?([^\n;|>&]*)', text):
            script = BENCH / f"{m.group(1)}.py"
            if not script.is_file():
                wrong.append(f"{sh.name}: {script.name} does not exist")
                continue
            source = script.read_text()
            for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", m.group(2).split(" -- ")[0]):
                if f'"{flag}"' not in source:
                    wrong.append(f"{sh.name}: {script.name} takes no {flag}")
    assert not wrong, "\n".join(wrong)
