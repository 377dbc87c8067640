"""Large tensors handed over while they are read (readahead.Arrival): compare gives the same
report whichever way its tensors arrive, every digest is still checked, and a caller that stops
early leaves no reader behind."""

import dataclasses
import threading
import time

import pytest
import torch
from synthetic_runs import as_version_1, corrupt_tensor, toy_run

from layerwise import readahead, tensorfile
from layerwise.compare import CompareOptions, compare_runs
from layerwise.errors import UserError


@pytest.fixture
def streamed(monkeypatch):
    """Every tensor streamed, in pieces of 40 bytes (most tensors span several)."""
    monkeypatch.setattr(readahead, "STREAM_BYTES", 1)
    monkeypatch.setattr(readahead, "STREAM_PIECE", 40)


def _rows(report):
    return [dataclasses.astuple(r) for r in report.rows]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return toy_run(root / "ref"), toy_run(root / "cand", fault=("scale", 2, 1.001)), toy_run(root / "base")


@pytest.mark.parametrize("prefetch", [True, False])
def test_a_streamed_compare_reports_what_a_whole_read_does(runs, monkeypatch, prefetch):
    ref, cand, base = runs
    whole = compare_runs(ref, cand, CompareOptions(prefetch=prefetch), baseline=base)
    monkeypatch.setattr(readahead, "STREAM_BYTES", 1)
    monkeypatch.setattr(readahead, "STREAM_PIECE", 40)
    arrived = []
    real = readahead.Arrival.__init__

    def counting(self, tensor):
        arrived.append(tensor.numel())
        real(self, tensor)

    monkeypatch.setattr(readahead.Arrival, "__init__", counting)
    stream = compare_runs(ref, cand, CompareOptions(prefetch=prefetch), baseline=base)
    assert len(arrived) == 3 * len(ref.entries())  # every tensor of the three runs came streamed
    assert stream.verdict == whole.verdict == "fail"
    assert stream.first_divergence.name == whole.first_divergence.name
    assert _rows(stream) == _rows(whole)


def test_a_streamed_tensor_that_fails_its_digest_names_its_file(runs, tmp_path, streamed):
    ref = runs[0]
    cand = toy_run(tmp_path / "cand")
    path = corrupt_tensor(cand, "model.layers.2:output", 1)
    with pytest.raises(UserError, match=f"in {path} fails its digest check"):
        compare_runs(ref, cand)
    assert compare_runs(ref, cand, CompareOptions(verify=False)).verdict == "fail"


@pytest.mark.parametrize("digest", ["blake3", "sha256_tree"])
def test_earlier_format_versions_are_verified_when_streamed(tmp_path, monkeypatch, streamed, digest):
    """A version 1 run (sha256) and a version 2 run (sha256_tree): their digests are computed once
    the tensor is in, and a flipped bit is caught."""
    monkeypatch.setattr(tensorfile, "HASH_CHUNK", 64)
    monkeypatch.setattr(tensorfile, "DIGEST", digest)
    new = toy_run(tmp_path / "new")
    old = as_version_1(toy_run(tmp_path / "old"))
    assert compare_runs(new, old).verdict == "pass"
    path = corrupt_tensor(new, "model.layers.1:input", 0)
    with pytest.raises(UserError, match=f"in {path} fails its digest check"):
        compare_runs(new, old)


def test_a_truncated_file_is_one_clear_error(runs, tmp_path, streamed):
    cand = toy_run(tmp_path / "cand")
    path = cand.path / cand.entry("model.layers.1:output", 0).file
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(UserError, match="truncated"):
        compare_runs(runs[0], cand)


def test_to_device_copies_only_what_has_arrived(monkeypatch):
    """The copy waits for each piece: a reader that publishes slowly is never overtaken."""
    monkeypatch.setattr(readahead, "STREAM_PIECE", 64)
    source = torch.arange(4096, dtype=torch.float32)
    tensor = torch.full_like(source, float("nan"))
    arrival = readahead.Arrival(tensor)

    def fill():
        for begin in range(0, 4096, 100):
            tensor[begin:begin + 100] = source[begin:begin + 100]
            arrival._publish(arrived=min(4096, begin + 100) * 4)
            time.sleep(0.001)
        arrival._publish(verified=True)

    reader = threading.Thread(target=fill)
    reader.start()
    out = readahead.to_device(tensor, arrival, torch.device("cpu"))
    reader.join()
    assert torch.equal(out, source) and out.data_ptr() != tensor.data_ptr()


def test_an_error_reaches_whoever_waits():
    arrival = readahead.Arrival(torch.empty(10))
    arrival._publish(arrived=8)
    arrival.wait(8)  # what has arrived may be used
    threading.Timer(0.05, arrival._publish, kwargs={"error": UserError("the disk is gone")}).start()
    with pytest.raises(UserError, match="the disk is gone"):
        arrival.wait(40)
    with pytest.raises(UserError, match="the disk is gone"):
        arrival.result()


def test_a_caller_that_stops_early_cancels_the_readers(runs, monkeypatch):
    """Closing the generator mid-run: the readers still reading stop at their next piece and the
    pool is gone at once; nothing is left reading."""
    monkeypatch.setattr(readahead, "STREAM_BYTES", 1)
    monkeypatch.setattr(readahead, "STREAM_PIECE", 4)
    ref = runs[0]
    pieces = []
    real = readahead.os.preadv

    def slow(fd, buffers, offset):
        pieces.append(offset)
        time.sleep(0.002)
        return real(fd, buffers, offset)

    monkeypatch.setattr(readahead.os, "preadv", slow)
    units = [(p, (e.name,)) for p in (0, 1) for e in ref.entries() if e.prompt == p]
    reading = readahead.read_units({"ref": ref}, iter(units))
    p, unit, tensors, arrivals = next(reading)
    assert set(arrivals) == {("ref", unit[0])}
    started = time.perf_counter()
    reading.close()
    done = len(pieces)
    time.sleep(0.05)
    assert len(pieces) == done, "a reader kept reading after the caller stopped"
    assert time.perf_counter() - started < 5
    total = sum(e.nbytes for e in ref.entries()) // 4
    assert done < total  # stopped before reading everything
