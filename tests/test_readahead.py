"""Large tensors streamed to the metrics' device while they are read (readahead.Arrival): compare
gives the same report whichever way its tensors arrive, every digest is still checked, and a
caller that stops early leaves no reader behind. Streaming is for GPUs; here it is let onto the
CPU, whose path differs only in the copy (tests/gpu/test_gpu_compare.py streams to a GPU)."""

import dataclasses
import json
import threading
import time

import pytest
import torch
from synthetic_runs import as_version_1, corrupt_tensor, toy_run

from layerwise import readahead, tensorfile
from layerwise.compare import CompareOptions, compare_runs
from layerwise.errors import UserError
from layerwise.names import ROUTER_ROLES
from layerwise.runs import open_run


def _stream_all(monkeypatch, piece: int) -> None:
    monkeypatch.setattr(readahead, "STREAM_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(readahead, "STREAM_BYTES", 1)
    monkeypatch.setattr(readahead, "STREAM_PIECE", piece)


@pytest.fixture
def streamed(monkeypatch):
    """Every tensor but a router's streamed, in pieces of 40 bytes (most tensors span several)."""
    _stream_all(monkeypatch, 40)


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
    _stream_all(monkeypatch, 40)
    arrived = []
    real = readahead.Arrival.__init__

    def counting(self, tensor):
        arrived.append(tensor.numel())
        real(self, tensor)

    monkeypatch.setattr(readahead.Arrival, "__init__", counting)
    stream = compare_runs(ref, cand, CompareOptions(prefetch=prefetch), baseline=base)
    routers = [e for e in ref.entries() if e.role in ROUTER_ROLES]
    assert routers and len(arrived) == 3 * (len(ref.entries()) - len(routers))  # all but routers, streamed
    assert stream.verdict == whole.verdict == "fail"
    assert stream.first_divergence.name == whole.first_divergence.name
    assert _rows(stream) == _rows(whole)


@pytest.mark.parametrize("digest", ["blake3", "sha256_tree"])
def test_earlier_format_versions_are_read_whole_and_verified(tmp_path, monkeypatch, streamed, digest):
    """A version 1 run (sha256) has no blake3 digest to check as it streams: its tensors are read
    whole, verified, and a flipped bit is caught; a version 2 run (sha256_tree) likewise."""
    monkeypatch.setattr(tensorfile, "HASH_CHUNK", 64)
    monkeypatch.setattr(tensorfile, "DIGEST", digest)
    new = toy_run(tmp_path / "new")
    old = as_version_1(toy_run(tmp_path / "old"))
    arrived = []
    real = readahead.Arrival.__init__
    monkeypatch.setattr(readahead.Arrival, "__init__", lambda self, t: arrived.append(t) or real(self, t))
    assert compare_runs(new, old).verdict == "pass"
    routers = sum(e.role in ROUTER_ROLES for e in new.entries())
    assert len(arrived) == (len(new.entries()) - routers if digest == "blake3" else 0)
    path = corrupt_tensor(old, "model.layers.1:input", 0)
    with pytest.raises(UserError, match=f"in {path} fails its digest check"):
        compare_runs(new, old)


def test_a_truncated_file_is_one_clear_error(runs, tmp_path, streamed):
    cand = toy_run(tmp_path / "cand")
    path = cand.path / cand.entry("model.layers.1:output", 0).file
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(UserError, match=r"^run file .* truncated.*: the run is corrupt, re-extract it$"):
        compare_runs(runs[0], cand)


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("field, value", [("dtype", "float64"), ("shape", [8, 16])])
def test_a_manifest_that_disagrees_with_its_file_is_refused(runs, tmp_path, monkeypatch, stream, field, value):
    """An entry's dtype or shape edited: the tensor as its file holds it is not what the manifest
    says, refused when it is read (streamed or whole), with or without digest checks."""
    if stream:
        _stream_all(monkeypatch, 40)
    cand = toy_run(tmp_path / "cand")
    manifest = json.loads((cand.path / "manifest.json").read_text())
    entry = next(e for e in manifest["tensors"] if e["name"] == "model.layers.1:output" and e["prompt"] == 0)
    entry[field] = value
    (cand.path / "manifest.json").write_text(json.dumps(manifest))
    edited = open_run(cand.path)
    for verify in (True, False):
        with pytest.raises(UserError, match=r"says tensor model.layers.1:output \(prompt 0\) is .*, but .* holds "
                                            r"float32 \[8, 32\]: the run was edited or is corrupt, re-extract it"):
            compare_runs(edited, edited, CompareOptions(verify=verify))


def test_pieces_arrive_in_order_and_the_tensor_is_exact(runs, monkeypatch):
    """A tensor of several pieces (the last one short): `arrived` grows piece by piece, and the
    tensor is the one Run.tensor reads."""
    _stream_all(monkeypatch, 24)
    ref = runs[0]
    entry = max(ref.entries(), key=lambda e: e.nbytes)
    seen = []
    real = readahead.Arrival._publish

    def recording(self, arrived=None, verified=False, error=None):
        seen.append(arrived)
        real(self, arrived, verified, error)

    monkeypatch.setattr(readahead.Arrival, "_publish", recording)
    reading = readahead.read_units({"ref": ref}, iter([(entry.prompt, (entry.name,))]), device=torch.device("cpu"))
    for _, _, tensors, arrivals in reading:
        tensor = arrivals[("ref", entry.name)].result()
        assert torch.equal(tensor, ref.tensor(entry.name, entry.prompt)) and tensor is tensors[("ref", entry.name)]
    steps = [n for n in seen if n is not None]
    assert steps == list(range(24, entry.nbytes, 24)) + [entry.nbytes] and entry.nbytes % 24


def test_an_error_reaches_whoever_waits():
    arrival = readahead.Arrival(torch.empty(10))
    arrival._publish(arrived=8)
    threading.Timer(0.05, arrival._publish, kwargs={"error": UserError("the disk is gone")}).start()
    with pytest.raises(UserError, match="the disk is gone"):
        arrival.result()


def test_a_caller_that_stops_early_cancels_the_readers(runs, monkeypatch):
    """Closing the generator mid-run: the readers still reading stop at their next piece and the
    pool is gone at once; nothing is left reading."""
    _stream_all(monkeypatch, 4)
    ref = runs[0]
    pieces = []
    real = readahead.Arrival._publish

    def slow(self, arrived=None, verified=False, error=None):
        pieces.append(arrived)
        time.sleep(0.002)
        real(self, arrived, verified, error)

    monkeypatch.setattr(readahead.Arrival, "_publish", slow)
    units = [(p, (e.name,)) for p in (0, 1) for e in ref.entries() if e.prompt == p]
    reading = readahead.read_units({"ref": ref}, iter(units), device=torch.device("cpu"))
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


def test_no_room_on_the_device_reads_the_tensor_whole(runs, monkeypatch, streamed):
    """The device is full when a streamed tensor's place is taken: the tensor is read whole on the
    CPU instead (and copied when it is measured), with the same report."""
    ref, cand, _ = runs
    whole = compare_runs(ref, cand)

    def full(self, tensor):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(readahead.Arrival, "__init__", full)
    assert _rows(compare_runs(ref, cand)) == _rows(whole)


def test_tensors_read_whole_go_to_fewer_threads_than_streams(runs, monkeypatch):
    """Tensors read whole are read by at most WHOLE_READERS threads at once (WHOLE_READERS_CPU
    when no GPU measures them), streamed ones by up to READ_WORKERS; every unit still arrives, in
    order, with the same tensors."""
    ref = runs[0]
    units = [(e.prompt, (e.name,)) for e in ref.entries()]
    monkeypatch.setattr(readahead, "READ_WORKERS", 6)
    monkeypatch.setattr(readahead, "WHOLE_READERS", 3)  # not this one: nothing here is bound for a GPU
    monkeypatch.setattr(readahead, "WHOLE_READERS_CPU", 2)
    seen: dict[str, set] = {"whole": set(), "stream": set()}
    busy, peak, lock = [0], [0], threading.Lock()
    read_whole, stream = readahead._read_whole, readahead._stream

    def whole(*args):
        with lock:
            busy[0] += 1
            peak[0] = max(peak[0], busy[0])
            seen["whole"].add(threading.current_thread().name)
        time.sleep(0.003)  # long enough for the next units' reads to be waiting
        try:
            return read_whole(*args)
        finally:
            with lock:
                busy[0] -= 1

    def streamed(*args):
        seen["stream"].add(threading.current_thread().name)
        time.sleep(0.003)
        return stream(*args)

    monkeypatch.setattr(readahead, "_read_whole", whole)
    got = [(p, unit) for p, unit, _, _ in readahead.read_units({"ref": ref}, iter(units))]
    assert got == units and peak[0] == 2 and len(seen["whole"]) == 2 and not seen["stream"]

    _stream_all(monkeypatch, 40)
    monkeypatch.setattr(readahead, "_stream", streamed)
    seen["whole"].clear()
    got = [(p, unit) for p, unit, _, arr in readahead.read_units({"ref": ref}, iter(units), device=torch.device("cpu"))]
    assert got == units
    assert len(seen["stream"]) > 2 and not seen["stream"] & seen["whole"]


def test_the_switch_interval_is_short_while_runs_are_read_and_put_back_after(runs):
    """readahead.SWITCH_INTERVAL holds while any read_units runs, two at once included, and the
    interval found before is back after the last ends, whether it ran out or was closed early; a
    process that already has a shorter one keeps it."""
    import sys

    ref = runs[0]
    units = [(e.prompt, (e.name,)) for e in ref.entries()]
    before = sys.getswitchinterval()
    first = readahead.read_units({"ref": ref}, iter(units))
    second = readahead.read_units({"ref": ref}, iter(units))
    short = pytest.approx(min(before, readahead.SWITCH_INTERVAL), rel=0.05)
    next(first)
    assert sys.getswitchinterval() == short
    assert sum(1 for _ in second) == len(units)
    assert sys.getswitchinterval() == short, "the first still runs"
    first.close()
    assert sys.getswitchinterval() == before
    sys.setswitchinterval(1e-4)
    try:
        reading = readahead.read_units({"ref": ref}, iter(units))
        next(reading)
        assert sys.getswitchinterval() == pytest.approx(1e-4, rel=0.05)
        reading.close()
        assert sys.getswitchinterval() == pytest.approx(1e-4, rel=0.05)
    finally:
        sys.setswitchinterval(before)


@pytest.mark.parametrize("page_in", [True, False])
def test_paging_the_header_in_first_reads_the_same_tensor_and_the_same_errors(runs, tmp_path, monkeypatch, page_in):
    """tensorfile.PAGE_IN_HEAD reads a file's header before safe_open does: the same tensors and
    digests come back, and a missing or truncated file is the same one clear error."""
    monkeypatch.setattr(tensorfile, "PAGE_IN_HEAD", page_in)
    ref = runs[0]
    for e in ref.entries():
        x = ref.tensor(e.name, e.prompt)
        monkeypatch.setattr(tensorfile, "PAGE_IN_HEAD", not page_in)
        assert torch.equal(x, ref.tensor(e.name, e.prompt)), e.name
        monkeypatch.setattr(tensorfile, "PAGE_IN_HEAD", page_in)
    cand = toy_run(tmp_path / "cand")
    entry = cand.entry("model.layers.1:output", 0)
    path = cand.path / entry.file
    path.write_bytes(path.read_bytes()[:5])
    with pytest.raises(UserError, match=str(path.name)):
        cand.tensor(entry.name, 0)
    path.unlink()
    with pytest.raises(UserError, match=str(path.name)):
        cand.tensor(entry.name, 0)
