"""What a layerwise command reads while it imports: the first bytes a layer-by-layer command will
need from a checkpoint, asked of the disk before torch and transformers are imported.

A layer test or a streamed extract spends its first seconds importing (4-8 s on a GPU image),
then reads its first layer from a disk that holds none of it in memory yet. `prefetch` (called
by `layerwise/__init__.py` right after the bytecode step, for a layerwise command only) finds the
checkpoint among the command's arguments (a directory with a config.json and safetensors files;
a run directory has no config.json) and, on a thread of its own, reads into the page cache the
byte ranges of what the command reads first:

- `test` (single, multi): the first layer of the test, or of this rank's share under torchrun
  (layers are dealt round-robin: rank r's first layer is the test's r-th);
- `extract --stream` and `test --record-reference`: the embedding, then layer 0.

At most PREFETCH_BYTES, and at most an eighth of the memory the kernel says is available. The
command reads the same bytes again, from memory where they still are: this only starts the disk
early, and a wrong guess costs a bounded read. LAYERWISE_PREFETCH=0 turns it off. Standard
library only: it runs before torch is imported.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from pathlib import Path

from ._boot import host_memory_available, is_command

OFF = "LAYERWISE_PREFETCH"
PREFETCH_BYTES = 8 << 30
_CHUNK = 16 << 20
_EMBEDDING = re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings)\.weight$")


def first_reads(args: list[str], env: dict | None = None) -> list[tuple[Path, int, int]]:
    """(file, offset, length) of what the command `args` (after `layerwise`) reads first from a
    checkpoint, in order; [] for commands that do not read one layer by layer."""
    env = os.environ if env is None else env
    if not args or args[0] not in ("test", "extract"):
        return []
    command, rest = args[0], args[1:]
    if command == "extract" and "--stream" not in rest:
        return []
    if command == "test" and _value(rest, "--test-type", "single") not in ("single", "multi"):
        return []
    checkpoint = next((Path(a) for a in rest if not a.startswith("-") and _is_checkpoint(Path(a))), None)
    if checkpoint is None:
        return []
    try:
        wmap = _weight_map(checkpoint)
        if command == "extract" or "--record-reference" in rest:  # streams the model from its embedding
            wanted = [n for n in wmap if _EMBEDDING.search(n)] + _layer_names(wmap, 0)
        else:
            wanted = _layer_names(wmap, _first_layer(rest, env))
        return _ranges(checkpoint, wmap, wanted)
    except (OSError, ValueError, KeyError, TypeError):
        return []


def prefetch_command() -> threading.Thread | None:
    """`prefetch` of this process's arguments when it is a layerwise command (_boot.is_command)."""
    return prefetch(sys.argv[1:]) if is_command() else None


def prefetch(args: list[str]) -> threading.Thread | None:
    """Start reading `first_reads(args)` into the page cache on a daemon thread (None: nothing to
    read, or LAYERWISE_PREFETCH=0)."""
    if os.environ.get(OFF) == "0":
        return None
    reads = first_reads(args)
    if not reads:
        return None
    available = host_memory_available() or PREFETCH_BYTES * 8  # unknown: the cap alone
    thread = threading.Thread(target=_read, args=(reads, min(PREFETCH_BYTES, available // 8)),
                              name="layerwise-prefetch", daemon=True)
    thread.start()
    return thread


def _read(reads: list[tuple[Path, int, int]], budget: int) -> int:
    """Read the ranges in order until `budget` bytes; returns the bytes read."""
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    done = 0
    for path, offset, length in reads:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            end = offset + length
            while offset < end and done < budget:
                got = os.preadv(fd, [view[:min(_CHUNK, end - offset)]], offset)
                if got <= 0:
                    break
                offset += got
                done += got
        except OSError:
            pass
        finally:
            os.close(fd)
        if done >= budget:
            break
    return done


def _value(args: list[str], flag: str, default: str | None = None) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return default


def _first_layer(args: list[str], env) -> int:
    """The first layer this process tests: --layer K (every rank reads it; one runs it), else the
    first of the test's layers (0, or multi's A of --layers A-B) plus this rank's place under
    torchrun (round-robin)."""
    if _value(args, "--test-type", "single") == "single":
        chosen = _value(args, "--layer", "all")
        if chosen.isdigit():
            return int(chosen)
        first = 0
    else:
        start = (_value(args, "--layers") or "0").split("-")[0]
        first = int(start) if start.isdigit() else 0
    return first + int(env.get("RANK") or 0)


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


def _layer_names(wmap: dict[str, str], index: int) -> list[str]:
    pattern = re.compile(rf"(?:^|\.)(?:layers|h|blocks)\.{index}\.")
    return [n for n in wmap if pattern.search(n)]


def _header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        if not 0 < size < 1 << 30:
            raise ValueError(f"{path}: not a safetensors file")
        header = json.loads(fh.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


def _ranges(directory: Path, wmap: dict[str, str], names: list[str]) -> list[tuple[Path, int, int]]:
    """The byte span each file holds of `names` (one span a file: a layer's tensors lie together),
    in the order the names come."""
    spans: dict[str, list[int]] = {}
    headers: dict[str, tuple[int, dict]] = {}
    for name in names:
        file = wmap[name]
        if file not in headers:
            headers[file] = _header(directory / file)
        start, header = headers[file]
        lo, hi = header[name]["data_offsets"]
        span = spans.setdefault(file, [start + lo, start + hi])
        span[0], span[1] = min(span[0], start + lo), max(span[1], start + hi)
    return [(directory / file, lo, hi - lo) for file, (lo, hi) in spans.items()]
