"""Paths read from files, kept inside their root: a run's tensor files, a checkpoint's shards,
an import source's tensors.

A name read from a file (a manifest's `file`, an index's `weight_map` value) or found by listing
a directory is joined to its root and resolved on disk, symlinks followed; what lands outside
the root is refused in one line (exit 2), before anything is opened. A Hugging Face cache
snapshot links its files to the repository's `blobs/`: its root is the repository.
"""

from __future__ import annotations

from pathlib import Path

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
