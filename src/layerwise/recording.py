"""One run being recorded, from its intent to its manifest: the lifecycle every producer shares.

`Recording(out, intent, targets)` opens the run's writer (runs.RunWriter: intent.json first,
written by a thread of its own beside the first forward pass and before any tensor file; an
existing run of the same intent resumed) and, for capture `targets`, the sink behind the hooks
(collector.Collector). The producer (extract, streaming, replay, import) runs its forward passes
inside `with recording:`, then calls `close_capture()` (every captured tensor reaches the writer)
and `finish(extra)`, which writes the manifest last. An exception leaving the block stops the
sink and the writer: the files already written stay, no manifest is written, and rerunning the
same command resumes. `model_record` and `config_sha256` say which model a run is of.

Under torchrun (`ranks`, distributed.py) every rank records into the same run directory: the
ranks first agree on the intent, rank 0 opens the run (replacing or resuming it) before the
others join it, and `finish` is collective: each rank drains its writer (its files renamed into
place), rank 0 gathers every rank's index, checks that no file is missing and writes the one
manifest. A rank that fails never reaches that point, so the run keeps no manifest and resumes.

Knows nothing about how the forward passes run: the producers bring those.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import models, timings
from .capture import Target, groups_of
from .collector import PINNED_BUDGET_BYTES, Collector
from .distributed import Session
from .formatting import plural
from .manifest import identity
from .names import Layout, layer_of, model_order_key, split_name
from .runs import QUEUE_DEPTH, Intent, RunWriter, group_file


@dataclass(frozen=True)
class Progress:
    batch: int
    batches: int
    prompts_done: int
    prompts: int
    bytes_written: int
    seconds: float


@dataclass(frozen=True)
class ExtractResult:
    path: Path
    prompts: int
    tensors: int
    bytes: int  # written by this call (a resumed run skips what was already on disk)
    seconds: float
    forward_seconds: float  # time inside model forward calls (hooks included)
    resumed_batches: int  # batches found complete on disk and skipped
    peak_rss_bytes: int
    pinned_peak_bytes: int
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds else 0.0


def config_sha256(config) -> str:
    """A stable hash of a model config (its JSON without volatile fields)."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    for volatile in ("transformers_version", "_name_or_path", "_commit_hash", "_attn_implementation_autoset",
                     "dtype", "torch_dtype", "_attn_implementation", "attn_implementation"):
        data.pop(volatile, None)
    quant = data.get("quantization_config")
    if isinstance(quant, dict):  # what the checkpoint stores, not how a loader was told to run it
        data["quantization_config"] = {k: list(v) if isinstance(v, tuple) else v for k, v in quant.items()
                                       if k in ("quant_method", "activation_scheme", "weight_block_size")}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def model_record(ref, config, architecture: str, num_layers: int) -> dict:
    """The "model" of an intent: what the run is of (its config, not where its files are)."""
    return {"spec": ref.spec, "path": str(ref.path) if ref.path else None, "model_type": config.model_type,
            "architecture": architecture, "config_sha256": config_sha256(config), "num_layers": num_layers,
            "hidden_size": config.hidden_size}


def model_identity(spec: str) -> dict:
    """What every rank of a job must see alike of a model: its config (hash) and its weight files
    (names and sizes)."""
    ref = models.resolve_model(spec)
    if ref.path is None:
        files = {}
    elif ref.kind == "gguf":
        files = {ref.path.name: ref.path.stat().st_size}
    else:
        files = {f.name: f.stat().st_size for f in sorted(ref.path.glob("*.safetensors"))}
    return {"config_sha256": config_sha256(models.load_config(ref, check_quant=False).config), "weights": files}


