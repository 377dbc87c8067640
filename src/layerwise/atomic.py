"""Writes that are all-or-nothing: a temporary name in the same directory, fsync, rename.

A reader never sees a half-written file: it sees the old file, no file, or the whole new one.
`is_io_error` / `io_reason` tell a failed write (a full disk) from a bug, for the one-line error.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_bytes_atomic(path: str | os.PathLike, data: bytes, fsync: bool = True) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str, fsync: bool = True) -> None:
    write_bytes_atomic(path, text.encode("utf-8"), fsync=fsync)


def is_io_error(err: BaseException) -> bool:
    """An OSError, or safetensors' own error wrapping one ("I/O error: No space left on device")."""
    return isinstance(err, OSError) or (type(err).__name__ == "SafetensorError" and "I/O error" in str(err))


def io_reason(err: BaseException) -> str:
    if isinstance(err, OSError):
        return err.strerror or str(err)
    return str(err).rpartition("I/O error: ")[2].strip() or str(err)
