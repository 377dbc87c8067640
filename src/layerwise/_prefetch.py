"""What a layerwise command reads while it imports: the bytes a layer-by-layer command will need
first from a checkpoint, asked of the disk before torch and transformers are imported.

A layer test or a streamed extract spends its first seconds importing and opening the model (5-8 s
on a GPU image), then reads its layers from a disk that holds none of them in memory yet.
`prefetch` (called by `layerwise/__init__.py` right after the bytecode step, for a layerwise
command only) finds the checkpoint among the command's arguments (a directory with a config.json
and safetensors files; a run directory has no config.json) and, on threads of its own, reads into
the page cache what the command reads, in the order it reads it:

- `test` (single, multi): the test's layers, or this rank's share under torchrun (layers are dealt
  round-robin: rank r's are the test's r-th, (r + N)-th, ...);
- `extract --stream` and `test --record-reference`: the embedding, layer 0, 1, ..., the rest (the
  final norm, the head).

Each layer's tensors exactly (a shard can interleave several layers' tensors), holes of up to
_GAP bytes read through, in _CHUNK reads on as many threads as the command reads with
(`_boot.read_threads`: LAYERWISE_READ_THREADS, else half the cores, 4 to 8; one request at a time
does not keep a disk busy: a virtio disk gave 1.38-1.53 GB/s to one thread, 1.57-1.99 to 4-32,
BENCHMARKS.md), until PREFETCH_BYTES or a quarter of the memory the kernel says is available (shared
by the machine's torchrun ranks): enough that the command's own reads begin where the prefetch's
end, on a GPU machine whose start-up takes 6-9 s (at 16 GiB the disk sat idle 1.3-1.6 s in a
command whose start-up took 8 s). The command reads the same bytes again, from memory where they
still are: this only keeps the disk busy from the command's first moment, and a wrong guess costs
a bounded read. The ranges are worked out on the reading thread (the shards' headers read as
they are needed), not on the importing one. LAYERWISE_PREFETCH=0 turns it off. Standard library
only: it runs before torch is imported.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from pathlib import Path
from typing import Iterator

from ._boot import host_memory_available, is_command, read_threads

OFF = "LAYERWISE_PREFETCH"
PREFETCH_BYTES = 32 << 30
_CHUNK = 64 << 20
_GAP = 1 << 20
_THREADS = 4  # where LAYERWISE_READ_THREADS is not a thread count (the command says so, exit 2)
_EMBEDDING = re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings)\.weight$")
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


def first_reads(args: list[str], env: dict | None = None) -> list[tuple[Path, int, int]]:
    """(file, offset, length) of what the command `args` (after `layerwise`) reads from a
    checkpoint, in order; [] for commands that do not read one layer by layer."""
    return [read for group in _planned(args, env) for read in group]


def _target(args: list[str]) -> tuple[str, list[str], Path] | None:
    """(command, its arguments, the checkpoint) of a command that reads a checkpoint layer by layer."""
    if not args or args[0] not in ("test", "extract"):
        return None
    command, rest = args[0], args[1:]
    if command == "extract" and "--stream" not in rest:
        return None
    if command == "test" and _value(rest, "--test-type", "single") not in ("single", "multi"):
        return None
    checkpoint = next((Path(a) for a in rest if not a.startswith("-") and _is_checkpoint(Path(a))), None)
    return None if checkpoint is None else (command, rest, checkpoint)


def _planned(args: list[str], env: dict | None = None) -> Iterator[list[tuple[Path, int, int]]]:
    """`first_reads`, a group of reads at a time (the embedding, a layer), each worked out when the
    reader comes to it."""
    env = os.environ if env is None else env
    target = _target(args)
    if target is None:
        return
    command, rest, checkpoint = target
    try:
        wmap = _weight_map(checkpoint)
        by_layer: dict[int, list[str]] = {}
        embedding, others = [], []  # outside the layers: the embedding; the rest (final norm, head)
        for name in wmap:
            found = _LAYER.search(name)
            if found:
                by_layer.setdefault(int(found.group(1)), []).append(name)
            else:
                (embedding if _EMBEDDING.search(name) else others).append(name)
        headers: dict[str, tuple[int, dict]] = {}
        streamed = command == "extract" or "--record-reference" in rest  # the model from its embedding on
        if streamed:
            yield _ranges(checkpoint, wmap, embedding, headers)
        for index in sorted(by_layer) if streamed else _test_layers(rest, env, sorted(by_layer)):
            yield _ranges(checkpoint, wmap, by_layer.get(index, []), headers)
        if streamed:
            yield _ranges(checkpoint, wmap, others, headers)
    except (OSError, ValueError, KeyError, TypeError):
        return


def prefetch_command() -> threading.Thread | None:
    """`prefetch` of this process's arguments when it is a layerwise command (_boot.is_command)."""
    return prefetch(sys.argv[1:]) if is_command() else None


