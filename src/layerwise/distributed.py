"""Many processes started by torchrun, on one node or many: who this rank is, its GPUs, the
process group, and the few collectives layerwise needs, every one of them under a timeout.

torchrun (`python -m torch.distributed.run`, also under Slurm's `srun`) starts one process per
rank and tells it RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK (its node),
MASTER_ADDR and MASTER_PORT; `detect()` reads them (None: one process, nothing to do).
`start(env, options)`:

- gives the rank its GPUs (sharding.rank_gpus): the node's GPUs split evenly between its ranks, or
  `gpus_per_rank` each. The rank then sees only those (CUDA_VISIBLE_DEVICES, set before CUDA
  starts), so plans, `cuda:0` defaults and device maps work unchanged inside one rank. A
  tensor-parallel rank keeps every GPU and binds `cuda:LOCAL_RANK`, as transformers expects.
- initializes torch.distributed: gloo for CPU tensors and every control message, NCCL for GPU
  tensors ("cpu:gloo,cuda:nccl"), with `timeout_s` on every collective and on joining, so a rank
  that dies or hangs makes the others fail after at most that long, never wait forever.
- watches for failures: a rank that fails posts one line in torchrun's store (`report_failure`);
  rank 0 prints it (through the `on_failure` callback: one line, whichever rank failed), the
  others exit quietly. SIGTERM (torchrun stopping the job) raises `RankFailed` in the main thread.

`stop()` leaves the job (its process groups destroyed) and `exit_process(code)` ends a layerwise
process (a rank or not) without the interpreter's teardown, which costs every command time and in
which a surviving group's thread can abort a rank.

`Session` is what the producers see (`session()`: the started one, else a one-rank session on
which every collective is the identity): `share` assigns batches, `broadcast`, `gather`,
`all_gather`, `agree`, `settle`, `main_first` (chain.py carries tensors from rank to rank). Work is split, never re-batched:
a rank computes whole batches (or whole layers) exactly as one process would.
"""

from __future__ import annotations

import atexit
import datetime
import os
import re
import signal
import sys
import threading
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import NoReturn

import torch

from ._boot import is_command
from .errors import UserError
from .sharding import assign, digest, first_difference, rank_gpus

DEFAULT_TIMEOUT_S = 1800.0  # the longest any rank waits for another (joining, every collective)
POLL_S = 0.2  # how often the watchdog looks for failures
GRACE_S = 2.0  # rank 0 waits this long for its own error before reporting another rank's
REPORT_WAIT_S = 10.0  # a failed rank waits at most this long for rank 0 to have reported it
_FAILURES, _REPORTED = "failures", "reported"


class RankFailed(Exception):
    """A rank failed, died or stopped answering: the job cannot finish (exit 1, not a usage error)."""


@dataclass(frozen=True)
class Env:
    """This process's place in a torchrun job."""

    rank: int
    world_size: int
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    nodes: int = 1
    master: str = ""

    def where(self, rank: int | None = None) -> str:
        """`rank 2 (node 1)`: how messages name a rank (its node from the ranks-per-node count)."""
        rank = self.rank if rank is None else rank
        return f"rank {rank}" + (f" (node {rank // self.local_world_size})" if self.nodes > 1 else "")


