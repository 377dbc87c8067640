"""The run writer's own processes, which read the captured tensors from shared host memory.

Every byte an extract writes is checked for NaN/Inf, hashed and written. On the writer's threads
in this process, that work takes turns of the GIL from the forward pass, which launches its
kernels from Python: 16 prompts x 256 tokens of 8 MiniMax-M2 layers took 3.0-3.4x the forward pass
end to end written from 8 threads here, 1.8-2.4x from a process of its own (one H200; BENCHMARKS.md).
So the capture's host buffers are shared memory (`shmbuffers`), and processes of their own
(`writerchild.py`, no torch) read them there and make the files' manifest entries: a file costs
this process a small message out and one back, and a batch of files (`Handoff.put_many`: a
flush's) one message out to each process and one back. A process's threads share its GIL too, so
the threads are spread over processes of at most PROCESS_THREADS each, and each file goes to the
one with the fewest outstanding. `processes()` are the program's writer processes, started on
first use. LAYERWISE_WRITER=threads turns all of it off (the writer's threads in this process do
everything, as on platforms without memfd or fd passing).
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from . import tensorfile
from ._boot import WRITER_ENV, cores_per_process, writer_mode
from .errors import LostProcess
from .shmbuffers import sources
from .writerchild import Channel

log = logging.getLogger(__name__)

ENV = WRITER_ENV  # "threads": no writer process, no shared buffers (_boot.writer_mode reads it)
_HERE = str(Path(__file__).resolve().parent)
TRACE = None  # a benchmark's callable(start, end, nonfinite seconds, digest seconds, thread) per file written there


def writer_threads() -> int:
    """The default thread count of a run writer's threads in this process (where files are not
    the writer processes' to write): half the cores this process may use (`cores_per_process`:
    torchrun's ranks on a machine share its cores), 2 to 8; more take turns of one GIL (16 did
    worse than 8 on the H200 hosts, BENCHMARKS.md)."""
    return max(2, min(8, cores_per_process() // 2))


PROCESS_THREADS = 3  # the most threads one writer process runs: more wait for its GIL


def process_threads() -> int:
    """The default thread count over the writer processes: a thread per core this process may
    use, 2 to 16, in processes of at most PROCESS_THREADS (they share its GIL: 128 files of 3.4 MB
    took 83 ms from 1 process x 8 threads, 106 ms from 1 x 16, 42 ms from 4 x 3 on an H200's
    16-core host, where 16 threads beat 12 end to end in 8 comparisons of 8: BENCHMARKS.md)."""
    return max(2, min(16, cores_per_process()))


def supported() -> bool:
    """Whether a writer process may write files from shared buffers (Linux), unless LAYERWISE_WRITER=threads."""
    return (writer_mode() == "process" and sys.platform.startswith("linux")
            and hasattr(os, "memfd_create") and hasattr(socket, "send_fds"))


# ---------------------------------------------------------------------------------- the process

class WriterProcess:
    """A `writerchild` process and the thread reading its replies. `submit` hands it a file."""

    def __init__(self, threads: int):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._stderr = tempfile.TemporaryFile()
        boot = ("import sys; sys.path[:1] = []; sys.path.append(sys.argv[1]); import writerchild; "
                "writerchild.main(int(sys.argv[2]), int(sys.argv[3]))")
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", boot, _HERE, str(theirs.fileno()), str(threads)],
                                         pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=self._stderr)
        finally:
            theirs.close()
        self.channel = Channel(ours)
        self.threads = threads
        self.failed: BaseException | None = None
        self._stop_asked = False
        self._mapped: set[int] = set()
        self._jobs: dict[int, object] = {}
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="layerwise-writer-replies", daemon=True)
        self._reader.start()

    def submit(self, jobs: list[tuple]) -> None:
        """Have the process write each job's `specs` (from `sources`) as the file `target`
        (through `tmp`), in one message; a job is (target, tmp, metadata, digest, specs, done,
        finite, index). `done(reply)` runs on the reply thread with ("ok", seq, header, metadata,
        timing, indexed), ("err", seq, errno, message, filename), or ("lost", seq, LostProcess) if
        the process ends; `indexed`: with `index` (the file's path in its run), filebits.indexed's,
        else None. The replies come back in one message too, once every job of it is done."""
        with self._lock:  # a region's map message goes before the first job that reads it
            if self.failed is not None:
                raise self.failed
            seqs, message = [], []
            for target, tmp, metadata, digest, specs, done, finite, index in jobs:
                seq = next(self._seq)
                self._jobs[seq] = done
                seqs.append(seq)
                message.append((seq, target, tmp, metadata, digest, True, [spec[:5] for spec in specs],
                                tuple(finite), index))
            try:
                for *_, specs, _, _, _ in jobs:
                    for *_, region in specs:
                        if region is not None and region.id not in self._mapped:
                            self.channel.send(("map", region.id, region.size), (region.fd,))
                            self._mapped.add(region.id)
                self.channel.send(("jobs", message))
            except OSError as err:
                for seq in seqs:
                    self._jobs.pop(seq, None)
                raise self._died(err) from None

    def ready(self, timeout: float = 60.0) -> bool:
        """Wait until the process answers (it has imported what it needs): whether it did."""
        answered = threading.Event()
        with self._lock:
            if self.failed is not None:
                return False
            seq = next(self._seq)
            self._jobs[seq] = lambda reply: answered.set()
            try:
                self.channel.send(("ping", seq))
            except OSError as err:
                self._jobs.pop(seq, None)
                self._died(err)
                return False
        return answered.wait(timeout) and self.failed is None

    def resize(self, threads: int) -> None:
        """Write on `threads` threads from now on (the files handed over before are written on the
        threads they were handed to)."""
        with self._lock:
            if self.failed is None and threads != self.threads:
                try:
                    self.channel.send(("threads", threads))
                    self.threads = threads
                except OSError as err:
                    self._died(err)

    def _read(self) -> None:
        try:
            while True:
                message = self.channel.receive()
                if message is None:
                    break
                replies = message[1] if message[0] == "replies" else (message,)  # a job message's, or a pong
                with self._lock:
                    dones = [self._jobs.pop(reply[1], None) for reply in replies]
                for reply, done in zip(replies, dones):
                    if reply[0] == "ok" and TRACE is not None:
                        TRACE(*reply[4])
                    if done is not None:
                        done(reply)
        except OSError:
            pass
        with self._lock:
            error = self._died(None)
            jobs, self._jobs = self._jobs, {}
        for seq, done in jobs.items():
            done(("lost", seq, error))

    def _died(self, err) -> BaseException:
        if self.failed is None:
            try:  # its socket closes as it exits
                code = self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                code = None
            self._stderr.seek(0)
            last = (self._stderr.read().decode(errors="replace").strip().splitlines() or [""])[-1]
            self.failed = LostProcess(f"the run writer's process ended (exit code {code}"
                                      + (f": {last}" if last else "") + (f"; {err}" if err else "")
                                      + "): the run is left incomplete, rerun the same command to resume")
        return self.failed

    def stop(self, wait: bool = True) -> None:
        """Let it write what it was handed, then end it (`wait=False`: only ask; stop() waits)."""
        if not self._stop_asked:
            self._stop_asked = True
            try:
                self.channel.send(("stop",))
            except OSError:
                pass
        if not wait:
            return
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._reader.join(timeout=5)
        self.channel.sock.close()


class Handoff:
    """One run writer's files in the writer processes, each to the one with the fewest of its
    files outstanding: at most `depth` outstanding in all (`put` blocks: backpressure), `wait`
    until all are written."""

    def __init__(self, procs: list[WriterProcess], depth: int):
        self.procs, self._slots = procs, threading.Semaphore(depth)
        self._idle = threading.Condition()
        self._pending = 0
        self._load = [0] * len(procs)  # files outstanding in each process
        self._broken: BaseException | None = None  # a `finished` that raised (a bug): `wait` raises it

    def put(self, target: str, metadata: dict, tensors: dict[str, torch.Tensor], finished, finite=frozenset(),
            index: str | None = None) -> bool:
        """Hand the file `target` (an absolute path) over unless its tensors are not the process's
        to write (False): then `finished(header, None, indexed)` runs once it is written (its
        header, with "__metadata__"; `indexed`: see `WriterProcess.submit`), or `finished(None,
        error, None)` (an OSError for the system's errors)."""
        return self.put_many([(target, metadata, tensors, finished, finite, index)])[0]

    def put_many(self, files: list[tuple]) -> list[bool]:
        """`put` of each (target, metadata, tensors, finished, finite, index), in one message to
        each process they go to (a flush's files: fewer messages each way). Whether each was
        handed over."""
        handed = [False] * len(files)
        batches: dict[int, list] = {}
        for k, (target, metadata, tensors, finished, finite, index) in enumerate(files):
            specs = sources(tensors)
            if specs is None:
                continue
            if not self._slots.acquire(blocking=False):  # the files held here go first: their replies free slots
                self._submit(batches)
                self._slots.acquire()
            with self._idle:
                self._pending += 1
                at = self._load.index(min(self._load))
                self._load[at] += 1
            folder, _, name = target.rpartition("/")
            batches.setdefault(at, []).append((target, f"{folder}/.{name}.{os.getpid()}.tmp", metadata,
                                               (tensorfile.DIGEST, tensorfile.HASH_CHUNK), specs,
                                               self._done(at, finished), finite, index))
            handed[k] = True
        self._submit(batches)
        return handed

    def _submit(self, batches: dict[int, list]) -> None:
        for at, jobs in batches.items():
            try:
                self.procs[at].submit(jobs)
            except BaseException as err:  # the process is gone (LostProcess): these files fail with it
                for job in jobs:
                    job[5](("lost", None, err))
        batches.clear()

    def _done(self, at: int, finished):
        def done(reply):
            try:
                if reply[0] == "ok":
                    finished({**reply[2], "__metadata__": reply[3]}, None, reply[5])
                elif reply[0] == "lost":
                    finished(None, reply[2], None)
                else:
                    finished(None, OSError(reply[2], reply[3], reply[4]) if reply[2] is not None else
                             RuntimeError(f"the run writer's process failed: {reply[3]}"), None)
            except BaseException as err:  # not on the reply thread, which the other files' replies need
                self._broken = self._broken or err
            finally:
                self._slots.release()
                with self._idle:
                    self._pending -= 1
                    self._load[at] -= 1
                    self._idle.notify_all()
        return done

    def wait(self) -> None:
        """Block until every file handed over is written; raises what a `finished` raised."""
        with self._idle:
            while self._pending:
                self._idle.wait()
        if self._broken is not None:
            raise self._broken


_PROCESSES: list[WriterProcess] = []  # this program's writer processes (a later call resizes them)
_PROCESS_LOCK = threading.Lock()


def processes(threads: int | None = None) -> list[WriterProcess] | None:
    """This program's writer processes, `threads` threads over them (None: `process_threads()`;
    at most PROCESS_THREADS each), started on first use and again after one ended, or None where
    none can run (`supported`, or none started: this process's threads write). Processes beyond
    the count asked for are kept, idle, for a later call (a run writer may still be writing
    through them)."""
    if not supported():
        return None
    threads = threads or process_threads()
    count = -(-max(1, threads) // PROCESS_THREADS)
    shares = [threads // count + (i < threads % count) for i in range(count)]
    with _PROCESS_LOCK:
        _PROCESSES[:] = [p for p in _PROCESSES if p.failed is None and p.proc.poll() is None]
        for proc, share in zip(_PROCESSES, shares):
            proc.resize(share)
        for share in shares[len(_PROCESSES):]:
            try:
                _PROCESSES.append(WriterProcess(share))
            except OSError as err:
                log.warning("a run writer's process cannot start (%s): %s", err,
                            "fewer write the files" if _PROCESSES else "this process's threads write the files")
                break
        return _PROCESSES[:count] or None


def _stop_at_exit() -> None:
    for proc in _PROCESSES:  # every one asked first: they end side by side
        proc.stop(wait=False)
    for proc in _PROCESSES:
        proc.stop()


def _forget_in_child() -> None:
    """In a forked child: the parent's writer processes, sockets and reply threads are not its own."""
    global _PROCESSES, _PROCESS_LOCK
    _PROCESSES, _PROCESS_LOCK = [], threading.Lock()


atexit.register(_stop_at_exit)
os.register_at_fork(after_in_child=_forget_in_child)
