"""The run directory: captured tensors on disk, an open format other engines can write too.

    RUN/
      intent.json                       what this run is (model, settings, prompts); written first
      tensors/p00000/model.layers.7.safetensors   one file per (prompt, module group)
      manifest.json                     written LAST: its presence means the run is complete

Tensors are safetensors (no pickle), named `<module path>:<role>` (`model.layers.7:output`),
stored per prompt without batch dimension or padding ([seq, hidden]). Every file is written to a
temporary name and renamed, and carries each tensor's sha256 in its own header metadata, so a
run killed at any point holds only whole files and no manifest, and a resumed run recomputes
only what is missing. docs/FORMAT.md is the specification; test_runs.py pins it.

`RunWriter` streams files from a background thread pool behind a bounded queue (backpressure,
never unbounded RAM). `open_run` reads lazily: one tensor at a time, verified on read;
`read_units` reads several runs side by side, the next tensors while the current ones are used.
Nothing here knows about models or GPUs.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import logging
import os
import platform
import queue
import re
import shutil
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from . import tensorfile
from .atomic import io_reason, is_io_error, write_text_atomic
from .errors import UserError
from .names import Layout, model_order_key, split_name

log = logging.getLogger(__name__)

FORMAT = "layerwise-run"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INTENT = "intent.json"
TENSOR_DIR = "tensors"
QUEUE_DEPTH = 16  # files waiting for the writer threads; a full queue makes `put` wait
def prompt_dir(prompt: int) -> str:
    return f"{TENSOR_DIR}/p{prompt:05d}"


def group_file(prompt: int, group: str) -> str:
    """Relative path of the file holding one module group's tensors for one prompt."""
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", group):
        raise ValueError(f"group name {group!r} is not a safe file name")
    return f"{prompt_dir(prompt)}/{group}.safetensors"


def library_versions() -> dict:
    """The versions of Python and the libraries that shape a run's numbers (recorded beside it)."""
    out = {"python": platform.python_version()}
    for package in ("layerwise", "torch", "transformers", "accelerate", "safetensors"):
        try:
            out[package] = md.version(package)
        except md.PackageNotFoundError:
            out[package] = None
    return out


# ------------------------------------------------------------------------------------- writing

@dataclass(frozen=True)
class Intent:
    """What a run is (intent.json, written first): its producer, model, settings and prompts, and
    for some producers the reference it replays, the model's layout ("anatomy"), the numerics
    fixes and library versions. Only model (less its path), settings and prompts decide whether
    an existing run is the same one (resumed) or another (refused)."""

    producer: str
    model: dict
    settings: dict
    prompts: list
    reference: dict | None = None
    anatomy: dict | None = None
    fixes: list | None = None
    versions: dict | None = None

    def as_dict(self) -> dict:
        """The JSON object, keys in the order the format shows them; absent parts left out."""
        keys = ("producer", "model", "settings", "reference", "anatomy", "prompts", "fixes", "versions")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


