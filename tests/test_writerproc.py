"""The run writer's own process: the same bytes as this process's writer, its errors, its death."""

import os
import signal
import threading
from pathlib import Path

import pytest
import torch

from layerwise import manifest, pinned, runs, shmbuffers, tensorfile, writerproc
from layerwise.errors import LostProcess, UserError

from helpers import in_thread

INTENT = {"producer": "test", "model": {"spec": "m", "model_type": "llama"}, "settings": {},
          "prompts": [{"index": i, "token_ids": [1]} for i in range(16)]}  # a manifest's tensors are of its prompts

pytestmark = pytest.mark.skipif(not writerproc.supported(), reason="no memfd / fd passing here")


def in_shared(t: torch.Tensor) -> torch.Tensor:
    """`t`'s bytes in a shared buffer, as a capture's device-to-host copy leaves them."""
    raw = t.contiguous().view(-1).view(torch.uint8)
    buffer = pinned.new_buffer(max(raw.numel(), 1 << 16), False)
    buffer[:raw.numel()].copy_(raw)
    return buffer[:raw.numel()].view(t.dtype).view(t.shape)


def tensors_of_every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    out = {}
    for i, dtype in enumerate([torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn,
                               torch.float8_e5m2]):
        t = torch.randn(37, 5, generator=g).to(dtype)
        if i % 2 == 0:  # the model's own NaN/Inf are counted into the metadata
            t.view(-1)[[3, 9]] = torch.tensor([float("nan"), float("inf")]).to(dtype)
        out[f"model.layers.{i}:output"] = t
    out["model.layers.0.mlp.gate:top_k_ids"] = torch.randint(0, 256, (37, 8), generator=g, dtype=torch.int64)
    out["model.layers.0:flags"] = torch.rand(37, generator=g) > 0.5
    return out


@pytest.fixture
def traced(monkeypatch):
    """The files the writer's process wrote."""
    seen = []
    monkeypatch.setattr(writerproc, "TRACE", lambda *timing: seen.append(timing))
    return seen


@pytest.mark.parametrize("chunk", [64 << 20, 64])  # 64 bytes: the digest's tree of chunks
def test_the_process_writes_the_bytes_this_process_writes(tmp_path, monkeypatch, traced, chunk):
    """Every dtype, NaN/Inf counts, digests over several chunks: the file the writer's process
    writes, from shared buffers and from bytes sent along, is byte for byte the one
    `tensorfile.write_file` writes (this process's writer threads)."""
    monkeypatch.setattr(tensorfile, "HASH_CHUNK", chunk)
    plain = tensors_of_every_dtype()
    shared = {name: in_shared(t) for name, t in plain.items()}
    writer = runs.RunWriter(tmp_path / "run", INTENT, threads=2)
    written = []
    writer.put(0, "model.layers.0", shared, lambda: written.append(0))  # in shared buffers
    writer.put(1, "model.layers.0", plain, lambda: written.append(1))  # small: sent with the message
    writer.finish()
    assert sorted(written) == [0, 1] and len(traced) == 2
    for prompt in (0, 1):
        tensorfile.write_file(tmp_path / "oracle", plain, {"prompt": str(prompt)}, nonfinite=True)
        got = (tmp_path / "run" / runs.group_file(prompt, "model.layers.0")).read_bytes()
        assert got == (tmp_path / "oracle").read_bytes()
    run = runs.open_run(tmp_path / "run")
    assert [n["name"] for n in run.manifest["nonfinite"]] == [f"model.layers.{i}:output" for i in (0, 2, 4)] * 2
    for name, t in plain.items():  # read back, every digest verified
        assert torch.equal(run.tensor(name, 1).view(torch.uint8), t.view(torch.uint8))


