"""A tensor file's bytes without torch: NaN/Inf from the bits, digests, the safetensors header.

The one definition of what goes into a file the run writer writes, shared by `tensorfile.write_file`
(in this process) and the writer's own process (`writerchild.py`, which does not import torch),
so that a file is the same bytes whichever of them wrote it. Pure: bytes in; counts, digests and
bytes out. Standard library and numpy only.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time

import blake3
import numpy as np

HASH_CHUNK = 64 << 20  # bytes per leaf of the sha256 tree (FORMAT.md); a tensor of one chunk or less: plain sha256
# The digest written: its name is the metadata key's prefix ("blake3:<tensor name>") and the manifest
# entry's field. BLAKE3 hashes 4.7 GB/s a core on the H200 machine's CPUs, sha256 1.2 (BENCHMARKS.md),
# and every byte an extract writes, or a compare reads, is hashed.
DIGEST = "blake3"
# The digests a reader knows, by algorithm name: the name is also the manifest entry's field and,
# with ":<tensor name>", the file metadata's key. DIGEST is the one written (format version 3);
# "sha256_tree" is what version 2 wrote, "sha256", one sequential stream, version 1 (FORMAT.md).
DIGESTS = ("blake3", "sha256_tree", "sha256")
# safetensors dtype code -> (torch's name for it, bytes an element): the codes a run's files hold
DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
}
CODES = {name: code for code, (name, _) in DTYPES.items()}  # torch dtype name -> safetensors dtype code
NONFINITE_KEY = "nonfinite:"  # "nonfinite:<tensor name>" -> "<NaN count>,<Inf count>" (only when any)
PIECE = 4 << 20  # bytes of a tensor checked, hashed and written at a time (they stay in the CPU's cache)
COUNT_ELEMENTS = 1 << 16  # elements of a tensor holding NaN/Inf counted at a time (count_nonfinite)
_SCRATCH = threading.local()  # each thread's scratch arrays for counting

# safetensors dtype code -> (its width's signed and unsigned integers, the least positive NaN-or-Inf
# bit pattern E): a value is NaN or +-Inf exactly when its bits without the sign are >= E; above E
# it is a NaN, at E an Inf - except e4m3fn, which has no Inf: its one NaN is S.1111.111 = E
NONFINITE_BITS = {"F64": (np.int64, np.uint64, 0x7FF0000000000000), "F32": (np.int32, np.uint32, 0x7F800000),
                  "BF16": (np.int16, np.uint16, 0x7F80), "F16": (np.int16, np.uint16, 0x7C00),
                  "F8_E5M2": (np.int8, np.uint8, 0x7C), "F8_E4M3": (np.int8, np.uint8, 0x7F)}
_NO_INF = {"F8_E4M3"}


def any_nonfinite(raw: memoryview, code: str) -> bool:
    """Whether any element of dtype `code` (a NONFINITE_BITS key) is NaN or +-Inf, from its bits:
    two whole-tensor maxima (two numpy calls that each release the GIL once, no temporary): the
    bits read as signed reach E for a positive one, read as unsigned reach sign | E for a negative."""
    signed, unsigned, least = NONFINITE_BITS[code]
    sign = 1 << (8 * np.dtype(unsigned).itemsize - 1)
    return int(np.frombuffer(raw, dtype=signed).max()) >= least or \
        int(np.frombuffer(raw, dtype=unsigned).max()) >= (sign | least)


def count_nonfinite(raw: memoryview, code: str) -> tuple[int, int]:
    """(NaN count, +-Inf count) of elements of dtype `code`, exact, from their bits: COUNT_ELEMENTS
    at a time through this thread's two scratch arrays, which stay in the CPU's cache, not through
    whole-tensor temporaries allocated and faulted in per file."""
    _, unsigned, least = NONFINITE_BITS[code]
    values = np.frombuffer(raw, dtype=unsigned)
    mask = unsigned((1 << (8 * np.dtype(unsigned).itemsize - 1)) - 1)  # every bit but the sign
    magnitude, flags = _scratch(np.dtype(unsigned))
    hits = at = 0  # elements whose magnitude is >= least (NaN or Inf), == least (Inf, or e4m3fn's NaN)
    for i in range(0, values.size, COUNT_ELEMENTS):
        part = values[i:i + COUNT_ELEMENTS]
        m, f = magnitude[:part.size], flags[:part.size]
        np.bitwise_and(part, mask, out=m)
        found = int(np.count_nonzero(np.greater_equal(m, least, out=f)))
        if found:
            hits += found
            at += int(np.count_nonzero(np.equal(m, least, out=f)))
    return (hits, 0) if code in _NO_INF else (hits - at, at)


def _scratch(dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """This thread's scratch arrays of COUNT_ELEMENTS elements: one of `dtype`, one of bools."""
    arrays = getattr(_SCRATCH, "arrays", None)
    if arrays is None or arrays["bool"].size != COUNT_ELEMENTS:  # first use, or COUNT_ELEMENTS changed
        arrays = _SCRATCH.arrays = {"bool": np.empty(COUNT_ELEMENTS, dtype=bool)}
    if dtype.str not in arrays:
        arrays[dtype.str] = np.empty(COUNT_ELEMENTS, dtype=dtype)
    return arrays[dtype.str], arrays["bool"]