def prefetch(args: list[str]) -> threading.Thread | None:
    """Start reading `first_reads(args)` into the page cache on daemon threads (None: nothing to
    read, or LAYERWISE_PREFETCH=0); the thread returned ends when they all have."""
    if os.environ.get(OFF) == "0" or _target(args) is None:
        return None
    budget = prefetch_budget(host_memory_available(), os.environ)
    try:
        threads = read_threads()
    except ValueError:
        threads = _THREADS
    thread = threading.Thread(target=lambda: _read(_planned(args), budget, threads), name="layerwise-prefetch",
                              daemon=True)
    thread.start()
    return thread


def prefetch_budget(available: int, env) -> int:
    """PREFETCH_BYTES, at most a quarter of the memory `available` (0: unknown) shared by the
    machine's torchrun ranks (LOCAL_WORLD_SIZE), which all prefetch at once."""
    ranks = max(1, int(env.get("LOCAL_WORLD_SIZE") or 1))
    return min(PREFETCH_BYTES, available // (4 * ranks)) if available else PREFETCH_BYTES // ranks


def _read(groups, budget: int, threads: int = _THREADS) -> int:
    """Read the groups' ranges in order (each in _CHUNK reads, `threads` at a time) until `budget`
    bytes; returns the bytes asked for (a file that cannot be opened or read counts: the reads are
    only a hint). `groups`: lists of (file, offset, length), or an iterator of them."""
    lock, state = threading.Lock(), {"done": 0}
    chunks = ((path, offset, min(_CHUNK, start + length - offset))
              for group in groups for path, start, length in group
              for offset in range(start, start + length, _CHUNK))

    def take():
        with lock:
            if state["done"] >= budget:
                return None
            chunk = next(chunks, None)
            if chunk is not None:
                state["done"] += chunk[2]
            return chunk

    def work() -> None:
        buffer = memoryview(bytearray(_CHUNK))
        files: dict[Path, int | None] = {}
        try:
            while (chunk := take()) is not None:
                path, offset, size = chunk
                if path not in files:
                    try:
                        files[path] = os.open(path, os.O_RDONLY)
                    except OSError:
                        files[path] = None
                if files[path] is not None:
                    try:
                        os.preadv(files[path], [buffer[:size]], offset)
                    except OSError:
                        pass
        finally:
            for fd in files.values():
                if fd is not None:
                    os.close(fd)

    workers = [threading.Thread(target=work, daemon=True) for _ in range(threads - 1)]
    for w in workers:
        w.start()
    work()
    for w in workers:
        w.join()
    return state["done"]


def _value(args: list[str], flag: str, default: str | None = None) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return default


def _test_layers(args: list[str], env, layers: list[int]) -> list[int]:
    """The layers this process tests, in order: --layer K (every rank reads it; one runs it), else
    the test's layers (all of them, or multi's A-B of --layers) dealt round-robin over the ranks
    under torchrun."""
    if _value(args, "--test-type", "single") == "single":
        chosen = _value(args, "--layer", "all")
        if chosen.isdigit():
            return [int(chosen)]
    else:
        span = (_value(args, "--layers") or "").split("-")
        if len(span) == 2 and all(part.isdigit() for part in span):
            layers = [k for k in layers if int(span[0]) <= k <= int(span[1])]
    return layers[int(env.get("RANK") or 0)::max(1, int(env.get("WORLD_SIZE") or 1))]


def _is_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and (any(path.glob("*.safetensors.index.json"))
                                                 or (path / "model.safetensors").is_file())


# _weight_map and _header read what checkpoint.weight_map and tensorfile.read_header read, without
# their checks: those modules import torch, and this one runs before it is imported.
def _weight_map(directory: Path) -> dict[str, str]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
    return {name: "model.safetensors" for name in _header(directory / "model.safetensors")[1]}


def _header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        if not 0 < size < 1 << 30:
            raise ValueError(f"{path}: not a safetensors file")
        header = json.loads(fh.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


def _ranges(directory: Path, wmap: dict[str, str], names: list[str],
            headers: dict[str, tuple[int, dict]]) -> list[tuple[Path, int, int]]:
    """The byte ranges of the tensors `names` (their files' headers read into `headers` as needed):
    a file at a time, in the order the names first come to it, each file's ranges in offset order
    with holes of up to _GAP bytes read through."""
    spans: dict[str, list[tuple[int, int]]] = {}
    for name in names:
        file = wmap[name]
        if file not in headers:
            headers[file] = _header(directory / file)
        start, header = headers[file]
        lo, hi = header[name]["data_offsets"]
        spans.setdefault(file, []).append((start + lo, start + hi))
    out = []
    for file, pieces in spans.items():
        merged: list[list[int]] = []
        for lo, hi in sorted(pieces):
            if merged and lo - merged[-1][1] <= _GAP:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        out += [(directory / file, lo, hi - lo) for lo, hi in merged if hi > lo]
    return out
