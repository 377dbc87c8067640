"""A tensor file's bytes without torch: NaN/Inf from the bits, digests, the safetensors header.

The one definition of what goes into a file the run writer writes, shared by `tensorfile.write_file`
(in this process) and the writer's own process (`writerchild.py`, which does not import torch),
so that a file is the same bytes whichever of them wrote it. Pure: bytes in; counts, digests and
bytes out. Standard library and numpy only.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

HASH_CHUNK = 64 << 20  # bytes per leaf of the sha256 tree (FORMAT.md); a tensor of one chunk or less: plain sha256
DIGEST = "sha256_tree"  # the digest written: its name is the metadata key's prefix, "sha256_tree:<tensor name>"
NONFINITE_KEY = "nonfinite:"  # "nonfinite:<tensor name>" -> "<NaN count>,<Inf count>" (only when any)

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
    """(NaN count, +-Inf count) of elements of dtype `code`, exact, from their bits."""
    _, unsigned, least = NONFINITE_BITS[code]
    magnitude = np.frombuffer(raw, dtype=unsigned) & unsigned((1 << (8 * np.dtype(unsigned).itemsize - 1)) - 1)
    at, above = int(np.count_nonzero(magnitude == least)), int(np.count_nonzero(magnitude > least))
    return (above + at, 0) if code in _NO_INF else (above, at)


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


def file_head(metadata: dict[str, str], tensors: list[tuple]) -> tuple[bytes, dict, dict]:
    """The bytes before a safetensors file's data, its header and its metadata, for `tensors`:
    (name, dtype code, shape, bytes, (NaN, Inf) counts or None, digest) in file order. Each
    tensor's digest, and its NaN/Inf counts where it has any, go in the metadata."""
    meta, header, offset = dict(metadata), {}, 0
    for name, code, shape, nbytes, counts, digest in tensors:
        if counts is not None:  # the model's own NaN/Inf: recorded, reported, never hidden
            meta[NONFINITE_KEY + name] = f"{counts[0]},{counts[1]}"
        meta[f"{DIGEST}:{name}"] = digest
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
