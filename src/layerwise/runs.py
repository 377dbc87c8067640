"""The run directory: captured tensors on disk, an open format other engines can write too.

    RUN/
      intent.json                       what this run is (model, settings, prompts); written first
      tensors/p00000/model.layers.7.safetensors   one file per (prompt, module group)
      manifest.json                     written LAST: its presence means the run is complete

Tensors are safetensors (no pickle), named `<module path>:<role>` (`model.layers.7:output`),
stored per prompt without batch dimension or padding ([seq, hidden]). Every file is written to a
temporary name and renamed, and carries each tensor's digest in its own header metadata, so a
run killed at any point holds only whole files and no manifest, and a resumed run recomputes
only what is missing. docs/FORMAT.md is the specification; test_runs.py pins it.

`RunWriter` streams files from a background thread pool behind a bounded queue (backpressure,
never unbounded RAM); `open_run` (runread.py) reads a run lazily, one tensor at a time, verified.
Nothing here knows about models or GPUs.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import shutil
import threading
import time
from pathlib import Path

import torch

from . import tensorfile, writerproc
from .atomic import io_reason, is_io_error, swap_directories, write_text_atomic
from .errors import UserError
from .manifest import (FORMAT, FORMAT_VERSION, INTENT, MANIFEST, TENSOR_DIR, Intent,  # noqa: F401 (the format's names)
                       ManifestDraft, build_manifest, file_entries, first_difference, identity, index_files,
                       item_text, json_text, library_versions, read_json, tensor_files)
from .runread import Run, TensorEntry, open_run  # noqa: F401 (the run format's reader, runread.py)
from .writerproc import writer_threads  # noqa: F401 (the writer's default thread count)

log = logging.getLogger(__name__)

QUEUE_DEPTH = 16  # files waiting for the writer threads; a full queue makes `put` wait


def prompt_dir(prompt: int) -> str:
    return f"{TENSOR_DIR}/p{prompt:05d}"


_GROUPS_CHECKED: set[str] = set()  # module groups found fit for a file name (checked once each)


def group_file(prompt: int, group: str) -> str:
    """Relative path of the file holding one module group's tensors for one prompt."""
    if group not in _GROUPS_CHECKED:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", group) or group.strip(".") == "":
            raise UserError(f"tensors of module {group!r} would go to a file outside the run's directory "
                            "(a module path holds only letters, digits, '_', '-' and '.'): rename them (--rename)")
        _GROUPS_CHECKED.add(group)
    return f"{prompt_dir(prompt)}/{group}.safetensors"


# ------------------------------------------------------------------------------------- writing

