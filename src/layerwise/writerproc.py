"""The run writer's own processes, and the shared host memory they read the captured tensors from.

Every byte an extract writes is checked for NaN/Inf, hashed and written. On the writer's threads
in this process, that work takes turns of the GIL from the forward pass, which launches its
kernels from Python: 16 prompts x 256 tokens of 8 MiniMax-M2 layers took 3.0-3.4x the forward pass
end to end written from 8 threads here, 1.8-2.4x from a process of its own (one H200; BENCHMARKS.md).
So the capture's host buffers are shared memory (a memfd, mapped here and, registered with CUDA,
the target of the device-to-host copies), and processes of their own (`writerchild.py`, no torch)
read them there and make the files' manifest entries: a file costs this process one small message
out and one back. A process's threads share its GIL too, so the threads are spread over processes
of at most PROCESS_THREADS each, and each file goes to the one with the fewest outstanding.

`shared_buffer` makes such buffers (a process-wide cache, like torch's pinned-memory cache: a
buffer whose tensor is gone is reused, never unmapped); `sources` says where a file's tensors lie
(in a shared buffer, or small enough to send); `processes()` are the program's writer processes,
started on first use. LAYERWISE_WRITER=threads turns all of it off (the writer's threads in this
process do everything, as on platforms without memfd or fd passing).
"""

from __future__ import annotations

import atexit
import bisect
import ctypes
import itertools
import logging
import mmap
import os
import socket
import subprocess
import sys
import tempfile
import threading
import weakref
from pathlib import Path

import torch

from . import tensorfile
from ._boot import cores_per_process
from .errors import LostProcess
from .rawbytes import raw_bytes
from .writerchild import Channel

log = logging.getLogger(__name__)

ENV = "LAYERWISE_WRITER"  # "threads": no writer process, no shared buffers
INLINE_BYTES = 1 << 20  # a tensor outside shared memory up to this size is sent with its file's message
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
    return (os.environ.get(ENV, "process") != "threads" and sys.platform.startswith("linux")
            and hasattr(os, "memfd_create") and hasattr(socket, "send_fds"))


# ---------------------------------------------------------------------------------- shared buffers

class _Region:
    __slots__ = ("id", "fd", "size", "memory", "base", "pinned")


_REGIONS: dict[int, _Region] = {}  # base address -> region (every region made: none is unmapped)
_BASES: list[int] = []  # sorted
_CACHE: dict[tuple[int, bool], list[_Region]] = {}  # (size, pinned) -> regions whose tensor is gone
_LOCK = threading.Lock()
_IDS = itertools.count()


def _new_region(nbytes: int, pin: bool) -> _Region:
    fd = os.memfd_create("layerwise-host-buffer", os.MFD_CLOEXEC)
    memory = None
    try:
        os.ftruncate(fd, nbytes)
        memory = mmap.mmap(fd, nbytes)
        base = ctypes.addressof(ctypes.c_char.from_buffer(memory))
        if pin:  # page-locked for the copy engines, as torch's pin_memory (about a second per GB)
            torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(base, nbytes, 1))  # 1: portable (every GPU)
    except BaseException:
        if memory is not None:
            memory.close()
        os.close(fd)
        raise
    region = _Region()
    region.id, region.fd, region.size, region.memory, region.pinned, region.base = \
        next(_IDS), fd, nbytes, memory, pin, base
    with _LOCK:
        _REGIONS[region.base] = region
        bisect.insort(_BASES, region.base)
    return region


def shared_buffer(nbytes: int, pin: bool) -> torch.Tensor | None:
    """A uint8 CPU tensor of `nbytes` in shared memory (page-locked and registered with CUDA when
    `pin`), the writer process's to read; None where that cannot be made (the caller allocates
    as before)."""
    with _LOCK:
        cached = _CACHE.get((nbytes, pin))
        region = cached.pop() if cached else None
    if region is None:
        try:
            region = _new_region(nbytes, pin)
        except (OSError, RuntimeError) as err:
            log.debug("no shared host buffer of %d bytes (%s): the writer's threads write its files", nbytes, err)
            return None
    memory = memoryview(region.memory)  # the tensor's storage holds it until the last view is gone
    with torch.inference_mode(False):  # a normal tensor: reused later outside inference mode too
        tensor = torch.frombuffer(memory, dtype=torch.uint8)
    weakref.finalize(memory, _came_back, region)  # then, and not before, the region may be handed out again
    return tensor