def nonfinite(raw: memoryview, code: str) -> tuple[int, int] | None:
    """(NaN count, +-Inf count) where a tensor of dtype `code` (a NONFINITE_BITS key) holds any, else None."""
    return count_nonfinite(raw, code) if raw.nbytes and any_nonfinite(raw, code) else None


def _leaf(chunk: memoryview) -> bytes:
    return hashlib.sha256(chunk).digest()


def sha256_tree(view: memoryview, map_leaves=map, chunk: int = HASH_CHUNK) -> str:
    """sha256 of the concatenated raw sha256 digests of the `chunk`-byte chunks of `view` (the
    last one shorter); at most one chunk: the plain sha256 of the bytes. `map_leaves` hashes the
    chunks (a thread pool's map: hashlib releases the GIL), slices of `view`: no copy."""
    if view.nbytes <= chunk:
        return hashlib.sha256(view).hexdigest()
    chunks = [view[i:i + chunk] for i in range(0, view.nbytes, chunk)]
    return hashlib.sha256(b"".join(map_leaves(_leaf, chunks))).hexdigest()


def blake3_hex(view: memoryview) -> str:
    """BLAKE3 of the bytes (256 bits, hex). BLAKE3 is a tree of its own: a view of more than
    HASH_CHUNK bytes is hashed on several threads, to the same digest."""
    view = view if view.format == "B" else view.cast("B")  # blake3 takes bytes, not typed items
    return blake3.blake3(view, max_threads=blake3.blake3.AUTO if view.nbytes > HASH_CHUNK else 1).hexdigest()


def digest_hex(view: memoryview, algorithm: str = DIGEST, map_leaves=map, chunk: int = HASH_CHUNK) -> str:
    """The digest `algorithm` ("blake3", "sha256_tree" or "sha256", FORMAT.md) of the bytes."""
    if algorithm == "blake3":
        return blake3_hex(view)
    if algorithm == "sha256_tree":
        return sha256_tree(view, map_leaves, chunk)
    if algorithm == "sha256":
        return hashlib.sha256(view).hexdigest()
    raise ValueError(f"unknown digest {algorithm!r}")