class RunWriter:
    """Streams tensor files into a run directory; `finish` writes the manifest last.

    `intent` says what the run is; an existing directory with a different intent is refused
    (unless `overwrite`), one with the same intent is resumed: `has(prompt, group)` says which
    files already exist so the caller skips that work. `put` hands a group of CPU tensors to the
    writer's own process (writerproc), else to a pool of writer threads, `queue_depth` groups
    waiting at most: when the disk is slower than the producer, `put` blocks (backpressure).
    """

    def __init__(self, path: str | os.PathLike, intent: Intent | dict, overwrite: bool = False,
                 threads: int | None = None, queue_depth: int = QUEUE_DEPTH, intent_later: bool = False):
        procs = writerproc.processes(threads)  # where files whose tensors lie in shared memory are written
        threads = threads or writer_threads()
        self._handoff = writerproc.Handoff(procs, queue_depth + sum(p.threads for p in procs)) if procs else None
        self.target = self.path = Path(path)  # path: where files go, beside the target when replacing a run
        self._replaced: Path | None = None  # the old run's directory, when the new one is written beside it
        self.intent = intent.as_dict() if isinstance(intent, Intent) else intent
        self._known: dict = {}  # the intent's lists' texts (json_text), made once: the manifest holds them too
        self._intent_job: threading.Thread | None = None  # writing intent.json (`intent_later`)
        self._intent_error: BaseException | None = None
        try:
            self._prepare(overwrite, intent_later)
        except OSError as err:
            raise UserError(f"cannot write the run {self.target}: {io_reason(err)} ({err.filename or self.path}); "
                            "pick a writable --out") from None
        self._existing = set(tensor_files(self.path))
        self._headers: dict[str, dict] = {}  # the files this writer wrote (relative paths): their headers, as written
        self._index: dict[str, list[dict]] = {}  # their manifest entries, each file's made once (by its writer process, else `_index_new`)
        self._texts: dict[tuple[str, str], str] = {}  # (file, name) -> that entry's text in the manifest
        self._dirs: set[str] = set()  # the prompt directories made so far (relative)
        self._root = os.path.abspath(self.path)  # files go there (a writer process has another working directory)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_depth)
        self._error: BaseException | None = None
        self._bytes, self._lock = 0, threading.Lock()
        self._thread_count, self._threads = threads, []  # this process's writer threads, started by `put`

    def _prepare(self, overwrite: bool, later: bool) -> None:
        path = self.path
        if path.exists() and not path.is_dir():
            raise UserError(f"output path {path} is a file: pass a directory for the run")
        if path.is_dir() and any(path.iterdir()):
            old = path / INTENT
            if overwrite:
                if not old.is_file() and not (path / MANIFEST).is_file():
                    raise UserError(f"{path} is not empty and not a layerwise run: refusing to delete it, "
                                    "pick another --out")
                self.path = path = self._staging()  # the old run stays whole until the new one is
            elif not old.is_file():
                raise UserError(f"{path} is not empty and not a layerwise run: pick another --out")
            else:
                previous = read_json(old)
                if identity(previous) != identity(self.intent):
                    what = first_difference(identity(previous), identity(self.intent))
                    raise UserError(f"{path} holds a run with different {what}: pass --overwrite to replace "
                                    "it, or pick another --out")
                (path / MANIFEST).unlink(missing_ok=True)  # resuming: the run is incomplete until finish()
        path.mkdir(parents=True, exist_ok=True)
        if later:  # its text (16 prompts of 4096 token ids: 7 ms) and fsync beside the first forward pass
            self._intent_job = threading.Thread(target=self._write_intent, name="layerwise-intent")
            self._intent_job.start()
        else:
            write_text_atomic(path / INTENT, json_text(self.intent, self._known))

    def _write_intent(self) -> None:
        try:  # the GIL handed back after each prompt's text: the forward pass launches meanwhile
            write_text_atomic(self.path / INTENT, json_text(self.intent, self._known, between=lambda: time.sleep(0)))
        except BaseException as err:
            self._intent_error = err

    def intent_written(self) -> None:
        """Wait until intent.json is on disk (written in the background with `intent_later`: it
        lands before any tensor file, which waits for it here); raise what stopped it."""
        if self._intent_job is not None:
            self._intent_job.join()
        err = self._intent_error  # raised to every caller (the writer's threads, then finish)
        if err is not None and not is_io_error(err):
            raise err
        if err is not None:
            raise UserError(f"cannot write the run {self.target}: {io_reason(err)} ({self.path / INTENT}); "
                            "pick a writable --out") from None

    def restate(self, intent: Intent | dict) -> None:
        """Rewrite intent.json: for a producer that learns part of what the run is while recording
        (the vLLM hook learns the prompts as requests arrive). Before `finish`."""
        self.intent_written()
        self.intent = intent.as_dict() if isinstance(intent, Intent) else intent
        write_text_atomic(self.path / INTENT, json_text(self.intent, self._known))

    def _staging(self) -> Path:
        """Where a run replacing another is written: beside it, resumed when a killed replacement
        of the same intent left it there, else emptied."""
        self._replaced = self.target.resolve()  # a link to a run: replace the run, keep the link
        staging = self._replaced.with_name(f".{self._replaced.name}.replacing")
        if staging.is_dir() and any(staging.iterdir()):
            if not (staging / INTENT).is_file():
                raise UserError(f"{staging} is in the way of replacing {self.target} and is not a layerwise run: "
                                "remove it")
            if identity(read_json(staging / INTENT)) != identity(self.intent):
                shutil.rmtree(staging)
            else:
                (staging / MANIFEST).unlink(missing_ok=True)
        return staging

    def has(self, prompt: int, group: str) -> bool:
        return group_file(prompt, group) in self._existing

    def put(self, prompt: int, group: str, tensors: dict[str, torch.Tensor], on_written=None,
            finite=frozenset()) -> None:
        """Queue one file; blocks while `queue_depth` files wait. `on_written()` runs once the
        tensors were written (the producer may then reuse their memory). The writer process
        (writerproc) writes it where it can, else this process's writer threads. `finite`: names
        of tensors known to hold no NaN/Inf (the capture's GPU found them so), not checked again."""
        self.put_many([(prompt, group, tensors, on_written, finite)])

    def put_many(self, files: list[tuple]) -> None:
        """`put` of each (prompt, group, tensors, on_written, finite): to the writer processes in
        one message to each (a flush's files), the rest to this process's threads."""
        self._raise_if_failed()
        handed = [False] * len(files)
        if self._handoff is not None:
            rels = [group_file(prompt, group) for prompt, group, *_ in files]
            handed = self._handoff.put_many([
                (self._made(rel), {"prompt": str(prompt)}, tensors, self._reply_to(rel, on_written), finite, rel)
                for rel, (prompt, group, tensors, on_written, finite) in zip(rels, files)])
        for item, ok in zip(files, handed):
            if ok:
                continue
            with self._lock:  # this process's threads start with the first file they are handed (beside a writer
                if not self._threads:  # process: only for tensors outside shared memory, so mostly never)
                    self._threads = [threading.Thread(target=self._work, name=f"layerwise-writer-{i}", daemon=True)
                                     for i in range(self._thread_count)]
                    for t in self._threads:
                        t.start()
            self._queue.put(tuple(item))

    def _reply_to(self, rel: str, on_written):
        return lambda header, err, indexed: self._handed(rel, header, err, on_written, indexed)

    def _handed(self, rel: str, header: dict | None, err: BaseException | None, on_written,
                indexed: tuple[list[dict], list[str]] | None) -> None:
        """The writer process wrote file `rel` (its header, with "__metadata__", and its manifest
        entries with their texts, made there: none of this process's GIL), or failed (`err`)."""
        try:
            if err is None:
                if indexed is not None:
                    entries, texts = indexed
                    self._texts.update(zip([(rel, e["name"]) for e in entries], texts))
                    self._index[rel] = entries
                self._headers[rel] = header
                size = sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values() if "dtype" in e)
                with self._lock:
                    self._bytes += size
            else:
                self._error = self._error or (_write_failed(self.path / rel, err) if is_io_error(err) else err)
        finally:
            if on_written is not None:
                on_written()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                prompt, group, tensors, on_written, finite = item
                if self._error is None:
                    written = self._write(prompt, group, tensors, finite)
                    with self._lock:
                        self._bytes += written
                if on_written is not None:
                    on_written()
            except BaseException as err:  # surfaced to the producer by put()/finish()
                self._error = self._error or err
            finally:
                self._queue.task_done()

    def _write(self, prompt: int, group: str, tensors: dict[str, torch.Tensor], finite=frozenset()) -> int:
        rel = group_file(prompt, group)
        target = Path(self._made(rel))
        tmp = target.with_name(f".{target.name}.{threading.get_ident()}.tmp")
        header: dict = {}
        try:  # the model's own NaN/Inf are counted into the metadata: recorded, reported, never hidden
            written = tensorfile.write_file(tmp, tensors, {"prompt": str(prompt)}, header, nonfinite=True,
                                            finite=finite)
            os.replace(tmp, target)
            self._headers[rel] = header  # one call under the GIL: safe from several writer threads
        except BaseException as err:
            tmp.unlink(missing_ok=True)
            if is_io_error(err):
                raise _write_failed(target, err) from None
            raise
        return written

    def _made(self, rel: str) -> str:
        """The absolute path of file `rel`, its folder made (once: a system call less per file;
        strings, not Path objects: `put` runs on the thread the forward pass shares the GIL with)."""
        folder, _, _ = rel.rpartition("/")
        if folder not in self._dirs:  # the first file of all among them: after intent.json
            self.intent_written()
            try:
                (self.path / folder).mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise _write_failed(self.path / rel, err) from None
            self._dirs.add(folder)
        return f"{self._root}/{rel}"

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
        if self._handoff is not None:
            self._handoff.wait()
        self._raise_if_failed()

    @property
    def bytes_written(self) -> int:
        return self._bytes

    def close(self) -> None:
        """Wait until every queued file is on disk and stop the writers, without a manifest (a
        writer process's files were indexed for it as their replies came)."""
        self.wait()
        self._stop()

    def _index_new(self) -> None:
        """The manifest entries and their texts of the files not indexed yet: those this
        process's writer threads wrote (a writer process's came with its replies)."""
        for rel in self._headers.keys() - self._index.keys():
            header = dict(self._headers[rel])
            self._index[rel] = entries = file_entries(rel, header, header.pop("__metadata__"))
            self._texts.update(((rel, e["name"]), item_text(e)) for e in entries)

    @property
    def written(self) -> set[str]:
        """The files this writer wrote (relative paths)."""
        return set(self._headers)

    def entries(self, every: bool = True) -> list[dict]:
        """The manifest entries of the files this writer wrote, from the headers it wrote, and
        (`every`) those of the run's other files (a resumed run's), read from their headers; after
        `close`."""
        self._index_new()
        entries = [e for rel in sorted(self._index) for e in self._index[rel]]
        others = sorted(self._existing - self._headers.keys()) if every else []  # the files found at the start
        return entries + index_files(self.path, others)

    def finish(self, extra: dict | None = None, entries: list[dict] | None = None, late=None) -> dict:
        """Wait for the writers, take the files' entries (or `entries`), write manifest.json last;
        `late()`: items for the manifest's stats known only once every file is written (the bytes).
        The entries of the files written so far are put in model order and made into text while
        the last files are written (`_draft`), theirs after; the intent's lists (the prompts' token
        ids) were made into text for intent.json, each file's entries as its writer process
        replied: the manifest reuses both texts."""
        self.intent_written()
        draft = ManifestDraft(self.intent)
        drafted = self._draft(draft) if entries is None else set()
        self.close()
        extra = extra or {}
        if late is not None:
            extra = {**extra, "stats": {**(extra.get("stats") or {}), **late()}}
        manifest = self._drafted(draft, drafted, entries, extra)
        known = self._known  # the intent's lists, as intent.json holds them (the producer changed none since)
        known["tensors"] = (manifest["tensors"], draft.text())
        write_text_atomic(self.path / MANIFEST, json_text(manifest, known))
        if self._replaced is not None:
            self._replace_target()
        return manifest

    def _draft(self, draft: ManifestDraft) -> set[str]:
        """The entries of the files written so far (their replies taken in) into `draft`, while
        the last files are written; the files drafted."""
        self._index_new()  # this process's writer threads' files (a writer process's came indexed)
        done = list(self._index.items())  # one call: the threads taking the replies add to it meanwhile
        draft.add([e for _, entries in done for e in entries], self._texts)
        draft.encode()
        return {rel for rel, _ in done}

    def _drafted(self, draft: ManifestDraft, drafted: set[str], entries: list[dict] | None, extra: dict) -> dict:
        """The manifest, once every file is written: `draft` with the entries not in it yet (the
        files' not `drafted`, a resumed run's earlier files'), or with `entries`."""
        if entries is not None:
            draft.add(entries, self._texts)
        else:
            self._index_new()
            draft.add([e for rel in sorted(self._index.keys() - drafted) for e in self._index[rel]], self._texts)
            draft.add(index_files(self.path, sorted(self._existing - self._headers.keys())))
        return draft.manifest(extra)

    def _replace_target(self) -> None:
        """The new run is complete beside the old one: swap them, then remove the old one."""
        try:
            swap_directories(self.path, self._replaced)
        except OSError as err:
            raise UserError(f"the new run is complete in {self.path} but cannot replace {self.target}: "
                            f"{io_reason(err)}; move it there by hand") from None
        old, self.path = self.path, self._replaced
        try:
            shutil.rmtree(old)
        except OSError as err:
            raise UserError(f"the new run is complete in {self.target}, but the old one, moved to {old}, cannot be "
                            f"removed ({io_reason(err)}): remove it by hand") from None

    def abort(self) -> None:
        """Stop writing; whatever was written stays (for a resume), no manifest is written."""
        if self._intent_job is not None:
            self._intent_job.join()  # whole or not there: never written after this returns
        if self._threads:
            self._error = self._error or RuntimeError("aborted")
            while True:  # drop queued work so the writers see the stop marks
                try:
                    self._queue.get_nowait()
                    self._queue.task_done()
                except queue.Empty:
                    break
            self._stop()


def _write_failed(target: Path, err: BaseException) -> UserError:
    return UserError(f"cannot write {target}: {io_reason(err)} (is the disk full?); "
                     "the run is left incomplete, rerun the same command to resume")
