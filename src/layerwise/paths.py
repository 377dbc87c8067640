"""Paths read from files, kept inside their root: a run's tensor files, a checkpoint's shards,
an import source's tensors; and the paths a command writes, kept out of the runs it reads.

A name read from a file (a manifest's `file`, an index's `weight_map` value) or found by listing
a directory is joined to its root and resolved on disk, symlinks followed; what lands outside
the root is refused in one line (exit 2), before anything is opened. A Hugging Face cache
snapshot links its files to the repository's `blobs/`: its root is the repository. An output
file (a report) is checked before any work: a file name, in a directory that takes new files,
outside every run the command reads or writes (a report there would change the run).
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .atomic import io_reason
from .errors import UserError
from .schema import relative_path


def within(path: Path, roots: tuple[Path, ...]) -> bool:
    """Whether `path`, resolved (symlinks followed), lies in one of `roots` (resolved)."""
    real = path.resolve()
    return any(real == root or root in real.parents for root in (r.resolve() for r in roots))


def hf_cache_root(directory: Path) -> Path | None:
    """The repository of a Hugging Face cache snapshot (`.../models--x/snapshots/<rev>`), else None."""
    directory = Path(directory).absolute()
    if directory.parent.name == "snapshots" and directory.parent.parent.name.startswith(("models--", "datasets--")):
        return directory.parent.parent
    return None


def inside(root: Path, name: str, where: str, also: Path | None = None) -> Path:
    """`root / name`, refused unless `name` is a relative path without `..` that resolves inside
    `root` (or inside `also`) with every symlink followed."""
    relative_path(name, where)
    path = Path(root) / name
    if not within(path, (Path(root),) + ((Path(also),) if also is not None else ())):
        raise UserError(f"{where}: {name} resolves to {path.resolve()}, outside {root}; refusing to read it")
    return path


def listed_inside(root: Path, path: Path, where: str) -> Path:
    """A file found by listing `root` (a symlink may point anywhere): refused unless it resolves inside."""
    if not within(path, (Path(root),)):
        raise UserError(f"{where}: {path} is a link to {path.resolve()}, outside {root}; refusing to read it")
    return path


def overlaps(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether directories `a` and `b`, resolved (symlinks followed), are one, or one lies inside the other."""
    return within(Path(a), (Path(b),)) or within(Path(b), (Path(a),))


def check_output_file(path: str | None, flag: str, runs: Iterable[tuple[str, str | os.PathLike | None]] = ()) -> None:
    """Before any work: `flag`'s output file (None or '-': none, stdout) names a file, not a
    directory nor a device, in a directory that exists and takes new files, and lies outside
    each of `runs` ((what, run directory): those the command reads or writes). The file is
    written by a rename in its directory (atomic.py): a link in its place is replaced, not followed."""
    if path in (None, "-"):
        return
    to_print = " ('-' prints it)" if flag == "--json" else ""
    if not path:
        raise UserError(f"{flag} is given an empty file name: give a file name{to_print}")
    target = Path(path)
    parent = target.parent
    if target.is_dir():
        raise UserError(f"{flag} {path} is a directory: give a file name")
    if target.exists() and not target.is_file():
        raise UserError(f"{flag} {path} is not a regular file (a device, pipe or socket): give a file name{to_print}")
    landing = parent.resolve() / target.name
    for what, run in runs:
        root = Path(run).resolve() if run else None
        if root is not None and (landing == root or root in landing.parents):
            raise UserError(f"{flag} {path} lies inside the {what} run {run}: writing it there would change the "
                            "run; write the report outside every run directory")
    if not parent.is_dir():
        why = "does not exist" if not parent.exists() else "is not a directory"
        raise UserError(f"cannot write {flag} {path}: {parent} {why}")
    why = refuses_new(parent)  # the directory must take a new file (the report's temporary one)
    if why is not None:
        raise UserError(f"cannot write {flag} {path}: directory {parent} takes no new files{why}")


def refuses_new(directory: str | os.PathLike, what: str = "file") -> str | None:
    """None where `directory` takes a new `what` ("file" or "directory"; one is made and removed at
    once: os.access cannot say it for root), else why, to append to a message: "" for a filesystem
    of the kernel's own (/proc, /sys) that makes none, else the reason in parentheses (read-only...)."""
    try:
        if what == "file":
            fd, probe = tempfile.mkstemp(prefix=".layerwise-probe.", dir=directory)
            os.close(fd)
            os.unlink(probe)
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".layerwise-probe.", dir=directory))
    except OSError as err:  # ENOENT: the kernel's own filesystems make no files
        return "" if err.errno == errno.ENOENT else f" ({io_reason(err)})"
    return None
