"""The safetensors format, in one module: headers, span reads, the GIL-free writer, digests.

A safetensors file is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}} with an optional "__metadata__" of strings, then the tensors' raw bytes in C order.
`read_header` checks a file against its own header (a truncated download is caught before any
data is read); `read_tensors` pulls named tensors out of one file straight onto a device in large
sequential reads; `read_tensor` reads one tensor (with plain reads on the CPU, else through
safetensors' own reader); `write_file` writes
one file with plain buffered writes and each tensor's digest in the metadata. `DTYPES` is the one
table of the format's dtype codes. `digest` is the one home of the digests a run's tensors carry:
"blake3" (written), "sha256_tree" (format version 2: the sha256 of the sha256s of 64 MiB chunks,
hashed on several threads) and plain "sha256" (version 1); `filebits` computes them.

Knows nothing about checkpoints, runs or models: a file, names, bytes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from . import filebits, shmbuffers
from ._boot import READ_THREADS_ENV, read_threads
from .errors import UserError
from .rawbytes import raw_bytes

DTYPES = filebits.DTYPES  # safetensors dtype code -> (torch dtype name, bytes per element)
DTYPE_NAMES = filebits.CODES  # torch dtype name -> safetensors dtype code
DTYPE_CODES = {getattr(torch, name): code for name, code in DTYPE_NAMES.items()}  # torch dtype -> code
_ITEMSIZE = dict(DTYPES.values())
HASH_CHUNK = filebits.HASH_CHUNK
HASH_WORKERS = min(8, os.cpu_count() or 1)  # threads hashing the chunks of big tensors, shared by every caller
NONFINITE_KEY = filebits.NONFINITE_KEY
HEADER_LIMIT = 100_000_000  # bytes: a longer safetensors header is a corrupt file
_MERGE_GAP = 16 << 20  # tensors closer than this in a file are read in one pass (a read beats a seek)
_CHUNK = 64 << 20  # bytes per read; two pinned staging buffers of this size per reading thread
_staging = threading.local()
# threads reading the parts of one large read side by side: a thread copies from the page cache at
# about 4 GB/s (58.7 GB onto one H200: 13.45 GB/s with 4, 19.49 GB/s with 8); half the cores this
# process may use (torchrun's ranks on a machine share them), 4 to 8, or LAYERWISE_READ_THREADS
try:
    READ_THREADS = read_threads()
except ValueError:  # the command line says so and exits 2 (cli.main); a library caller gets the default
    READ_THREADS = read_threads({k: v for k, v in os.environ.items() if k != READ_THREADS_ENV})
_POOLS: dict[tuple[str, int], ThreadPoolExecutor] = {}  # the shared "read" and "hash" pools, by size
_POOLS_LOCK = threading.Lock()


def code(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "BF16"."""
    return DTYPE_CODES[dtype]


def dtype_name(code: str) -> str:
    """"BF16" -> "bfloat16" (an unknown code: lower case)."""
    return DTYPES[code][0] if code in DTYPES else code.lower()


def nbytes(shape, dtype: str, unknown_itemsize: int = 4) -> int:
    """Bytes of a tensor of `shape` and torch dtype name `dtype`."""
    return math.prod(shape) * _ITEMSIZE.get(dtype, unknown_itemsize)


# -------------------------------------------------------------------------------------- reading

SHARD = ("shard", "re-download it")  # what a file is and what to do about a corrupt one (a run's: run_file)


def read_header(path: Path, metadata: dict | None = None, kind: tuple[str, str] = SHARD) -> dict:
    """A safetensors header: {name: {dtype, shape, data_offsets}}; raises UserError when the file
    is not a safetensors file or is shorter than its header says (truncated), naming it and what to
    do as `kind` says. The header's string metadata is copied into `metadata` when a dict is given."""
    return _header_and_data_start(path, metadata, kind)[0]