def detect(environ=None) -> Env | None:
    """torchrun's variables, or None when this is one process (no WORLD_SIZE, or 1)."""
    environ = os.environ if environ is None else environ
    try:
        world = int(environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        rank = int(environ["RANK"])
        local_world = int(environ.get("LOCAL_WORLD_SIZE", world))
        return Env(rank, world, int(environ.get("LOCAL_RANK", rank)), local_world, int(environ.get("GROUP_RANK", 0)),
                   int(environ.get("GROUP_WORLD_SIZE", max(1, world // max(local_world, 1)))),
                   f"{environ.get('MASTER_ADDR', '')}:{environ.get('MASTER_PORT', '')}")
    except (KeyError, ValueError) as err:
        raise UserError(f"torchrun's environment is incomplete or wrong ({err}): launch with torchrun, "
                        "which sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/MASTER_PORT") from None


@dataclass(frozen=True)
class DistOptions:
    timeout_s: float = DEFAULT_TIMEOUT_S  # joining and every collective
    gpus_per_rank: int | None = None  # None: the node's GPUs divided evenly between its ranks
    tensor_parallel: bool = False  # the ranks share one model (one GPU each), not replicas
    keep_gpus: bool = False  # every rank sees every GPU of its node, bound to cuda:LOCAL_RANK (check)


class Session:
    """The ranks of one job, as the producers use them. Without torchrun it is one rank, and every
    collective is the identity. Collectives raise RankFailed when another rank fails or does not
    answer within `timeout_s`."""

    def __init__(self, env: Env | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, store=None,
                 backend: str | None = None, gpus: tuple[int, ...] = ()):
        self.env = env or Env(0, 1)
        self.rank, self.world = self.env.rank, self.env.world_size
        self.timeout_s, self.backend, self.gpus = timeout_s, backend, gpus
        self.on_failure = None  # called with one line on rank 0 when another rank failed
        self._store = store
        self._lock = threading.Lock()
        self._claimed = False
        self._failing, self._stopping = threading.Event(), threading.Event()
        self._watchdog: threading.Thread | None = None
        self._previous_sigterm = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def store(self):
        """torchrun's key-value store, under layerwise's prefix (None on one rank)."""
        return self._store

    # ---------------------------------------------------------------------------- collectives
    @contextmanager
    def guard(self, what: str):
        """torch.distributed's errors inside become RankFailed: one line naming the failed rank, or
        what this rank was doing when another stopped answering."""
        try:
            yield
        except RankFailed:
            raise
        except RuntimeError as err:  # torch.distributed's errors (DistError is a RuntimeError)
            found = self.failure()
            if found is not None:
                raise RankFailed(f"{found[0]} failed: {found[1]}") from None
            first = re.sub(r"^\[[^\]]*\]\s*", "", (str(err).strip().splitlines() or [type(err).__name__])[0])
            raise RankFailed(f"{self.env.where()}, {what}: another rank died, hangs or cannot be reached "
                             f"({first.split('. ')[0][:160]}); ranks wait at most --dist-timeout {self.timeout_s:g} s "
                             "for each other") from None

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        with self.guard("waiting for rank 0"):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        with self.guard("exchanging with every rank"):
            dist.all_gather_object(out, obj)
        return out

    def gather(self, obj) -> list | None:
        """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.is_main else None
        with self.guard("gathering every rank's results"):
            dist.gather_object(obj, out, dst=0)
        return out

    def settle(self, problem: str | None) -> None:
        """A usage problem some ranks found (their GPUs, their arguments) becomes every rank's
        UserError: the first one, named by the rank that found it."""
        for r, found in enumerate(self.all_gather(problem)):
            if found:
                raise UserError(found if r == 0 else f"{self.env.where(r)}: {found}")

    def agree(self, what: str, value) -> None:
        """Every rank must hold the same JSON-like `value`; else a UserError on every rank naming
        the first rank that differs from rank 0, and where."""
        digests = self.all_gather(digest(value))
        odd = next((r for r, d in enumerate(digests) if d != digests[0]), None)
        if odd is None:
            return
        values = self.all_gather(value if self.rank in (0, odd) else None)
        raise UserError(f"ranks disagree on {what}: {self.env.where(odd)} has {first_difference(values[odd], values[0])} "
                        "(rank 0's last): start every rank with the same command, model and files")

    def main_first(self, make):
        """`make(True)` on rank 0, then `make(False)` on the others once it succeeded (a failure
        of rank 0 fails every rank): what rank 0 must prepare alone, such as a run directory."""
        if self.world == 1:
            return make(True)
        if not self.is_main:
            failed = self.broadcast(None)
            if failed:
                raise (UserError if failed[0] == "usage" else RankFailed)(failed[1])
            return make(False)
        try:
            made = make(True)
        except UserError as err:
            self.broadcast(("usage", str(err)))
            raise
        except BaseException as err:
            self.broadcast(("failed", f"rank 0 failed: {type(err).__name__}: {err}"))
            raise
        self.broadcast(None)
        return made

    def share(self, weights: list[float]) -> list[int]:
        """The items (by index) this rank computes, the work balanced by `weights`."""
        return assign(weights, self.world)[self.rank]

    # ---------------------------------------------------------------------------- failures
    def report_failure(self, message: str) -> bool:
        """This rank failed with `message`: tell the others. True when this rank is to print it
        (rank 0, unless it already printed another rank's failure). A rank other than 0 first
        waits (at most REPORT_WAIT_S) for rank 0 to report, so torchrun does not stop rank 0 first."""
        self._failing.set()
        if self._store is None:
            return self.is_main
        try:
            self._store.set(f"failed/{self.rank}", message)
            self._store.add(_FAILURES, 1)
        except Exception:  # the store is gone with its host: the job is ending anyway
            return self.is_main
        if self.is_main:
            claimed = self._claim()
            self._mark_reported()
            return claimed
        self._wait_reported()
        return False

    def failure(self) -> tuple[str, str] | None:
        """The first failure another rank posted: (`rank R`, its line), or None."""
        try:
            if self._store is None or self._store.add(_FAILURES, 0) == 0:
                return None
            for r in range(self.world):
                if r != self.rank and self._store.check([f"failed/{r}"]):
                    return self.env.where(r), self._store.get(f"failed/{r}").decode()
        except Exception:  # the store is gone: nothing more to learn from it
            return None
        return None

    def _claim(self) -> bool:
        with self._lock:
            claimed, self._claimed = not self._claimed, True
            return claimed

    def _mark_reported(self) -> None:
        try:
            self._store.set(_REPORTED, "1")
        except Exception:  # the store is gone: nobody waits for the mark
            pass

    def _wait_reported(self) -> None:
        try:
            self._store.wait([_REPORTED], datetime.timedelta(seconds=REPORT_WAIT_S))
        except Exception:  # rank 0 did not report in time (or is gone): exit anyway
            pass

    def _watch(self) -> None:
        """Another rank's failure ends this one: rank 0 prints it (unless its own error comes
        within GRACE_S), the others wait for that, then the process exits 1."""
        while not self._stopping.wait(POLL_S):
            found = self.failure()
            if found is None:
                continue
            if self._failing.wait(GRACE_S) or self._stopping.is_set():
                return  # this rank reports its own failure, or finished
            if self.is_main:
                if self._claim() and self.on_failure is not None:
                    self.on_failure(f"{found[0]} failed: {found[1]}")
                self._mark_reported()
                self._stopping.wait(1.0)  # the failed rank exits first: torchrun names it as the root cause
            else:
                self._wait_reported()
            os._exit(1)

    def _sigterm(self, signum, frame):
        raise RankFailed("stopped by SIGTERM: torchrun stops every rank when one of them fails (its report follows), "
                         "or the job was cancelled")

    def begin(self) -> None:
        """Start the watchdog; SIGTERM raises RankFailed (from the main thread only)."""
        self._watchdog = threading.Thread(target=self._watch, name="layerwise-watchdog", daemon=True)
        self._watchdog.start()
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._sigterm)

    def close(self) -> None:
        self._stopping.set()
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
        if self._watchdog is not None:
            self._watchdog.join(timeout=GRACE_S + 1)


_SINGLE = Session()
_current: Session | None = None
_joined = False  # this process joined a job's process group (start), at some time


def session() -> Session:
    """The started session, else one rank."""
    return _current or _SINGLE


def start(env: Env, options: DistOptions = DistOptions(), on_failure=None) -> tuple[Session, str | None]:
    """Join the job: this rank's GPUs, the process group, the watchdog. Returns the session and
    this rank's layout problem (a message for `Session.settle`), or None. Call it before CUDA starts."""
    import torch.distributed as dist

    global _current, _joined
    problem, gpus, visible = None, (), torch.cuda.device_count()  # NVML's count: CUDA does not start here
    try:
        gpus = rank_gpus(env.local_rank, env.local_world_size, visible, options.gpus_per_rank,
                         options.tensor_parallel)
    except UserError as err:
        problem = str(err)
    narrow = bool(gpus) and not (options.tensor_parallel or options.keep_gpus)
    if narrow:
        _narrow(gpus)
    cuda = bool(visible) and torch.cuda.is_available() and dist.is_nccl_available()  # CUDA starts here
    if cuda:
        torch.cuda.set_device(0 if narrow else env.local_rank % visible)
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    _import_world_binders()
    try:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=options.timeout_s),
                                rank=env.rank, world_size=env.world_size)
    except (RuntimeError, ValueError) as err:  # the store or a rank did not answer in time, or no address
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise RankFailed(f"{env.where()} could not join the other ranks at {env.master} within --dist-timeout "
                         f"{options.timeout_s:g} s ({first[:200]})") from None
    _joined = True
    store = dist.PrefixStore("layerwise/", dist.distributed_c10d._get_default_store())
    _current = Session(env, options.timeout_s, store, backend, gpus)
    _current.on_failure = on_failure
    _current.begin()
    return _current, problem


def stop() -> None:
    """Leave the job (this rank's part is done, or failed and was reported)."""
    import torch.distributed as dist

    global _current
    if _current is not None:
        _current.close()
        _current = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """The program's exit with `code`: what the interpreter's exit does (join non-daemon threads,
    run the atexit functions, flush the output) without its teardown, which frees every module's
    objects after the work is durable (0.65 s a command on a 2-core machine, torch and transformers
    imported) and can fail a complete torchrun rank: torch's caches can keep process groups alive
    past `destroy_process_group` (DTensor's caches hold a tensor-parallel run's meshes), and a gloo
    or NCCL thread freeing a tensor during the teardown aborts the rank ("terminate called without
    an active exception"). SystemExit where this is not a layerwise command (a program calling
    layerwise, a test runner) and under a profiler or tracer (cProfile, coverage: they write then)."""
    if not _joined and (not is_command() or sys.getprofile() is not None or sys.gettrace() is not None):
        sys.exit(code)
    try:
        threading._shutdown()  # as the interpreter's exit does: executors stop their workers, threads are joined
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with suppress(OSError, ValueError):
                stream.flush()
        os._exit(code)


def _import_world_binders() -> None:
    """Import, before the process group exists, the torch modules whose functions take
    `group=group.WORLD` as a default: imported later (transformers' model code imports them through
    FSDP), those defaults hold the default group past `destroy_process_group`. Its gloo threads
    then outlive it, and one that frees a finished collective's tensors while the interpreter
    exits aborts the rank ("terminate called without an active exception"), after a complete run."""
    import torch.distributed.nn.functional  # noqa: F401


def _narrow(gpus: tuple[int, ...]) -> None:
    """Make this process see only `gpus` (indices among those it sees now), before CUDA starts."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",")] if visible else [str(i) for i in range(max(gpus) + 1)]
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids[i] for i in gpus)
