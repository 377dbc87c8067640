"""Layer tests over the ranks of a torchrun job: each rank loads only its own layers, and the
chained track flows from rank to rank batch by batch (a pipeline).

`Pipeline(ranks)` is replay.replay's `schedule`: it makes the same runs as one process (the same
intents, every tensor bit for bit, each layer being the same computation on the same input) with
the layers split into contiguous chunks, one per rank (sharding.chunks):

- isolated: every layer on the reference's recorded input. Each rank runs its own layers; no
  rank waits for another.
- chained: layer K+1 needs layer K's output, so the chain is a pipeline. Rank r runs its chunk on
  batch j as soon as rank r-1 has sent it that batch's output of the previous layer (send/recv,
  bit for bit), and sends its own last layer's output on to rank r+1; meanwhile rank r-1 works
  on batch j+1. With B batches over R ranks the chain takes about (B + R - 1) / B chunk-times
  instead of R: the isolated and chained tracks both speed up about R times.

Each rank reads its layer K+1 while layer K is built and runs the isolated track over every
batch (as one process does), so reading overlaps computing. A pipeline stage keeps its layers loaded while the batches flow through it: as many of them as
fit in `resident_layers` (default: 60 % of the device's free memory, measured on the first layer
loaded). A chunk that does not fit runs in windows of layers, each over every batch before the
next window is loaded; the rank then receives during its first window and sends during its last,
which leaves every result unchanged but lets the pipeline drain between windows.

Determinism (the first layer run twice) is checked by rank 0, which owns the first layer, and
shared with every rank; the weights read are summed over the ranks.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from . import machine
from .distributed import Session
from .layer_loading import LayerSource
from .rebatch import determinism, recorded_input
from .replay import _candidate
from .sharding import chunks
from .streaming import run_layer

RESIDENT_FRACTION = 0.6  # of the free device (or host) memory a rank's resident layers may take


class Pipeline:
    """replay's schedule over the ranks of a torchrun job (see the module's docstring)."""

    def __init__(self, ranks: Session, resident_layers: int | None = None):
        self.ranks = ranks
        self.resident_layers = resident_layers

    def __call__(self, run, source: LayerSource, layers: list[int], batches, tracks, targets, options,
                 factory) -> tuple[float, int, tuple[bool | None, float]]:
        """This rank's layers over every batch of every track. Returns the seconds spent loading
        and the bytes read (of every rank) and rank 0's determinism check."""
        owner = {layers[i]: r for r, part in enumerate(chunks(len(layers), self.ranks.world)) for i in part}
        mine = [layers[i] for i in self.ranks.chunk(len(layers))]
        stage = _Stage(self, run, source, batches, tracks, targets, options, factory)
        if mine:
            stage.previous = owner[mine[0] - 1] if mine[0] != layers[0] else None
            stage.following = owner.get(mine[-1] + 1)
            stage.check_determinism = options.check_determinism and mine[0] == layers[0]
            stage.run(mine)
        determinism = self.ranks.broadcast(stage.determinism)
        totals = self.ranks.all_gather((stage.load_seconds, stage.bytes_read))
        return sum(t[0] for t in totals), sum(t[1] for t in totals), determinism


class _Stage:
    """One rank's chunk of layers: loaded a window at a time, every batch through each window."""

    def __init__(self, pipeline: Pipeline, run, source: LayerSource, batches, tracks, targets, options, factory):
        self.ranks, self.resident_layers = pipeline.ranks, pipeline.resident_layers
        self.run_, self.source, self.batches, self.targets = run, source, batches, targets
        self.options, self.factory = options, factory
        self.isolated = next((t for t in tracks if t.kind == "isolated"), None)
        self.chained = next((t for t in tracks if t.kind == "chained"), None)
        self.previous: int | None = None  # the rank sending this chunk's chained input (None: recorded)
        self.following: int | None = None  # the rank this chunk's chained output goes to (None: kept)
        self.check_determinism = False
        self.determinism: tuple[bool | None, float] = (None, 0.0)
        self.load_seconds, self.bytes_read = 0.0, 0

    def run(self, mine: list[int]) -> None:
        """Layer K+1 is read while layer K is built and runs the isolated track over every batch;
        the chained track goes through each window once it is loaded."""
        free = _free_bytes(str(self.source.device))
        carry, start, limit = None, 0, self.resident_layers
        with ThreadPoolExecutor(1, thread_name_prefix="layerwise-layer-read") as reader:
            pending = reader.submit(self.source.read, mine[0])
            while start < len(mine):
                window = []
                while start + len(window) < len(mine) and (limit is None or len(window) < limit):
                    k = start + len(window)
                    weights = pending.result()
                    window.append(self._build(weights))
                    del weights
                    if k + 1 < len(mine):
                        pending = reader.submit(self.source.read, mine[k + 1])
                    if limit is None:  # as many as fit, judged by the first layer's size
                        limit = max(1, int(RESIDENT_FRACTION * free // max(_module_bytes(window[0][1]), 1)))
                    self._isolated(window[-1])
                last = start + len(window) >= len(mine)
                carry = self._through(window, first=start == 0, last=last, carry=carry)
                start += len(window)
                del window

    def _build(self, weights):
        loaded = self.source.build(weights)
        weights.tensors.clear()  # the raw tensors go now (the next layer's are being read)
        index = loaded.index
        self.load_seconds += loaded.seconds
        self.bytes_read += loaded.bytes_read
        module = _candidate(self.factory, self.options.candidate, self.source, loaded) if self.factory \
            else loaded.module
        who = f"--candidate {self.options.candidate}: layer {index}" if self.factory else f"layer {index}"
        path = self.source.anatomy.layer(index)
        if self.check_determinism:
            self.determinism = determinism(self.run_, loaded, module, path, self.batches[0], self.source, who)
            self.check_determinism = False
        return loaded, module, path, who

    def _isolated(self, item) -> None:
        """One layer over every batch on the reference's recorded inputs (needs no other rank)."""
        if self.isolated is None:
            return
        loaded, module, path, who = item
        device, dtype = self.source.device, self.source.dtype
        mine = [t for t in self.targets if t.group == path]
        for batch in self.batches:
            recorded = recorded_input(self.run_, path, batch, dtype, device)
            run_layer(loaded, module, path, [batch], [recorded], self.isolated.recording.collector, mine,
                      str(device), who)

    def _through(self, window, first: bool, last: bool, carry) -> list[torch.Tensor]:
        """The chained track: every batch through the window's layers, from the previous rank (first
        window), the recorded input (the chain's start) or `carry`. Returns the chained outputs
        kept for the next window."""
        device, dtype = self.source.device, self.source.dtype
        kept = []
        for j, batch in enumerate(self.batches):
            x = None
            if self.chained is not None:
                if not first:
                    x = carry[j]
                elif self.previous is None:
                    x = recorded_input(self.run_, window[0][2], batch, dtype, device)
                else:
                    x = self.ranks.recv(self.previous, device)
            if self.chained is None:
                continue
            for loaded, module, path, who in window:
                mine = [t for t in self.targets if t.group == path]
                x = run_layer(loaded, module, path, [batch], [x], self.chained.recording.collector, mine,
                              str(device), who)[0]
            if self.chained is not None:
                if last and self.following is not None:
                    self.ranks.send(x, self.following)
                else:
                    kept.append(x)
        return kept


def _module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def _free_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return machine.host_memory_available()
