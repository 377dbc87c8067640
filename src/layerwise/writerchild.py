"""The run writer's own process: checks, hashes and writes the files `writerproc` hands it.

Started by `writerproc.WriterProcess` as `python -c` with this directory on its path (it imports
`filebits` alone: no torch, no layerwise package), it reads the tensors' bytes where the capture's
device-to-host copies put them (shared memory the parent sends as file descriptors), so the work
of every byte written (NaN/Inf check, digest, write) takes no turn of the parent's GIL, which its
forward pass needs to launch kernels. One socket carries both ways length-prefixed pickles
between the two processes of one program:

    parent -> child  ("map", region, size) + its fd | ("threads", n) | ("ping", seq) | ("stop",)
                     ("jobs", [job, ...]), a job: (seq, target, tmp, metadata, (digest, chunk),
                      nonfinite, [(name, code, shape, nbytes, source)], names known finite, index)
                     source: ("r", region, offset) or ("b", bytes); index: the file's path in its
                     run, whose manifest entries and their texts come back, or None
    child -> parent  ("replies", [reply, ...]): one message for a "jobs" message, once every one
                      of its jobs is done, a reply each, in the order they were done:
                      ("ok", seq, header, metadata, timing, (entries, texts) or None)
                      | ("err", seq, errno or None, message, filename)
                     | ("pong", seq)

A job writes `tmp` and renames it to `target`: a killed writer leaves no partial file under a
final name. The process ignores Ctrl-C (the parent decides), runs NICE steps below the parent's
priority (its work yields to the forward pass's threads) and ends when the socket closes.
"""

from __future__ import annotations

import mmap
import os
import pickle
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

try:
    from . import filebits  # imported by writerproc, in the parent
except ImportError:  # run as the writer process (this directory on the path, not the package): main imports it
    filebits = None

_LENGTH = 4
_RECEIVE = 1 << 16  # bytes asked of a receive (a buffer that size is allocated for each): a reply takes a few
# hundred, and the parent's thread reading them holds the GIL while it allocates
NICE = 10  # added to the parent's niceness: when every core is busy, the forward pass's threads run first


class Channel:
    """Length-prefixed pickles over a stream socket, with file descriptors attached to some."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._buffer = bytearray()
        self._fds: list[int] = []
        self._send = threading.Lock()

    def send(self, message, fds: tuple[int, ...] = ()) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        frame = len(data).to_bytes(_LENGTH, "little") + data
        with self._send:
            if fds:
                sent = socket.send_fds(self.sock, [frame], list(fds))
                frame = frame[sent:]
            if frame:
                self.sock.sendall(frame)

    def receive(self):
        """The next message; None once the socket closed. The fds sent with messages are taken in
        the order they were sent (`take_fd`): one arrives with its message's bytes, or before."""
        while True:
            if len(self._buffer) >= _LENGTH:
                size = int.from_bytes(self._buffer[:_LENGTH], "little")
                if len(self._buffer) >= _LENGTH + size:
                    message = pickle.loads(self._buffer[_LENGTH:_LENGTH + size])
                    del self._buffer[:_LENGTH + size]
                    return message
                want = _LENGTH + size - len(self._buffer)  # the rest of this message at once
            else:
                want = _RECEIVE
            data, fds, _, _ = socket.recv_fds(self.sock, max(want, _RECEIVE), 16)
            self._fds += fds
            if not data:
                return None
            self._buffer += data

    def take_fd(self) -> int:
        return self._fds.pop(0)


class Child:
    def __init__(self, channel: Channel, threads: int):
        self.channel = channel
        self.regions: dict[int, mmap.mmap] = {}
        self.jobs = ThreadPoolExecutor(threads, thread_name_prefix="writer")
        self.pools: list[ThreadPoolExecutor] = []  # earlier pools (another thread count), finishing their jobs
        self.hashes = ThreadPoolExecutor(min(8, threads), thread_name_prefix="hash")

    def serve(self) -> None:
        while True:
            message = self.channel.receive()
            if message is None:  # the parent is gone: the files being written are finished, no others
                for pool in self.pools + [self.jobs]:
                    pool.shutdown(wait=True, cancel_futures=True)
                break
            if message[0] == "stop":
                break
            kind = message[0]
            if kind == "map":
                fd = self.channel.take_fd()
                self.regions[message[1]] = mmap.mmap(fd, message[2])
                os.close(fd)
            elif kind == "threads":  # jobs handed over before stay on the old pool's threads
                self.pools.append(self.jobs)
                self.jobs = ThreadPoolExecutor(message[1], thread_name_prefix="writer")
                self.pools[-1].shutdown(wait=False)
            elif kind == "jobs":
                gathered = _Gathered(len(message[1]), self.channel)
                for job in message[1]:  # bound now: the next message's gathering is another
                    self.jobs.submit(lambda job=job, gathered=gathered: gathered.add(self.job(*job)))
            elif kind == "ping":
                self.channel.send(("pong", message[1]))
        for pool in self.pools + [self.jobs]:
            pool.shutdown(wait=True)  # the files already handed over are written whole
        self.hashes.shutdown(wait=True)

    def job(self, seq, target, tmp, metadata, digest, check, specs, finite=(), index=None) -> tuple:
        """Write one file; its reply."""
        algorithm, chunk = digest
        start, spent = time.perf_counter(), {}
        try:
            views = [memoryview(self.regions[source[1]])[source[2]:source[2] + nbytes] if source[0] == "r"
                     else memoryview(source[1]) for *_, nbytes, source in specs]
            try:
                header, meta = filebits.write_tensor_file(
                    tmp, metadata, [(name, code, shape, view) for (name, code, shape, *_), view in zip(specs, views)],
                    check, algorithm, self.hashes.map, chunk, spent, finite)
                os.replace(tmp, target)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
            timing = (start, time.perf_counter(), spent.get("nonfinite", 0.0), spent.get("digest", 0.0),
                      f"{os.getpid()}/{threading.current_thread().name}")
            try:  # here, not on the parent's GIL
                entries = filebits.indexed(index, header, meta) if index is not None else None
            except Exception:  # the file is whole: the parent indexes it, and reports what is wrong
                entries = None
            return ("ok", seq, header, meta, timing, entries)
        except OSError as err:
            return ("err", seq, err.errno, err.strerror or str(err), err.filename)
        except BaseException as err:  # reported to the parent, which fails the run with it
            return ("err", seq, None, f"{type(err).__name__}: {err}", None)


class _Gathered:
    """The replies of one "jobs" message, sent back together once the last of its jobs is done."""

    def __init__(self, count: int, channel: Channel):
        self.left, self.replies, self.channel = count, [], channel
        self.lock = threading.Lock()

    def add(self, reply: tuple) -> None:
        with self.lock:
            self.replies.append(reply)
            self.left -= 1
            last = self.left == 0
        if last:
            self.channel.send(("replies", self.replies))


def _yield_to_the_parent() -> None:
    """Run at a lower priority than the parent, before any thread starts (threads inherit it). The
    parent's forward thread launches kernels between short waits: with every core taken by
    writer threads it would wait for a time slice, and the GPU with it; the writes only need the
    cores it leaves idle."""
    try:
        os.nice(NICE)
    except (OSError, AttributeError):  # not permitted, or no nice() on this system: as the parent
        pass


def main(fd: int, threads: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
    _yield_to_the_parent()
    global filebits
    import filebits  # after: the threads its imports start (numpy's) run at the same priority
    channel = Channel(socket.socket(fileno=fd))
    try:
        Child(channel, threads).serve()
    except (BrokenPipeError, ConnectionResetError):  # the parent is gone
        pass
