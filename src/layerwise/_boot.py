"""What a layerwise command does before it imports anything heavy: keep its bytecode.

Many container images set PYTHONDONTWRITEBYTECODE (and install packages without compiling
them), so every Python process compiles the modules it imports from source again: for torch,
transformers and a model's code, thousands of modules and seconds per process, paid again by
every command and every torchrun rank. When that is the case and no PYTHONPYCACHEPREFIX is set,
`cache_bytecode` (run first thing by `layerwise/__init__.py`, for a layerwise command only, never
for a program that imports layerwise) points Python's bytecode cache at layerwise's own cache
directory, never beside the sources: the first command compiles and writes, the next ones load.
LAYERWISE_BYTECODE_CACHE=0 turns it off. Standard library only: it runs before torch is imported
(so do `pyc_valid`, `host_memory_available`, `cores_per_process`, `read_threads` and `writer_mode`,
which other modules share).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

# packages whose bytecode beside their sources says whether the environment has any worth keeping
SENTINELS = ("torch", "transformers")
OFF = "LAYERWISE_BYTECODE_CACHE"


def cache_root() -> Path:
    """Where layerwise keeps files: $LAYERWISE_CACHE, else ~/.cache/layerwise (the tiny checkpoints
    of zoo.py, the bytecode here)."""
    return Path(os.environ.get("LAYERWISE_CACHE") or Path.home() / ".cache" / "layerwise")


def bytecode_dir() -> Path:
    return cache_root() / "pycache"


def is_command() -> bool:
    """Is this process a layerwise command: the console script, `python -m layerwise`, or a rank
    that torchrun started with `-m layerwise`?"""
    argv = list(getattr(sys, "orig_argv", None) or sys.argv)
    if any(a == "-m" and b == "layerwise" for a, b in zip(argv, argv[1:])):
        return True
    return bool(sys.argv) and Path(sys.argv[0]).name == "layerwise"


def cache_bytecode() -> str | None:
    """Keep a command's bytecode under bytecode_dir() when Python would keep none (see the module's
    docstring). Returns the directory, or None where nothing was changed: not a command, Python
    writes bytecode, a PYTHONPYCACHEPREFIX is set, LAYERWISE_BYTECODE_CACHE=0, the sentinels'
    bytecode is there beside their sources (an environment compiled at install time: a prefix
    would compile it all again), or the directory cannot be made."""
    if os.environ.get(OFF) == "0" or not sys.dont_write_bytecode or sys.pycache_prefix or not is_command():
        return None
    if all(_has_bytecode(name) for name in SENTINELS):
        return None
    directory = bytecode_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    sys.pycache_prefix = str(directory)
    sys.dont_write_bytecode = False  # Python writes each .pyc atomically: ranks side by side are safe
    return str(directory)


def host_memory_available() -> int:
    """Bytes of RAM available to new allocations (MemAvailable on Linux); 0 where unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def cores_per_process(environ=None) -> int:
    """The cores this process may use (its CPU affinity), shared evenly with the other ranks
    torchrun started on this machine (LOCAL_WORLD_SIZE); at least 1."""
    environ = os.environ if environ is None else environ
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        local = max(1, int(environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, cores // local)


READ_THREADS_ENV = "LAYERWISE_READ_THREADS"


def read_threads(environ=None) -> int:
    """Threads that read the parts of one large read side by side (tensorfile.read_tensors):
    LAYERWISE_READ_THREADS where set, else half the cores this process may use, 4 to 8. A value
    that is not a whole number from 1 to 256 is a ValueError naming the fix."""
    environ = os.environ if environ is None else environ
    value = environ.get(READ_THREADS_ENV, "").strip()
    if value:
        if not value.isdigit() or not 1 <= int(value) <= 256:
            raise ValueError(f"{READ_THREADS_ENV}={value!r} is not a thread count: set it to a whole number "
                             "from 1 to 256, or unset it")
        return int(value)
    return max(4, min(8, cores_per_process(environ) // 2))


WRITER_ENV = "LAYERWISE_WRITER"
WRITER_MODES = ("process", "threads")  # the run writer's processes (the default, where supported), or threads here


def writer_mode(environ=None) -> str:
    """LAYERWISE_WRITER (writerproc.py): "process" unless set; another value than WRITER_MODES is
    a ValueError naming the fix (it silently meant "process")."""
    environ = os.environ if environ is None else environ
    value = environ.get(WRITER_ENV, "").strip() or WRITER_MODES[0]
    if value not in WRITER_MODES:
        raise ValueError(f"{WRITER_ENV}={value!r} is not a writer: set it to threads (the writer's threads in the "
                         "command's own process) or process (the default), or unset it")
    return value


def _has_bytecode(name: str) -> bool:
    """Does package `name` (not imported: found only) have usable bytecode beside its source? A
    package that is not installed has nothing to compile, and counts as having it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return True
    if spec is None or not isinstance(spec.origin, str) or not spec.origin.endswith(".py"):
        return True
    return pyc_valid(spec.origin, importlib.util.cache_from_source(spec.origin))


def pyc_valid(source: str, pyc: str) -> bool:
    """Would Python load `pyc` for `source` rather than compile it (PEP 552's two kinds)?"""
    try:
        with open(pyc, "rb") as f:
            head = f.read(16)
        stat = os.stat(source)
    except OSError:
        return False
    if len(head) < 16 or head[:4] != importlib.util.MAGIC_NUMBER:
        return False
    flags = int.from_bytes(head[4:8], "little")
    if flags == 0:  # by timestamp: the source's mtime and size, as recorded
        return head[8:12] == (int(stat.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little") and \
            head[12:16] == (stat.st_size & 0xFFFFFFFF).to_bytes(4, "little")
    if not flags & 0b10:  # by hash, unchecked: loaded as it is
        return True
    try:
        with open(source, "rb") as f:
            return head[8:16] == importlib.util.source_hash(f.read())
    except OSError:
        return False