def _came_back(region: _Region) -> None:
    with _LOCK:
        _CACHE.setdefault((region.size, region.pinned), []).append(region)


def _region_of(tensor: torch.Tensor, nbytes: int) -> tuple[_Region, int] | None:
    ptr = tensor.data_ptr()
    with _LOCK:
        at = bisect.bisect_right(_BASES, ptr) - 1
        region = _REGIONS[_BASES[at]] if at >= 0 else None
    if region is None or ptr + nbytes > region.base + region.size:
        return None
    return region, ptr - region.base


def sources(tensors: dict[str, torch.Tensor]) -> list[tuple] | None:
    """Where the writer process finds a file's tensors: (name, dtype code, shape, bytes, source,
    region or None) each, the source ("r", region id, offset) in a shared buffer or ("b", bytes);
    None when a tensor is neither there nor small (this process writes that file)."""
    specs = []
    for name, t in tensors.items():
        code = tensorfile.DTYPE_CODES.get(t.dtype)
        if code is None or t.device.type != "cpu":  # this process says why it cannot write it
            return None
        nbytes = t.numel() * t.element_size()
        found = _region_of(t, nbytes) if _BASES and nbytes and t.is_contiguous() else None
        if found is not None:
            specs.append((name, code, tuple(t.shape), nbytes, ("r", found[0].id, found[1]), found[0]))
        elif nbytes <= INLINE_BYTES:
            specs.append((name, code, tuple(t.shape), nbytes, ("b", bytes(raw_bytes(t))), None))
        else:
            return None
    return specs


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

    def submit(self, target: str, tmp: str, metadata: dict, digest: tuple[str, int], specs: list[tuple],
               done, finite=frozenset(), index: str | None = None) -> None:
        """Have the process write `specs` (from `sources`) as the file `target` (through `tmp`);
        `done(reply)` runs on the reply thread with ("ok", seq, header, metadata, timing, indexed),
        ("err", seq, errno, message, filename), or ("lost", seq, LostProcess) if the process ends;
        `indexed`: with `index` (the file's path in its run), filebits.indexed's, else None."""
        with self._lock:  # a region's map message goes before the first job that reads it
            if self.failed is not None:
                raise self.failed
            seq = next(self._seq)
            self._jobs[seq] = done
            try:
                for *_, region in specs:
                    if region is not None and region.id not in self._mapped:
                        self.channel.send(("map", region.id, region.size), (region.fd,))
                        self._mapped.add(region.id)
                self.channel.send(("job", seq, target, tmp, metadata, digest, True,
                                   [spec[:5] for spec in specs], tuple(finite), index))
            except OSError as err:
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
                reply = self.channel.receive()
                if reply is None:
                    break
                with self._lock:
                    done = self._jobs.pop(reply[1], None)
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
        specs = sources(tensors)
        if specs is None:
            return False
        self._slots.acquire()
        with self._idle:
            self._pending += 1
            at = self._load.index(min(self._load))
            self._load[at] += 1

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
        folder, _, name = target.rpartition("/")
        try:
            self.procs[at].submit(target, f"{folder}/.{name}.{os.getpid()}.tmp",
                                  metadata, (tensorfile.DIGEST, tensorfile.HASH_CHUNK), specs, done, finite, index)
        except BaseException as err:  # the process is gone (LostProcess): this file fails with it
            done(("lost", None, err))
        return True

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
    global _PROCESSES, _PROCESS_LOCK, _LOCK
    _PROCESSES, _PROCESS_LOCK, _LOCK = [], threading.Lock(), threading.Lock()


atexit.register(_stop_at_exit)
os.register_at_fork(after_in_child=_forget_in_child)
