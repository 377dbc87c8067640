"""Writes that are all-or-nothing: a temporary name in the same directory, fsync, rename.

A reader never sees a half-written file: it sees the old file, no file, or the whole new one.
`swap_directories` does the same for a whole directory (a run replaced under --overwrite: the
new one is written beside it and exchanged with it in one step). `is_io_error` / `io_reason`
tell a failed write (a full disk) from a bug, for the one-line error.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
from pathlib import Path

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


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


def _renameat2_exchange(a: Path, b: Path) -> bool:
    """Linux's renameat2(RENAME_EXCHANGE): both names swap in one step. False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this kernel or filesystem cannot exchange
        return False
    raise OSError(errno, os.strerror(errno), str(a))


def swap_directories(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put directory `new` in the place of directory `target`, whose old contents end up under
    the name `new` (the caller removes them). Atomic where the kernel can exchange two names (a
    reader sees the old or the new directory, never none); elsewhere two renames."""
    new, target = Path(new), Path(target)
    if not _renameat2_exchange(new, target):
        aside = target.with_name(f".{target.name}.old")
        os.rename(target, aside)
        os.rename(new, target)
        os.rename(aside, new)
    try:
        fd = os.open(target.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)  # the exchange itself survives a power loss
    except OSError:
        pass
    finally:
        os.close(fd)