def _header_and_data_start(path: Path, metadata: dict | None = None, kind=SHARD) -> tuple[dict, int]:
    """`read_header`'s header, and the byte its tensors' data starts at (data_offsets count from it)."""
    (what, fix), size = kind, path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise UserError(f"{what} {path} is truncated ({size} bytes): {fix}")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8 or length > HEADER_LIMIT:
            raise UserError(f"{what} {path} is truncated or not a safetensors file (header of {length} bytes, "
                            f"file of {size}): {fix}")
        try:
            header = json.loads(fh.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{what} {path} has a corrupt header: {fix}") from None
    found = header.pop("__metadata__", None) or {} if isinstance(header, dict) else None
    if not isinstance(found, dict) or not all(_entry_ok(t) for t in header.values()):
        raise UserError(f"{what} {path} has a corrupt safetensors header "
                        f"(not {{name: {{dtype, shape, data_offsets}}}}): {fix}")
    if metadata is not None:
        metadata.update(found)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + length + end > size:
        raise UserError(f"{what} {path} is truncated: {size} bytes, its header needs {8 + length + end}: {fix}")
    return header, 8 + length


def _entry_ok(info) -> bool:
    """A header entry as the format defines it: dtype code, shape, [begin, end] offsets."""
    def ints(xs):
        return isinstance(xs, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in xs)

    return (isinstance(info, dict) and isinstance(info.get("dtype"), str) and ints(info.get("shape"))
            and ints(info.get("data_offsets")) and len(info["data_offsets"]) == 2
            and info["data_offsets"][0] <= info["data_offsets"][1])


def read_index(path: Path) -> dict:
    """{name: (shape, dtype code, {algorithm: hex digest} from the metadata)}, read without the data."""
    metadata: dict = {}
    header = read_header(path, metadata)
    return {name: (info["shape"], info["dtype"], stored_digests(metadata, name)) for name, info in header.items()}


def read_tensor(path: Path, name: str, device: str = "cpu") -> torch.Tensor:
    """One tensor, read with safetensors' own reader (the rest of the file is not read)."""
    return read_tensor_and_digests(path, name, device)[0]


def read_tensor_and_digests(path: Path, name: str, device: str = "cpu",
                            kind: tuple[str, str] = SHARD) -> tuple[torch.Tensor, dict[str, str]]:
    """One tensor and the digests its own file's header metadata holds for it ({}: none)."""
    from safetensors import safe_open

    if PLAIN_READS and str(device) == "cpu":
        return _read_plain(path, name, kind)
    if PAGE_IN_HEAD:
        _page_in_head(path)
    with safe_open(str(path), framework="pt", device=device) as fh:
        return fh.get_tensor(name), stored_digests(fh.metadata() or {}, name)


PAGE_IN_HEAD = True  # read a file's header with plain reads before safe_open opens it (BENCHMARKS.md)
# Read a tensor into memory of its own with plain file reads, which release the GIL for the whole
# read, not through safetensors' memory map: its copy out of the map faults the pages in from a
# cold disk while holding the GIL, stopping every other thread (compare's readers and measuring
# thread) for each read (BENCHMARKS.md).
PLAIN_READS = True


def _read_plain(path: Path, name: str, kind=SHARD) -> tuple[torch.Tensor, dict[str, str]]:
    """`read_tensor_and_digests` on the CPU with plain reads: the header checked (read_header),
    then the tensor's bytes read into a tensor of its own."""
    metadata: dict = {}
    header, data_start = _header_and_data_start(path, metadata, kind)
    info = header.get(name)
    if info is None:
        raise ValueError(f"the file holds no tensor {name}")
    if info["dtype"] not in DTYPES:
        raise ValueError(f"dtype {info['dtype']} is not one layerwise reads")
    begin, end = info["data_offsets"]
    data = torch.empty(end - begin, dtype=torch.uint8)
    with open(path, "rb", buffering=0) as fh:  # the header's length as read_header read it: not read again
        got = _pread_exact(fh.fileno(), memoryview(data.numpy()), data_start + begin)
    if got != end - begin:
        raise ValueError(f"the file ends {end - begin - got} bytes into the tensor's data")
    tensor = data.view(getattr(torch, DTYPES[info["dtype"]][0])).reshape(info["shape"])
    return tensor, stored_digests(metadata, name)


def _pread_exact(fd: int, view: memoryview, offset: int) -> int:
    """Fill `view` from `fd` at `offset` (plain reads: the GIL is released while each runs); the
    bytes read, fewer only where the file ends. Reads may come back short; 0 bytes is the end."""
    got = 0
    while got < len(view):
        more = os.preadv(fd, [view[got:]], offset + got)
        if more <= 0:
            break
        got += more
    return got


def _page_in_head(path: Path) -> None:
    """Bring a file's header into the page cache with plain file reads, which release the GIL:
    safe_open reads it through a memory map while holding the GIL, so on a cold disk every other
    thread (compare's measuring thread among them) waits for that read."""
    with open(path, "rb", buffering=0) as fh:
        length = int.from_bytes(fh.read(8), "little")
        if 0 < length <= HEADER_LIMIT:
            fh.read(length)


def read_tensors(path: Path, names: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """The named tensors of one file on `device`, thread-safe.

    Disk bandwidth is the floor when a layer is streamed, so reads are large and sequential: the
    byte ranges of the wanted tensors are merged (small gaps read through) and read in 64 MB
    chunks into pinned staging buffers, from which asynchronous host-to-device copies fill each
    tensor while the next chunk is read. One thread copies from the page cache at about 4 GB/s,
    far below what the host and the GPU's link carry, so a large read is cut into READ_THREADS
    contiguous parts read side by side (each part sequential; a disk sees a few nearby streams).
    Every tensor gets its own storage, so a tensor that loading converts (fused experts) frees
    its source at once."""
    header = read_header(path)
    out = {}
    with open(path, "rb", buffering=0) as fh:
        data_start = 8 + int.from_bytes(fh.read(8), "little")
    spans = []
    for name in names:
        info = header[name]
        begin, end = info["data_offsets"]
        tensor = torch.empty(info["shape"], dtype=getattr(torch, dtype_name(info["dtype"])), device=device)
        out[name] = tensor
        if tensor.numel():
            spans.append((data_start + begin, data_start + end, tensor.view(-1).view(torch.uint8)))
    pieces = _pieces(sorted(spans, key=lambda s: s[0]))
    parts = _split(pieces, READ_THREADS)
    # The destinations may reuse memory just freed by another thread whose kernels still read it
    # (a layer's raw weights, freed as its conversion is queued): copy only after that work.
    after = None
    if device.type == "cuda":
        after = torch.cuda.Event()
        after.record(torch.cuda.current_stream(device))
    inference = torch.is_inference_mode_enabled()  # the destinations' kind; the readers copy under the same mode
    if len(parts) <= 1:
        for part in parts:
            _read_part(str(path), part, device, after, inference)
    else:
        pool = _shared_pool("read", READ_THREADS)
        futures = [pool.submit(_read_part, str(path), part, device, after, inference) for part in parts]
        for future in futures:
            future.result()
    return out


def _pieces(spans: list) -> list[tuple[int, int, list]]:
    """Sorted (begin, end, destination) spans as reads of at most _CHUNK bytes: (offset, size, the
    spans it fills). Spans closer than _MERGE_GAP share reads (the gap is read through)."""
    groups: list[list] = []
    for span in spans:
        if groups and span[0] - max(s[1] for s in groups[-1]) <= _MERGE_GAP:
            groups[-1].append(span)
        else:
            groups.append([span])
    pieces = []
    for group in groups:
        lo, hi = group[0][0], max(s[1] for s in group)
        for offset in range(lo, hi, _CHUNK):
            size = min(_CHUNK, hi - offset)
            pieces.append((offset, size, [s for s in group if s[0] < offset + size and s[1] > offset]))
    return pieces


def _split(pieces: list, parts: int) -> list[list]:
    """`pieces` in at most `parts` contiguous runs of about equal bytes (one when it is small)."""
    total = sum(p[1] for p in pieces)
    parts = max(1, min(parts, len(pieces), total // (2 * _CHUNK)))
    out: list[list] = [[] for _ in range(parts)]
    done = 0
    for piece in pieces:
        out[min(parts - 1, done * parts // max(total, 1))].append(piece)
        done += piece[1]
    return [o for o in out if o]


def _read_part(path: str, pieces: list, device: torch.device, after, inference: bool) -> None:
    """Read `pieces` in order through this thread's two staging buffers, copying each into its
    destinations (asynchronously on a side stream when they are on a GPU). `inference`: the
    destinations were made under torch.inference_mode (thread-local), so the copies are too."""
    with torch.inference_mode(inference):
        _read_pieces(path, pieces, device, after)


def _read_pieces(path: str, pieces: list, device: torch.device, after) -> None:
    on_gpu = device.type == "cuda"
    stream = torch.cuda.Stream(device) if on_gpu else None
    if after is not None:
        stream.wait_event(after)
    buffers = _staging_buffers(on_gpu)
    events = [None, None]
    turn = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset, size, spans in pieces:
            staging = buffers[turn]
            if events[turn] is not None:
                events[turn].synchronize()  # the copies out of this buffer are done
            if _pread_exact(fd, memoryview(staging.numpy())[:size], offset) != size:
                raise UserError(f"{path} is truncated: re-download it")
            with torch.cuda.stream(stream) if on_gpu else contextlib.nullcontext():
                for begin, end, dst in spans:
                    a, b = max(begin, offset), min(end, offset + size)
                    dst[a - begin:b - begin].copy_(staging[a - offset:b - offset], non_blocking=on_gpu)
                if on_gpu:
                    events[turn] = torch.cuda.Event()
                    events[turn].record(stream)
            turn ^= 1
        if on_gpu:
            stream.synchronize()
    finally:
        os.close(fd)


def _shared_pool(name: str, workers: int) -> ThreadPoolExecutor:
    """The process's pool `name` ("read", "hash") of `workers` threads, made on first use (a
    changed READ_THREADS or HASH_WORKERS gets a pool of its own size)."""
    with _POOLS_LOCK:
        pool = _POOLS.get((name, workers))
        if pool is None:
            pool = _POOLS[name, workers] = ThreadPoolExecutor(workers, thread_name_prefix=f"layerwise-{name}")
        return pool


def _staging_buffers(pinned: bool):
    """Two reusable staging buffers per thread (pinned when the destination is a GPU)."""
    key = "pinned" if pinned else "plain"
    buffers = getattr(_staging, key, None)
    if buffers is None or buffers[0].numel() < _CHUNK:
        buffers = [shmbuffers.locked_buffer(_CHUNK) if pinned else torch.empty(_CHUNK, dtype=torch.uint8)
                   for _ in range(2)]
        setattr(_staging, key, buffers)
    return buffers


# -------------------------------------------------------------------------------------- writing

def write_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
               header_out: dict | None = None, nonfinite: bool = False, spent: dict | None = None,
               finite=()) -> int:
    """Write a safetensors file with plain buffered writes (they release the GIL, so the forward
    pass keeps running while files are written) and put each tensor's digest (DIGEST) in the
    metadata, and (`nonfinite`) its NaN/Inf counts where it holds any (NONFINITE_KEY): the bytes
    `filebits.write_tensor_file` writes, as in the run writer's own process. Returns the bytes of
    tensor data written; `header_out` receives the header written (as `read_header` returns it)
    and "__metadata__", its metadata; `spent` the seconds checking, hashing and writing; `finite`
    names tensors known to hold no NaN/Inf (not checked)."""
    views = {name: raw_bytes(t) for name, t in tensors.items()}
    header, meta = filebits.write_tensor_file(
        path, metadata, [(name, code(t.dtype), t.shape, views[name]) for name, t in tensors.items()], nonfinite,
        DIGEST, _shared_pool("hash", HASH_WORKERS).map, HASH_CHUNK, spent, finite)
    if header_out is not None:
        header_out.update(header, __metadata__=meta)
    return sum(view.nbytes for view in views.values())


# -------------------------------------------------------------------------------------- digests

def _forget_pools() -> None:
    """In a forked child, which has none of the pools' threads (nor a lock another thread held)."""
    global _POOLS, _POOLS_LOCK
    _POOLS, _POOLS_LOCK = {}, threading.Lock()


os.register_at_fork(after_in_child=_forget_pools)


DIGESTS = filebits.DIGESTS  # every digest a reader knows (FORMAT.md); DIGEST is the one written
DIGEST = filebits.DIGEST


def digest(data: torch.Tensor | memoryview, algorithm: str | None = None) -> str:
    """Hex digest (`algorithm`, else DIGEST) of a tensor's raw bytes in C order (what safetensors
    stores), or of a byte view; a big sha256_tree's chunks are hashed on the shared pool."""
    view = raw_bytes(data) if isinstance(data, torch.Tensor) else data
    return filebits.digest_hex(view, algorithm or DIGEST, _shared_pool("hash", HASH_WORKERS).map, HASH_CHUNK)


def digest_key(algorithm: str, name: str) -> str:
    """The header metadata key of tensor `name`'s digest: "sha256_tree:model.layers.7:output"."""
    return f"{algorithm}:{name}"


stored_digests = filebits.stored_digests  # {algorithm: hex digest} of tensor `name` in a file's metadata


def digests_hold(tensor: torch.Tensor, claims: Iterable[tuple[str, str]], known: dict[str, str] | None = None) -> bool:
    """Whether every (algorithm, hex digest) claimed for a tensor holds for its bytes, each
    algorithm computed once; two different digests claimed under one algorithm never hold.
    `known`: {algorithm: hex digest} already taken of these bytes (hashed as they were read),
    not computed again."""
    wanted: dict[str, str] = {}
    for algorithm, hexdigest in claims:
        if wanted.setdefault(algorithm, hexdigest) != hexdigest:
            return False
    found = dict(known or {})
    missing = [algorithm for algorithm in wanted if algorithm not in found]
    if missing:
        view = raw_bytes(tensor)
        found.update((algorithm, digest(view, algorithm)) for algorithm in missing)
    return all(found[algorithm] == hexdigest for algorithm, hexdigest in wanted.items())