def test_what_the_process_cannot_read_is_written_here(tmp_path, traced):
    """A big tensor outside shared memory is written by this process's threads; a big one in a
    shared buffer by the writer's process."""
    big = torch.randn(shmbuffers.INLINE_BYTES // 4 + 1)
    writer = runs.RunWriter(tmp_path / "run", INTENT, threads=2)
    writer.put(0, "a", {"a:output": big})
    writer.put(0, "c", {"c:output": in_shared(big)})
    writer.finish()
    assert len(traced) == 1
    run = runs.open_run(tmp_path / "run")
    assert torch.equal(run.tensor("a:output"), big) and torch.equal(run.tensor("c:output"), big)


def test_a_file_the_process_cannot_write_is_one_clear_error(tmp_path):
    """The system's error in the writer's process reaches the caller as the threads' own line;
    no manifest, no temporary file left."""
    writer = runs.RunWriter(tmp_path / "run", INTENT, threads=2)
    target = tmp_path / "run" / runs.group_file(0, "a")
    target.parent.mkdir(parents=True)
    (target.parent / f".{target.name}.{os.getpid()}.tmp").mkdir()  # where the process would write
    writer.put(0, "a", {"a:output": torch.ones(4)})
    with pytest.raises(UserError, match=r"cannot write .*a\.safetensors: .*\(is the disk full\?\)"):
        writer.finish()
    assert not (tmp_path / "run" / runs.MANIFEST).exists() and not target.exists()


def test_a_writer_process_that_dies_fails_the_run_and_the_next_starts_another(tmp_path):
    writer = runs.RunWriter(tmp_path / "run", INTENT, threads=2)
    [proc] = writerproc.processes(2)
    os.kill(proc.proc.pid, signal.SIGKILL)
    proc.proc.wait()
    with pytest.raises(LostProcess, match=r"the run writer's process ended \(exit code -9.*rerun the same command"):
        writer.put(0, "a", {"a:output": torch.ones(4)})
        writer.finish()
    assert not (tmp_path / "run" / runs.MANIFEST).exists()
    again = runs.RunWriter(tmp_path / "again", INTENT, threads=2)
    again.put(0, "a", {"a:output": torch.ones(4)})
    again.finish()
    assert writerproc.processes(2)[0] is not proc
    assert torch.equal(runs.open_run(tmp_path / "again").tensor("a:output"), torch.ones(4))


def test_a_shared_buffer_comes_back_to_the_cache_when_its_last_view_is_gone():
    """Buffers are reused, never unmapped: an address the process was sent stays what it was."""
    buffer = pinned.new_buffer(3 << 16, False)
    base = buffer.data_ptr()
    view = buffer[10:20]
    del buffer
    assert shmbuffers._region_of(view, 10) is not None
    assert pinned.new_buffer(3 << 16, False).data_ptr() != base  # a view is alive: not reused yet
    del view
    assert pinned.new_buffer(3 << 16, False).data_ptr() == base


def test_unpin_all_makes_every_registered_region_pageable_once_and_never_hands_it_out_as_locked(monkeypatch):
    """At a command's end its page-locked regions are unregistered (the teardown frees pageable
    memory faster): each once, the cached ones moved to the pageable cache; one the driver
    refuses to unregister stays page-locked. (On a GPU: tests/gpu, the copies themselves.)"""
    calls, refused = [], []  # the driver refuses the second region
    monkeypatch.setattr(torch.cuda, "cudart", lambda: type("R", (), {"cudaHostUnregister": staticmethod(
        lambda base: calls.append(base) or int(base in refused))}))
    monkeypatch.setattr(shmbuffers, "_REGIONS", {})
    monkeypatch.setattr(shmbuffers, "_BASES", [])
    monkeypatch.setattr(shmbuffers, "_CACHE", {})
    size = 5 << 16  # no other test's region has it
    regions = [shmbuffers._new_region(size, False) for _ in range(3)]
    for region in regions[:2]:
        region.pinned = True  # as cudaHostRegister left them (no GPU here)
    refused.append(regions[1].base)
    shmbuffers._CACHE[size, True] = [regions[0]]
    shmbuffers._CACHE[size, False] = [regions[2]]
    assert shmbuffers.unpin_all() == size
    assert calls == [regions[0].base, regions[1].base] and [r.pinned for r in regions] == [False, True, False]
    assert shmbuffers._CACHE == {(size, False): [regions[2], regions[0]]}
    assert shmbuffers.unpin_all() == 0 and calls[2:] == [regions[1].base]  # only the one still page-locked


def test_this_process_s_writer_threads_start_only_for_a_file_the_process_cannot_write(tmp_path, traced):
    """With a writer process, the run writer's own threads are not started (nor stopped at the
    end) unless a file falls to them; then they write it."""
    def ours():
        return [t for t in threading.enumerate() if t.name.startswith("layerwise-writer-") and
                not t.name.startswith("layerwise-writer-replies")]

    before = set(ours())
    writer = runs.RunWriter(tmp_path / "run", INTENT, threads=2)
    writer.put(0, "a", {"a:output": in_shared(torch.randn(64, 64))})
    writer.wait()
    assert set(ours()) == before and len(traced) == 1
    big = torch.randn(shmbuffers.INLINE_BYTES // 4 + 1)
    writer.put(0, "b", {"b:output": big})  # not in shared memory: this process writes it
    assert len(set(ours()) - before) == 2
    writer.finish()
    assert set(ours()) == before and len(traced) == 1
    assert torch.equal(runs.open_run(tmp_path / "run").tensor("b:output"), big)


def test_the_writer_process_indexes_its_files_and_the_manifest_is_the_headers_read_back(tmp_path, monkeypatch, traced):
    """A writer process sends each file's manifest entries and their texts with its reply: this
    process builds none (no GIL spent on them), they are in before `close`, and the manifest
    equals the one made from the files' headers read back."""
    built = []
    real = runs.file_entries
    monkeypatch.setattr(runs, "file_entries", lambda rel, *a: built.append(rel) or real(rel, *a))
    writer = runs.RunWriter(tmp_path / "run", INTENT, threads=1)
    g = torch.Generator().manual_seed(4)
    for prompt in range(4):
        writer.put(prompt, "a", {"a:output": in_shared(torch.randn(1 << 16, generator=g)),
                                 "a:input": in_shared(torch.randn(8, 4, generator=g).to(torch.bfloat16))})
    writer.wait()
    assert sorted(writer._index) == sorted(writer.written) and len(traced) == 4
    assert all(writer._texts[(rel, e["name"])] == manifest.item_text(e)
               for rel, entries in writer._index.items() for e in entries)
    written = writer.finish()
    assert built == [], "this process built entries the writer's process had sent"
    assert written["tensors"] == runs.build_manifest(writer.path, INTENT, {}, None)["tensors"]
    assert (writer.path / runs.MANIFEST).read_text() == manifest.json_text(written)


def test_a_file_the_writer_process_cannot_index_is_indexed_here(tmp_path, traced):
    """A file written whole whose entries the writer's process cannot make (here: a path outside
    a run's prompt folders) still succeeds, with no entries: the caller indexes it, and reports
    what is wrong, on its own thread."""
    procs = writerproc.processes(1)
    handoff = writerproc.Handoff(procs, 2)
    got = []
    tensor = in_shared(torch.arange(64.0))
    assert handoff.put(str(tmp_path / "x.safetensors"), {"prompt": "0"}, {"a:output": tensor},
                       lambda header, err, indexed: got.append((header, err, indexed)), index="x.safetensors")
    handoff.wait()
    ((header, err, indexed),) = got
    assert err is None and indexed is None and header["a:output"]["shape"] == [64]
    assert torch.equal(tensorfile.read_tensor(tmp_path / "x.safetensors", "a:output"), tensor)


@pytest.mark.parametrize("writer_kind", ["process", "threads"])
def test_tensors_the_capture_found_finite_are_not_checked_again(tmp_path, monkeypatch, traced, writer_kind):
    """`RunWriter.put(..., finite=names)` reaches whoever writes the file: the writer's process
    spends no second checking them (its reply's timing), this process's threads hand the names to
    `tensorfile.write_file`; the files are the same bytes."""
    handed, write_file = [], tensorfile.write_file
    if writer_kind == "threads":
        monkeypatch.setenv(writerproc.ENV, "threads")
        monkeypatch.setattr(tensorfile, "write_file", lambda *a, **k: handed.append(set(k["finite"])) or write_file(*a, **k))
    big = {"a:input": torch.randn(1 << 18).to(torch.bfloat16), "a:output": torch.randn(1 << 18)}
    writer = runs.RunWriter(tmp_path / "run", INTENT, threads=2)
    writer.put(0, "a", {name: in_shared(t) for name, t in big.items()})
    writer.put(1, "a", {name: in_shared(t) for name, t in big.items()}, finite={"a:input", "a:output"})
    writer.finish()
    if writer_kind == "process":
        checking = {timing[1] - timing[0]: timing[2] for timing in traced}
        assert len(traced) == 2 and sorted(checking.values())[0] == 0.0 < sorted(checking.values())[1]
    else:
        assert sorted(map(len, handed)) == [0, 2]
    write_file(tmp_path / "oracle", big, {"prompt": "1"}, nonfinite=True)
    assert (tmp_path / "run" / runs.group_file(1, "a")).read_bytes() == (tmp_path / "oracle").read_bytes()
    run = runs.open_run(tmp_path / "run")
    for prompt in (0, 1):
        assert all(torch.equal(run.tensor(name, prompt), t) for name, t in big.items())


def test_threads_only_when_asked(tmp_path, monkeypatch, traced):
    monkeypatch.setenv(writerproc.ENV, "threads")
    assert not writerproc.supported() and writerproc.processes(2) is None
    assert pinned.new_buffer(1 << 16, False).data_ptr() not in shmbuffers._REGIONS
    writer = runs.RunWriter(tmp_path / "run", INTENT, threads=2)
    writer.put(0, "a", {"a:output": torch.ones(4)})
    writer.finish()
    assert traced == []


@pytest.mark.parametrize("value", ["bogus", "thread", "0"])
def test_a_writer_setting_that_is_none_is_one_line(tmp_path, monkeypatch, capsys, value):
    """LAYERWISE_WRITER=bogus silently meant the writer processes; now every command stops with one
    line before any work (test_fastplan: `plan`'s fast answer leaves it to the command)."""
    from layerwise import _boot

    from helpers import assert_one_line_error, run_cli

    monkeypatch.setenv(writerproc.ENV, value)
    code, out, err = run_cli(capsys, "extract", "builtin:minimax-m2-tiny", "--out", tmp_path / "r", "--prompt", "hi")
    assert_one_line_error(code, err, f"LAYERWISE_WRITER={value!r} is not a writer: set it to threads")
    assert out == "" and not (tmp_path / "r").exists()
    assert [_boot.writer_mode(env) for env in ({writerproc.ENV: "threads"}, {writerproc.ENV: "process"},
                                               {writerproc.ENV: " "}, {})] == ["threads", "process", "process", "process"]


def test_a_relative_run_path_is_this_process_s_not_the_writer_process_s(tmp_path, monkeypatch, traced):
    """The writer's process keeps the working directory it started in."""
    writerproc.processes(2)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    writer = runs.RunWriter("run", INTENT, threads=2)
    writer.put(0, "a", {"a:output": torch.ones(4)})
    writer.finish()
    assert len(traced) == 1 and torch.equal(runs.open_run(tmp_path / "elsewhere" / "run").tensor("a:output"), torch.ones(4))


def test_the_process_answers_and_takes_another_thread_count(tmp_path, traced):
    """The program's writer processes are kept: another count of threads asked for resizes them
    (a run writer still writing through them keeps them)."""
    [proc] = writerproc.processes(3)
    assert proc.ready(timeout=30) and proc.threads == 3
    first = runs.RunWriter(tmp_path / "first", INTENT, threads=3)
    first.put(0, "a", {"a:output": torch.ones(4)})
    assert writerproc.processes(2) == [proc] and proc.threads == 2 and proc.ready(timeout=30)
    first.put(1, "a", {"a:output": torch.zeros(4)})
    first.finish()
    assert len(traced) == 2 and torch.equal(runs.open_run(tmp_path / "first").tensor("a:output", 1), torch.zeros(4))


def test_the_channel_carries_messages_small_and_large_with_their_fds_in_order():
    """Length-prefixed pickles over a socket: a message larger than one receive (a file's tensors
    sent inline) arrives whole among small ones, and each fd is taken in the order it was sent."""
    import socket

    from layerwise.writerchild import _RECEIVE, Channel

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sender, receiver = Channel(ours), Channel(theirs)
    big = bytes(range(256)) * (3 * _RECEIVE // 256 + 7)  # three receives and a bit
    messages = [("ok", 1), ("job", 2, big), ("ok", 3), ("job", 4, big[::-1]), ("pong", 5)]
    reads, writes = zip(*(os.pipe() for _ in range(2)))
    got = []

    def send():
        for i, message in enumerate(messages):
            sender.send(message, (reads[i // 2],) if i in (0, 2) else ())
        ours.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=send)
    thread.start()
    while (message := receiver.receive()) is not None:
        got.append(message)
    thread.join()
    assert got == messages
    fds = [receiver.take_fd(), receiver.take_fd()]
    for fd, w, text in zip(fds, writes, (b"first", b"second")):
        os.write(w, text)
        assert os.read(fd, 16) == text  # the first fd sent is the first taken
    for fd in [*fds, *reads, *writes]:
        os.close(fd)
    ours.close()
    theirs.close()


def _nice_of_each_thread(pid: int) -> dict[str, int]:
    """Each thread's niceness (field 19 of /proc/PID/task/TID/stat), by its thread id."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rpartition(")")[2].split()
        except OSError:  # the thread ended meanwhile
            continue
        found[task.name] = int(fields[16])
    return found


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="no /proc here")
def test_the_writer_process_and_its_threads_yield_to_the_forward_pass(tmp_path, traced):
    """The writer's process runs below the parent's priority, its writer and hash threads too
    (they start after it lowered it): when every core is busy, the parent's forward thread,
    which launches the kernels, is not kept waiting behind writes."""
    from layerwise import writerchild

    [proc] = writerproc.processes(3)
    writer = runs.RunWriter(tmp_path / "run", INTENT, threads=3)
    shared = [in_shared(torch.full((4096, 64), float(i))) for i in range(6)]
    for prompt, t in enumerate(shared):
        writer.put(prompt, "a", {"a:output": t})
    writer.wait()  # the pool's threads exist now: they wrote these files
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    threads = _nice_of_each_thread(proc.proc.pid)
    writer.finish()
    assert len(traced) == 6 and len(threads) >= 2, threads
    assert set(threads.values()) == {min(19, ours + writerchild.NICE)}, threads
    assert os.getpriority(os.PRIO_PROCESS, 0) == ours, "this process's own priority is unchanged"


def test_threads_are_spread_over_processes_and_files_over_them(tmp_path, traced):
    """At most PROCESS_THREADS threads a process (one GIL each); a run's files go to the process
    with the fewest outstanding, and come out as this process's writer would write them."""
    procs = writerproc.processes(7)
    assert [p.threads for p in procs] == [3, 2, 2] and len({p.proc.pid for p in procs}) == 3
    assert all(p.ready(timeout=30) for p in procs) and writerproc.processes(4)[:1] == procs[:1]
    assert [p.threads for p in procs] == [2, 2, 2]  # 4 threads: two processes of 2; the third kept, idle
    writer = runs.RunWriter(tmp_path / "run", INTENT, threads=6)  # two processes of 3
    expect, shared = {}, []  # the shared buffers are kept until written, as the capture keeps them
    for prompt in range(12):
        shared.append(in_shared(torch.full((64, 8), float(prompt))))
        expect[prompt] = shared[-1].clone()
        writer.put(prompt, "a", {"a:output": shared[-1]})
    writer.finish()
    assert len({thread.split("/")[0] for *_, thread in traced}) == 2, "each process wrote some of the files"
    run = runs.open_run(tmp_path / "run")
    assert all(torch.equal(run.tensor("a:output", p), expect[p]) for p in expect)


def test_a_writer_process_killed_under_extract_is_one_line_and_exit_1(tmp_path, capsys, monkeypatch, tiny_minimax):
    """The writer's process killed (the OOM killer, say) while a command runs: one line naming it
    and how to go on, exit 1, no traceback, no manifest; the same command then resumes."""
    from helpers import run_cli

    real = writerproc.WriterProcess.submit

    def killed_first(self, *args, **kwargs):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(writerproc.WriterProcess, "submit", killed_first)
    argv = ["extract", "builtin:minimax-m2-tiny", "--out", tmp_path / "run", "--prompt", "hello there", "--dtype", "fp32"]
    code, _, err = run_cli(capsys, *argv)
    lines = [line for line in err.strip().splitlines() if line]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert "the run writer's process ended (exit code -9" in lines[0] and "rerun the same command" in lines[0]
    assert not (tmp_path / "run" / runs.MANIFEST).exists()
    monkeypatch.setattr(writerproc.WriterProcess, "submit", real)
    assert run_cli(capsys, *argv)[0] == 0 and (tmp_path / "run" / runs.MANIFEST).exists()


def test_a_writer_process_that_cannot_start_leaves_the_others_writing(tmp_path, monkeypatch, caplog, traced):
    """Processes that fail to start (out of processes, say) are warned of; the files go to those
    that did start, or to this process's threads when none did."""
    for proc in list(writerproc._PROCESSES):  # a fresh start: none kept from earlier tests
        proc.stop()
    monkeypatch.setattr(writerproc, "_PROCESSES", [])
    real, started = writerproc.WriterProcess, []

    def first_only(threads):
        if started:
            raise OSError(11, "Resource temporarily unavailable")
        started.append(real(threads))
        return started[-1]

    monkeypatch.setattr(writerproc, "WriterProcess", first_only)
    procs = writerproc.processes(6)
    assert procs == started and "fewer write the files" in caplog.text
    writer = runs.RunWriter(tmp_path / "run", INTENT, threads=6)
    shared = [in_shared(torch.full((8,), float(p))) for p in range(3)]
    for p, t in enumerate(shared):
        writer.put(p, "a", {"a:output": t})
    writer.finish()
    assert len(traced) == 3 and torch.equal(runs.open_run(tmp_path / "run").tensor("a:output", 2), torch.full((8,), 2.0))
    started[0].stop()
    monkeypatch.setattr(writerproc, "_PROCESSES", [])
    started.append(None)  # every start fails now
    assert writerproc.processes(2) is None and "this process's threads write the files" in caplog.text


def test_at_exit_every_writer_process_is_asked_to_stop_before_any_is_waited_for(monkeypatch):
    """They end side by side: the program's exit waits for the slowest, not for their sum."""
    procs = [writerproc.WriterProcess(1) for _ in range(3)]
    events = []
    for i, proc in enumerate(procs):
        send, wait = proc.channel.send, proc.proc.wait
        monkeypatch.setattr(proc.channel, "send", lambda msg, i=i, send=send: events.append(("ask", i)) or send(msg))
        monkeypatch.setattr(proc.proc, "wait", lambda timeout=None, i=i, wait=wait: events.append(("wait", i)) or
                            wait(timeout))
    monkeypatch.setattr(writerproc, "_PROCESSES", procs)
    writerproc._stop_at_exit()
    asked = [i for what, i in events if what == "ask"]
    first_wait = next(n for n, (what, _) in enumerate(events) if what == "wait")
    assert asked == [0, 1, 2] and events[:3] == [("ask", i) for i in range(3)] and first_wait == 3, events
    assert all(proc.proc.poll() == 0 for proc in procs)


def test_a_finished_callback_that_raises_neither_stops_the_replies_nor_passes_in_silence(tmp_path, traced):
    """A bug in a `finished` callback is raised by `Handoff.wait`, after every file's reply was
    taken in (the reply thread goes on: no hang)."""
    handoff = writerproc.Handoff(writerproc.processes(1), 4)
    seen = []

    def finished(header, err, indexed):
        seen.append(header)
        if len(seen) == 1:
            raise KeyError("a bug")
    for i in range(3):
        assert handoff.put(str(tmp_path / f"{i}.safetensors"), {}, {"a:output": in_shared(torch.ones(8) * i)}, finished)
    waiting = threading.Thread(target=lambda: seen.append(pytest.raises(KeyError, handoff.wait)), daemon=True)
    waiting.start()
    waiting.join(timeout=30)
    assert not waiting.is_alive() and len(seen) == 4, "the replies after the failing callback were not taken in"


def test_a_batch_of_files_goes_in_one_message_to_each_process_and_comes_back_in_one(tmp_path, monkeypatch):
    """`put_many` (a flush's files): one "jobs" message to each writer process it uses and one
    "replies" message back from each, against one each way per file with `put`; the same bytes
    written either way, every file's `finished` called once, with its entries."""
    from layerwise import writerchild

    sent, received = [], []
    send, receive = writerchild.Channel.send, writerchild.Channel.receive
    monkeypatch.setattr(writerchild.Channel, "send", lambda self, message, fds=(): (
        sent.append(message[0]), send(self, message, fds))[1])
    monkeypatch.setattr(writerchild.Channel, "receive", lambda self: (
        lambda m: (received.append(m[0]) if m is not None else None, m)[1])(receive(self)))
    procs = [writerproc.WriterProcess(2), writerproc.WriterProcess(2)]  # fresh: their channels count
    try:
        assert all(p.ready(timeout=30) for p in procs)
        g = torch.Generator().manual_seed(5)
        shared = [in_shared(torch.randn(64, 8, generator=g)) for _ in range(10)]
        for way in ("many", "one"):
            (tmp_path / way).mkdir()
            sent.clear(), received.clear()
            done: list = []
            files = [(str(tmp_path / way / f"{p}.safetensors"), {"prompt": str(p)},
                      {"a:output": shared[p], "a:ids": torch.arange(p + 1)},
                      lambda header, err, indexed, p=p: done.append((p, err, indexed is not None)), frozenset(),
                      runs.group_file(p, "a")) for p in range(10)]
            handoff = writerproc.Handoff(procs, 32)
            if way == "many":
                assert handoff.put_many(files) == [True] * 10
            else:
                assert all(handoff.put(*f) for f in files)
            handoff.wait()
            assert sorted(done) == [(p, None, True) for p in range(10)]
            jobs, replies = (2, 2) if way == "many" else (10, 10)
            assert sent.count("jobs") == jobs and received.count("replies") == replies, (way, sent, received)
        for p in range(10):
            assert (tmp_path / "many" / f"{p}.safetensors").read_bytes() == \
                (tmp_path / "one" / f"{p}.safetensors").read_bytes()
            assert torch.equal(tensorfile.read_tensor(tmp_path / "many" / f"{p}.safetensors", "a:output"), shared[p])
    finally:
        for proc in procs:
            proc.stop()


def test_a_run_writer_s_batch_sends_what_the_processes_cannot_read_to_its_threads(tmp_path, traced):
    """`RunWriter.put_many`: the files in shared memory go to the writer processes, one holding a
    big tensor outside it to this process's threads, in the same batch; the run holds them all."""
    g = torch.Generator().manual_seed(6)
    shared = [in_shared(torch.randn(64, 8, generator=g)) for _ in range(6)]
    big = torch.randn(shmbuffers.INLINE_BYTES // 4 + 1, generator=g)
    written: list = []
    files = [(p, "a", {"a:output": shared[p]}, lambda p=p: written.append(p), frozenset()) for p in range(6)]
    files.insert(3, (6, "a", {"a:output": big}, lambda: written.append(6), frozenset()))
    writer = runs.RunWriter(tmp_path / "run", INTENT, threads=4)
    writer.put_many(files)
    writer.finish()
    assert sorted(written) == list(range(7)) and len(traced) == 6  # the big one written here
    run = runs.open_run(tmp_path / "run")
    assert all(torch.equal(run.tensor("a:output", p), shared[p]) for p in range(6))
    assert torch.equal(run.tensor("a:output", 6), big)


def test_a_batch_larger_than_the_slots_hands_over_what_it_holds_before_it_waits(tmp_path, traced):
    """With fewer slots than the batch has files, `put_many` sends the files it holds before it
    waits for a slot (their replies free the slots): no deadlock, every file written."""
    procs = writerproc.processes(2)
    handoff = writerproc.Handoff(procs, 2)
    shared = [in_shared(torch.full((16, 4), float(p))) for p in range(9)]
    done = []
    (tmp_path / "d").mkdir()
    handed = in_thread(lambda: handoff.put_many([
        (str(tmp_path / "d" / f"{p}.safetensors"), {"prompt": str(p)}, {"x:output": t},
         lambda header, err, indexed, p=p: done.append((p, err)), frozenset(), None) for p, t in enumerate(shared)]), timeout=30.0)
    handoff.wait()
    assert handed == [True] * 9 and sorted(done) == [(p, None) for p in range(9)]
    for p, t in enumerate(shared):
        assert torch.equal(tensorfile.read_tensor(tmp_path / "d" / f"{p}.safetensors", "x:output"), t)