class Recording:
    """A run being written: its writer, the capture sink (with `targets`), abort on error.

    `overwrite` replaces a different run in `out`; `writer_threads` / `queue_depth` size the
    writer, `pinned_budget_bytes` the sink's host buffers (runs.py, collector.py); `ranks`: every
    rank of this torchrun job writes into `out` (data parallel)."""

    def __init__(self, out: str | os.PathLike, intent: Intent | dict, targets: list[Target] | None,
                 overwrite: bool = False, writer_threads: int | None = None, queue_depth: int = QUEUE_DEPTH,
                 pinned_budget_bytes: int = PINNED_BUDGET_BYTES, ranks: Session | None = None):
        self.ranks = ranks if ranks is not None and ranks.world > 1 else None
        intent = intent.as_dict() if isinstance(intent, Intent) else intent
        self.groups = list(groups_of(targets or []))
        if self.ranks is None:  # intent.json written beside the first forward pass, before any tensor file
            self.writer = RunWriter(out, intent, overwrite, threads=writer_threads, queue_depth=queue_depth,
                                    intent_later=True)
        else:
            self.ranks.agree("the run to write", identity(intent))  # what decides resume vs refuse
            # rank 0 opens the run (replacing one is done beside it); the others write where it writes
            self.writer = self.ranks.main_first(lambda first: RunWriter(
                out, intent, overwrite, threads=writer_threads, queue_depth=queue_depth) if first else None)
            where = self.ranks.broadcast(str(self.writer.path) if self.ranks.is_main else None)
            if not self.ranks.is_main:
                self.writer = RunWriter(where, intent, False, threads=writer_threads, queue_depth=queue_depth)
        try:
            self.collector = Collector(self.writer, targets, pinned_budget_bytes) if targets is not None else None
        except BaseException:
            self.writer.abort()
            raise
        self.started = time.perf_counter()
        self.seconds = 0.0
        self.manifest: dict | None = None  # on rank 0 only, when several ranks record
        self.timings: dict[str, float] = {}  # where the producer's time went (this rank's), into the stats
        self.tensors = 0
        self.bytes = 0  # written by this call, every rank's

    def __enter__(self) -> Recording:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            if self.collector is not None:
                self.collector.abort()
            self.writer.abort()
        return False

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def close_capture(self) -> float:
        """Wait until every captured tensor reached the writer; returns the seconds since the start."""
        if self.collector is not None:
            self.collector.close()
        self.seconds = self.elapsed()
        timings.mark("capture closed")
        return self.seconds

    def _late(self) -> dict:
        """The stats known once every file is written: the bytes (a file still in a writer process
        is not counted before), and the process's stages with `files written` among them."""
        return {"bytes": self.writer.bytes_written, **self._written()}

    def _written(self) -> dict:
        """Every file is written: that stage marked, and the process's stages anew (where the
        producer put them into the stats)."""
        timings.mark("files written")
        return {"startup": timings.startup()} if "startup" in self.timings else {}

    def finish(self, extra: dict) -> dict | None:
        """Write the manifest last (with `extra` beside the intent); returns it (None on ranks
        other than 0). Collective when several ranks record."""
        capture = {**(self.collector.stats() if self.collector is not None else {}), **self.timings}
        if self.ranks is None:
            if capture:
                extra = {**extra, "stats": {**(extra.get("stats") or {}), **capture}}
            # the bytes once every file is written: a file still in a writer process is not counted yet
            self.manifest = self.writer.finish(extra, late=self._late)
            self.tensors, self.bytes = len(self.manifest["tensors"]), self.writer.bytes_written
            return self.manifest
        self.writer.close()  # this rank's files are all renamed into place
        mine = self.writer.entries(every=self.ranks.is_main)  # rank 0 also lists what a killed run left
        stats = {"rank": self.ranks.rank, "files": len(self.writer.written), "bytes": self.writer.bytes_written,
                 "seconds": self.seconds, **capture, **self._written()}
        gathered = self.ranks.gather((mine, stats))
        summary = None
        if self.ranks.is_main:
            entries = {(e["file"], e["name"]): e for part, _ in gathered for e in part}
            files = {file for file, _ in entries}
            missing = [group_file(p["index"], g) for p in self.writer.intent["prompts"] for g in self.groups
                       if group_file(p["index"], g) not in files]
            if missing:  # a bug, not bad input: never a manifest over a partial run
                raise RuntimeError(f"{len(missing)} tensor file(s) missing after every rank finished "
                                   f"(first: {missing[0]}): no manifest written")
            per_rank = [s for _, s in gathered]
            extra = {**extra, "stats": {**(extra.get("stats") or {}), "ranks": per_rank,
                                        "bytes": sum(s["bytes"] for s in per_rank)}}
            self.manifest = self.writer.finish(extra, list(entries.values()))
            summary = (len(self.manifest["tensors"]), extra["stats"]["bytes"])
        self.tensors, self.bytes = self.ranks.broadcast(summary)
        return self.manifest

    def result(self, prompts: int, forward_seconds: float, resumed_batches: int = 0) -> ExtractResult:
        return ExtractResult(
            path=self.writer.target, prompts=prompts, tensors=self.tensors,
            bytes=self.bytes, seconds=self.seconds, forward_seconds=forward_seconds,
            resumed_batches=resumed_batches, peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            pinned_peak_bytes=self.collector.pinned_peak_bytes if self.collector is not None else 0,
            notes=tuple(nonfinite_notes(self.manifest)),
        )


def nonfinite_notes(manifest: dict | None) -> list[str]:
    """What a run's manifest says of the NaN/Inf the model produced: where they first appear
    (tensor, layer, prompt) and how many tensors hold any; [] when none (or no manifest: a rank
    other than 0)."""
    found = (manifest or {}).get("nonfinite") or []
    if not found:
        return []
    layout = Layout.of(manifest.get("anatomy"))
    first = min(found, key=lambda e: (model_order_key(e["name"], layout.layers_path, layout.embed, layout.norm,
                                                      layout.head), e["prompt"]))
    layer = layer_of(split_name(first["name"])[0], layout.layers_path)
    where = f" (layer {layer})" if layer is not None else ""
    prompts = len({e["prompt"] for e in found})
    return [f"the model produced NaN/Inf: first at {first['name']}{where}, prompt {first['prompt']} "
            f"({first['nan']} NaN, {first['inf']} Inf); {plural(len(found), 'tensor')} in "
            f"{plural(prompts, 'prompt')} hold NaN/Inf (listed under \"nonfinite\" in manifest.json)"]