class RunWriter:
    """Streams tensor files into a run directory; `finish` writes the manifest last.

    `intent` says what the run is; an existing directory with a different intent is refused
    (unless `overwrite`), one with the same intent is resumed: `has(prompt, group)` says which
    files already exist so the caller skips that work. `put` hands a group of CPU tensors to a
    pool of writer threads through a queue of `queue_depth` groups: when the disk is slower
    than the producer, `put` blocks (backpressure) instead of growing host memory.
    """

    def __init__(self, path: str | os.PathLike, intent: Intent | dict, overwrite: bool = False,
                 threads: int | None = None, queue_depth: int = QUEUE_DEPTH):
        threads = threads or max(2, min(8, (os.cpu_count() or 2)))
        self.path = Path(path)
        self.intent = intent.as_dict() if isinstance(intent, Intent) else intent
        self._prepare(overwrite)
        self._existing = {str(p.relative_to(self.path)) for p in (self.path / TENSOR_DIR).glob("p*/*.safetensors")}
        self.written: set[str] = set()  # files this writer wrote (relative paths)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_depth)
        self._error: BaseException | None = None
        self._bytes = 0
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._work, name=f"layerwise-writer-{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    def _prepare(self, overwrite: bool) -> None:
        path = self.path
        if path.exists() and not path.is_dir():
            raise UserError(f"output path {path} is a file: pass a directory for the run")
        if path.is_dir() and any(path.iterdir()):
            old = path / INTENT
            if overwrite:
                if not old.is_file() and not (path / MANIFEST).is_file():
                    raise UserError(f"{path} is not empty and not a layerwise run: refusing to delete it, "
                                    "pick another --out")
                shutil.rmtree(path)
            elif not old.is_file():
                raise UserError(f"{path} is not empty and not a layerwise run: pick another --out")
            else:
                previous = json.loads(old.read_text())
                if _identity(previous) != _identity(self.intent):
                    what = _first_difference(_identity(previous), _identity(self.intent))
                    raise UserError(f"{path} holds a run with different {what}: pass --overwrite to replace "
                                    "it, or pick another --out")
                (path / MANIFEST).unlink(missing_ok=True)  # resuming: the run is incomplete until finish()
        path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path / INTENT, json.dumps(self.intent, indent=1, default=str) + "\n")

    def has(self, prompt: int, group: str) -> bool:
        return group_file(prompt, group) in self._existing

    def put(self, prompt: int, group: str, tensors: dict[str, torch.Tensor], on_written=None) -> None:
        """Queue one file; blocks while `queue_depth` files wait. `on_written()` runs once the
        tensors were written (the producer may then reuse their memory)."""
        self._raise_if_failed()
        self._queue.put((prompt, group, tensors, on_written))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                prompt, group, tensors, on_written = item
                if self._error is None:
                    written = self._write(prompt, group, tensors)
                    with self._lock:
                        self._bytes += written
                if on_written is not None:
                    on_written()
            except BaseException as err:  # surfaced to the producer by put()/finish()
                self._error = self._error or err
            finally:
                self._queue.task_done()

    def _write(self, prompt: int, group: str, tensors: dict[str, torch.Tensor]) -> int:
        rel = group_file(prompt, group)
        target = self.path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{threading.get_ident()}.tmp")
        try:
            written = tensorfile.write_file(tmp, tensors, {"prompt": str(prompt)})
            os.replace(tmp, target)
            self.written.add(rel)  # one call under the GIL: safe from several writer threads
        except BaseException as err:
            tmp.unlink(missing_ok=True)
            if is_io_error(err):
                raise UserError(f"cannot write {target}: {io_reason(err)} (is the disk full?); "
                                "the run is left incomplete, rerun the same command to resume") from None
            raise
        return written

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            self._stop()
            raise err

    def _stop(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()
        self._threads = []

    def wait(self) -> None:
        """Block until every queued file is on disk."""
        self._queue.join()
        self._raise_if_failed()

    @property
    def bytes_written(self) -> int:
        return self._bytes

    def close(self) -> None:
        """Wait until every queued file is on disk and stop the writers, without a manifest."""
        self.wait()
        self._stop()

    def finish(self, extra: dict | None = None, entries: list[dict] | None = None) -> dict:
        """Wait for the writers, index the files (or take `entries`), write manifest.json last."""
        self.close()
        manifest = build_manifest(self.path, self.intent, extra or {}, entries)
        write_text_atomic(self.path / MANIFEST, json.dumps(manifest, indent=1, default=str) + "\n")
        return manifest

    def abort(self) -> None:
        """Stop writing; whatever was written stays (for a resume), no manifest is written."""
        if self._threads:
            self._error = self._error or RuntimeError("aborted")
            while True:  # drop queued work so the writers see the stop marks
                try:
                    self._queue.get_nowait()
                    self._queue.task_done()
                except queue.Empty:
                    break
            self._stop()


def _identity(intent: dict) -> dict:
    """The parts of an intent that must match for a run to be resumed: the model (by its config,
    not by where its files happen to be), the settings and the prompts."""
    model = {k: v for k, v in (intent.get("model") or {}).items() if k != "path"}
    return {"model": model, "settings": intent.get("settings"), "prompts": intent.get("prompts")}


def _first_difference(a: dict, b: dict) -> str:
    for key in a:
        if a[key] != b[key]:
            if isinstance(a[key], dict) and isinstance(b[key], dict):
                for sub in sorted(set(a[key]) | set(b[key])):
                    if a[key].get(sub) != b[key].get(sub):
                        return f"{key} {sub}"
            return key
    return "settings"


def index_files(path: Path, files: Iterable[str] | None = None) -> list[dict]:
    """Manifest entries (headers only) of a run's tensor files: `files` (relative paths), else all."""
    entries = []
    every = (str(f.relative_to(path)) for f in (path / TENSOR_DIR).glob("p*/*.safetensors"))
    for rel in sorted(every if files is None else files):
        prompt = int(Path(rel).parent.name[1:])
        for name, (shape, dtype, digest) in tensorfile.read_index(path / rel).items():
            module, role = split_name(name)
            entries.append({"name": name, "module": module, "role": role, "prompt": prompt, "shape": shape,
                            "dtype": tensorfile.dtype_name(dtype), "file": rel, "sha256": digest})
    return entries


def build_manifest(path: Path, intent: dict, extra: dict, entries: list[dict] | None = None) -> dict:
    """The manifest of a run: `entries` (default: every tensor file indexed, headers only) in model order."""
    layout = Layout.of(intent.get("anatomy"))
    entries = index_files(path) if entries is None else list(entries)
    entries.sort(key=lambda e: (e["prompt"], model_order_key(e["name"], layout.layers_path, layout.embed,
                                                             layout.norm, layout.head)))
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **intent, **extra, "tensors": entries,
    }


