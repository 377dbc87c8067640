"""Reading a complete run: `open_run` checks its manifest and opens it lazily; `Run.tensor` reads
one tensor without the rest of its file, verified against the manifest's and the file's own
digests. The format: docs/FORMAT.md (runs.py writes it). Nothing here knows about models or GPUs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import tensorfile
from .errors import UserError
from .tolerances import DTYPE_NAMES
from .manifest import FORMAT, FORMAT_VERSION, INTENT, MANIFEST, entry_digests
from .paths import inside
from .schema import check_manifest


STORED_DTYPES = frozenset(tensorfile.DTYPE_NAMES)  # the torch dtype names a run's files hold
# What to do about a corrupt run, by its producer (a run is extracted or imported, never downloaded).
REMEDIES = {"layerwise import": "re-import", "layerwise test": "rerun the layer test that wrote"}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    module: str
    role: str
    prompt: int
    shape: tuple[int, ...]
    dtype: str
    file: str
    digests: tuple[tuple[str, str], ...]  # (algorithm, hex digest): ("blake3", "…"), FORMAT.md

    @property
    def nbytes(self) -> int:
        return tensorfile.nbytes(self.shape, self.dtype)


class Run:
    """A complete run, opened lazily: the manifest is read, tensors only when asked for."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self._files: dict[str, Path] = {}
        self._entries = {(e["name"], e["prompt"]): TensorEntry(
            e["name"], e["module"], e["role"], e["prompt"], tuple(e["shape"]), e["dtype"], e["file"], entry_digests(e))
            for e in manifest["tensors"]}
        self._names = list(dict.fromkeys(e["name"] for e in manifest["tensors"]))
        self.remedy = REMEDIES.get(manifest.get("producer"), "re-extract")  # what to do about a corrupt run
        self.fix = f"{self.remedy} it"
        self.file_kind = ("run file", f"the run is corrupt, {self.fix}")  # tensorfile.read_header's `kind`

    @property
    def prompts(self) -> list[dict]:
        return self.manifest.get("prompts", [])

    @property
    def names(self) -> list[str]:
        """Tensor names in model order."""
        return list(self._names)

    def entry(self, name: str, prompt: int) -> TensorEntry:
        try:
            return self._entries[(name, prompt)]
        except KeyError:
            raise UserError(f"run {self.path} has no tensor {name} for prompt {prompt}") from None

    def has(self, name: str, prompt: int) -> bool:
        return (name, prompt) in self._entries

    def entries(self) -> list[TensorEntry]:
        return list(self._entries.values())

    def file(self, rel: str) -> Path:
        """A file the manifest names, refused unless it resolves inside the run (symlinks too)."""
        path = self._files.get(rel)
        if path is None:
            path = self._files[rel] = inside(self.path, rel, f"run {self.path}")
        return path

    def tensor(self, name: str, prompt: int = 0, verify: bool = True, device: str = "cpu") -> torch.Tensor:
        """One tensor, read without loading the rest of its file. With `verify`, its digest must
        match the manifest's and its own file header's (a checksum deleted from one still leaves
        the other; a tensor with neither is refused). A big tensor's digest is hashed on
        several threads."""
        e = self.entry(name, prompt)
        file = self.file(e.file)
        try:
            tensor, stored = tensorfile.read_tensor_and_digests(file, name, device, self.file_kind)
        except (OSError, ValueError, Exception) as err:  # safetensors raises its own error type
            if isinstance(err, UserError):
                raise
            raise self.read_failure(name, file, err) from None
        self.check_stored(e, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), file)
        if verify:
            claims = e.digests + tuple(stored.items())
            if not claims:
                raise UserError(f"tensor {name} in {file} has no digest in the manifest or in its file: it cannot "
                                f"be verified ({self.remedy} the run, or pass --no-verify to read it "
                                "unchecked)")
            if not tensorfile.digests_hold(tensor, claims):
                raise self.digest_failure(name, file)
        return tensor

    def check_stored(self, e: TensorEntry, dtype: str, shape: tuple[int, ...], file: Path) -> None:
        """The tensor `e` as its file stores it (torch dtype name, shape) must be what the manifest says."""
        if (dtype, tuple(shape)) != (e.dtype, e.shape):
            raise UserError(f"{self.path / MANIFEST} says tensor {e.name} (prompt {e.prompt}) is {e.dtype} "
                            f"{list(e.shape)}, but {file} holds {dtype} {list(shape)}: the run was edited or is "
                            f"corrupt, {self.fix}")

    def read_failure(self, name: str, file, err: BaseException | str) -> UserError:
        """The error of a tensor that cannot be read from its file (`err`: why)."""
        return UserError(f"cannot read {name} from {file}: {err} (the run is corrupt; {self.fix})")

    def digest_failure(self, name: str, file) -> UserError:
        """The error of a tensor whose bytes do not match a digest claimed for them."""
        return UserError(f"tensor {name} in {file} fails its digest check: the file is corrupt, {self.fix}")


def open_run(path: str | os.PathLike) -> Run:
    """Open a complete run; a directory that is not one, or not yet complete, is a UserError."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a run directory" + (" (it does not exist)" if not path.exists() else ""))
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        if (path / INTENT).is_file():
            raise UserError(f"run {path} is incomplete (no {MANIFEST}): rerun the command that made it to resume")
        raise UserError(f"{path} is not a layerwise run (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        why = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8"
        raise UserError(f"{manifest_path} is not valid JSON ({why}): the run is corrupt") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{manifest_path} is not a layerwise run manifest")
    return Run(path, check_manifest(manifest, str(manifest_path), FORMAT_VERSION, tensorfile.DIGESTS,
                                    STORED_DTYPES, DTYPE_NAMES))