def file_head(metadata: dict[str, str], tensors: list[tuple], algorithm: str = DIGEST) -> tuple[bytes, dict, dict]:
    """The bytes before a safetensors file's data, its header and its metadata, for `tensors`:
    (name, dtype code, shape, bytes, (NaN, Inf) counts or None, digest) in file order. Each
    tensor's digest (under `algorithm`'s name), and its NaN/Inf counts where it has any, go in
    the metadata."""
    meta, header, offset = dict(metadata), {}, 0
    for name, code, shape, nbytes, counts, digest in tensors:
        if counts is not None:  # the model's own NaN/Inf: recorded, reported, never hidden
            meta[NONFINITE_KEY + name] = f"{counts[0]},{counts[1]}"
        meta[f"{algorithm}:{name}"] = digest
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps({"__metadata__": meta, **header}, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return len(blob).to_bytes(8, "little") + blob, header, meta


def write_blob(path, head: bytes, views: list[memoryview]) -> None:
    """Write a file: `head`, then each view, with plain buffered writes (they release the GIL)."""
    with open(path, "wb") as fh:
        fh.write(head)
        for view in views:
            fh.write(view)


def _timed(spent: dict, part: str, start: float) -> float:
    now = time.perf_counter()
    spent[part] = spent.get(part, 0.0) + now - start
    return now


def _one_pass(fh, tensors: list[tuple], checked: list[bool], spent: dict) -> tuple[list[str] | None, bool]:
    """Check (until a NaN/Inf is found), hash and write each tensor's pieces: (digests, found);
    (None, True) when the first checked piece holds NaN/Inf (the pass stops there)."""
    digests, found, first = [], False, True
    for (_, code, _, view), check_it in zip(tensors, checked):
        hasher = blake3.blake3()
        for i in range(0, view.nbytes, PIECE):
            piece, start = view[i:i + PIECE], time.perf_counter()
            if check_it and not found:
                found = any_nonfinite(piece, code)
                start = _timed(spent, "nonfinite", start)
                if found and first:
                    return None, True
                first = False
            hasher.update(piece)
            start = _timed(spent, "digest", start)
            fh.write(piece)
            _timed(spent, "write", start)
        digests.append(hasher.hexdigest())
    return digests, found


def write_tensor_file(path, metadata: dict[str, str], tensors: list[tuple], check: bool = True,
                      algorithm: str = DIGEST, map_leaves=map, chunk: int = HASH_CHUNK,
                      spent: dict | None = None, finite=()) -> tuple[dict, dict]:
    """Write the safetensors file of `tensors`, (name, dtype code, shape, bytes view) in file
    order, each tensor's digest in the metadata and (`check`) its NaN/Inf counts where it holds
    any (but the tensors named in `finite`, known to hold none): `file_head`'s bytes, then the
    data. Returns its header and metadata; `spent` gains the seconds in "nonfinite", "digest" and
    "write".

    With blake3, each tensor is read once, PIECE bytes at a time: a piece is checked, hashed and
    written while it is in the CPU's cache, behind a header of the same length written last (a
    blake3 digest is 64 hex digits whatever the bytes); a tensor found to hold NaN/Inf (rare: it
    must then be counted, and the header grows) has the file written again the plain way, and
    when the first checked piece holds it (a run gone wrong from an earlier layer on: every later
    file does), the pass stops there and the file is written once, the plain way."""
    spent = {} if spent is None else spent
    checked = [check and code in NONFINITE_BITS and name not in finite for name, code, _, _ in tensors]
    digests = None
    if algorithm == "blake3":
        head, _, _ = file_head(metadata, [(n, c, s, v.nbytes, None, "0" * 64) for n, c, s, v in tensors], algorithm)
        with open(path, "wb") as fh:
            fh.seek(len(head))
            digests, found = _one_pass(fh, tensors, checked, spent)
            if not found:
                head, header, meta = file_head(metadata, [(n, c, s, v.nbytes, None, d) for (n, c, s, v), d
                                                          in zip(tensors, digests)], algorithm)
                fh.seek(0)
                fh.write(head)
                return header, meta
    start = time.perf_counter()
    counts = [nonfinite(view, code) if check_it else None for (_, code, _, view), check_it in zip(tensors, checked)]
    start = _timed(spent, "nonfinite", start)
    if digests is None:
        digests = [digest_hex(view, algorithm, map_leaves, chunk) for *_, view in tensors]
        start = _timed(spent, "digest", start)
    head, header, meta = file_head(metadata, [(n, c, s, v.nbytes, k, d) for (n, c, s, v), k, d
                                              in zip(tensors, counts, digests)], algorithm)
    write_blob(path, head, [view for *_, view in tensors])
    _timed(spent, "write", start)
    return header, meta


# ------------------------------------------------------------------- a file's manifest entries

ONE_LINE = json.JSONEncoder(default=str, check_circular=False)  # no indent: json's C encoder (manifest.json_text too)


def stored_digests(metadata: dict, name: str) -> dict[str, str]:
    """{algorithm: hex digest} a file's header metadata holds for tensor `name` ({}: none)."""
    return {a: metadata[f"{a}:{name}"] for a in DIGESTS if metadata.get(f"{a}:{name}")}


def file_entries(rel: str, header: dict, metadata: dict) -> list[dict]:
    """The manifest entries (FORMAT.md) of the tensor file `rel` (a run's tensors/p<prompt>/...),
    from its header ({name: {dtype, shape, ...}}) and its header's metadata; the entry of a
    tensor holding NaN/Inf carries "nonfinite": [nan, inf]."""
    prompt = int(os.path.basename(os.path.dirname(rel))[1:])  # tensors/p00012/...: no Path (thousands of files)
    entries = []
    for name, info in header.items():
        module, _, role = name.rpartition(":")
        code = info["dtype"]
        entry = {"name": name, "module": module, "role": role, "prompt": prompt, "shape": list(info["shape"]),
                 "dtype": DTYPES[code][0] if code in DTYPES else code.lower(), "file": rel,
                 **(stored_digests(metadata, name) or {DIGEST: None})}
        counts = metadata.get(NONFINITE_KEY + name)
        if counts:
            entry["nonfinite"] = [int(x) for x in counts.split(",")]
        entries.append(entry)
    return entries


def item_text(item) -> str:
    """One item of a list's text in a run's JSON (manifest.json_text); for a file's entry, as the
    manifest holds it: without its NaN/Inf counts, which the manifest lists apart."""
    if isinstance(item, dict) and "nonfinite" in item:
        item = {k: v for k, v in item.items() if k != "nonfinite"}
    return ONE_LINE.encode(item)


def indexed(rel: str, header: dict, metadata: dict) -> tuple[list[dict], list[str]]:
    """File `rel`'s manifest entries and each one's text."""
    entries = file_entries(rel, header, metadata)
    return entries, [item_text(e) for e in entries]