# ------------------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class TensorEntry:
    name: str
    module: str
    role: str
    prompt: int
    shape: tuple[int, ...]
    dtype: str
    file: str
    sha256: str | None

    @property
    def nbytes(self) -> int:
        return tensorfile.nbytes(self.shape, self.dtype)


class Run:
    """A complete run, opened lazily: the manifest is read, tensors only when asked for."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self._entries = {(e["name"], e["prompt"]): TensorEntry(
            e["name"], e["module"], e["role"], e["prompt"], tuple(e["shape"]), e["dtype"], e["file"], e.get("sha256"))
            for e in manifest["tensors"]}
        names: dict[str, None] = {}
        for e in manifest["tensors"]:
            names.setdefault(e["name"], None)
        self._names = list(names)

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

    def tensor(self, name: str, prompt: int = 0, verify: bool = True, device: str = "cpu") -> torch.Tensor:
        """One tensor, read without loading the rest of its file; sha256-checked when `verify`."""
        e = self.entry(name, prompt)
        file = self.path / e.file
        try:
            tensor = tensorfile.read_tensor(file, name, device)
        except (OSError, ValueError, Exception) as err:  # safetensors raises its own error type
            if isinstance(err, UserError):
                raise
            raise UserError(f"cannot read {name} from {file}: {err} (the run is corrupt; re-extract it)") from None
        if verify and e.sha256 and tensorfile.sha256_of(tensor) != e.sha256:
            raise UserError(f"tensor {name} in {file} fails its sha256 check: the file is corrupt, re-extract it")
        return tensor


def read_units(runs: dict[str, Run | None], units: Iterator[tuple[int, tuple[str, ...]]], verify: bool = True,
               prefetch: bool = True) -> Iterator[tuple[int, tuple[str, ...], dict]]:
    """Read several runs unit by unit: for each (prompt, names) of `units`, yield (prompt, names,
    {(side, name): tensor}) with the tensors of every run (by side) that holds them. With
    `prefetch`, worker threads read and verify the next unit while the caller works on this
    one, so at most two units are in memory; a unit is released before the next is read."""
    pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="layerwise-compare")

    def submit(p: int, unit: tuple[str, ...]) -> dict:
        return {(side, name): pool.submit(run.tensor, name, p, verify)
                for name in unit for side, run in runs.items() if run is not None and run.has(name, p)}

    try:
        following = next(units, None)
        pending = submit(*following) if following else {}
        while following is not None:
            p, unit = following
            current, following = pending, next(units, None)
            if prefetch and following:
                pending = submit(*following)
            tensors = {key: future.result() for key, future in current.items()}
            current.clear()  # the futures hold the tensors too
            yield p, unit, tensors
            tensors.clear()  # release this unit before the next one is read
            if not prefetch and following:
                pending = submit(*following)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


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
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{manifest_path} is not valid JSON ({err.msg}): the run is corrupt") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{manifest_path} is not a layerwise run manifest")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"run {path} has format version {manifest['format_version']}; this layerwise reads "
                        f"up to {FORMAT_VERSION}: upgrade layerwise")
    return Run(path, manifest)
