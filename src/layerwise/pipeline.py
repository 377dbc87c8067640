"""Layer tests over the ranks of a torchrun job: the layers dealt out round-robin (layer i of the
test to rank i mod N), each rank reading and building only its own, and the chained track handed
from rank to rank, layer by layer.

`Pipeline(ranks)` is replay.replay's `schedule`: it makes the same runs as one process (the same
intents, every tensor bit for bit, each layer being the same computation on the same input):

- isolated: every layer on the reference's recorded input. A rank runs each of its layers over
  every batch as soon as the layer is built, while its next layer is being read.
- chained: layer i needs layer i-1's output. The rank of layer i receives that output for every
  batch from the rank of layer i-1, runs layer i on it and sends its own output on to the rank of
  layer i+1 (chain.Link). Until that input is on its way the rank runs the layer's isolated
  batches, one at a time; once it is, the chain goes first (the next rank waits for it), then the
  isolated batches left. Dealt round-robin, the N ranks read and build N consecutive layers at
  the same time, so the chain keeps pace with them: a test takes about the time of reading,
  building and running 1/N of the layers.

What one process pays once is kept off the chain's path: the connections between the ranks are
opened while the first layer is read, and rank 0 checks determinism after it has sent the first
layer's outputs on.

Sends do not block: a rank hands its outputs over and goes on building its next layer while the
receiver is still busy with its own (blocking sends held neighbouring ranks in step, so their
builds took turns). Before sending a layer's outputs a rank waits until its previous layer's have
arrived: one layer's outputs in flight at most. A rank receives all of a layer's chained inputs
before it sends any of its outputs, and every rank takes its layers in order, so the earliest
unfinished layer of the chain can always go on: no two ranks wait on each other (gloo or NCCL).
A rank holds at most about three layers at a time (the raw and the built weights of the one being
built and run, the next being read), as one process does, and the chained activations of every
batch (as one process does), plus the outputs in flight.

Determinism (the first layer run twice) is checked by rank 0, which owns the first layer, and
shared with every rank; the weights read and the seconds spent reading are summed over the ranks.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor

from . import timings
from .chain import Link
from .distributed import Session
from .errors import CandidateError, user_code
from .layer_loading import LayerSource
from .rebatch import determinism, ReadAhead, head_start, input_of, layer_capture_bytes
from .replay import _candidate
from .sharding import deal
from .streaming import run_layer
from .timings import Timings


class Pipeline:
    """replay's schedule over the ranks of a torchrun job (see the module's docstring)."""

    def __init__(self, ranks: Session):
        if ranks.world < 2:
            raise ValueError("Pipeline is for 2 or more ranks; one process replays with replay._run_layers")
        self.ranks = ranks

    def __call__(self, run, source: LayerSource, layers: list[int], batches, tracks, targets, options,
                 factory) -> tuple[float, int, tuple[bool | None, float]]:
        """This rank's layers over every batch of every track. Returns the seconds spent loading
        and the bytes read (of every rank) and rank 0's determinism check."""
        owner = {layers[i]: r for r, dealt in enumerate(deal(len(layers), self.ranks.world)) for i in dealt}
        chained = any(t.kind == "chained" for t in tracks)
        link = Link(self.ranks, [(owner[a], owner[b]) for a, b in zip(layers, layers[1:])] if chained else [])
        stage = _Stage(self.ranks, link, run, source, batches, tracks, targets, options, factory)
        stage.check_determinism = options.check_determinism and owner[layers[0]] == self.ranks.rank
        stage.run(layers, owner)
        timings.mark("layers computed")
        stage.clock.into(tracks)
        checked = self.ranks.broadcast(stage.determinism)
        totals = self.ranks.all_gather((stage.load_seconds, stage.bytes_read))
        return sum(t[0] for t in totals), sum(t[1] for t in totals), checked


class _Stage:
    """One rank's layers, read one ahead, each over every batch of every track."""

    def __init__(self, ranks: Session, link: Link, run, source: LayerSource, batches, tracks, targets, options,
                 factory):
        self.ranks, self.link = ranks, link
        self.run_, self.source, self.batches, self.targets = run, source, batches, targets
        self.options, self.factory = options, factory
        self.isolated = next((t for t in tracks if t.kind == "isolated"), None)
        self.chained = next((t for t in tracks if t.kind == "chained"), None)
        self.check_determinism = False
        self.determinism: tuple[bool | None, float] = (None, 0.0)
        self.load_seconds, self.bytes_read = 0.0, 0
        self.clock = Timings()  # read_wait, build, compute, chain (computing it), chain_wait (receiving), send_wait

    def run(self, layers: list[int], owner: dict[int, int]) -> None:
        mine = [k for k in layers if owner[k] == self.ranks.rank]
        if not mine:
            return
        first = layers[0]  # the chain's first layer starts from the reference's inputs
        inputs = lambda index: self.isolated is not None or index == first  # noqa: E731
        with ReadAhead(self.clock, self.source, self.run_, self.batches) as reader:
            pending = reader.submit(mine[0], inputs(mine[0]))
            with ThreadPoolExecutor(1, thread_name_prefix="layerwise-warm") as warmer:
                warming = warmer.submit(head_start, self.clock, self.source, mine[0],
                                        tuple(self.batches[0].attention_mask.shape),
                                        layer_capture_bytes(self.run_, self.source.anatomy.layer(mine[0]),
                                                            (self.isolated is not None) + (self.chained is not None)))
                with self.clock("connect", mine[0]):  # while the first layer is read and the GPU warms
                    self.link.warm(self.source.device)
                with self.clock("warm_wait", mine[0]):
                    warming.result()
            for n, index in enumerate(mine):
                with self.clock("read_wait", index):
                    weights, stacked = reader.result(pending)
                if n + 1 < len(mine):  # read while this one is built and run
                    pending = reader.submit(mine[n + 1], inputs(mine[n + 1]))
                with self.clock("build", index):
                    item = self._build(weights) + (stacked,)
                del weights, stacked
                # what a candidate's forward raises fails the test (exit 1) in one line naming its own code
                with user_code(f"{item[3]} raised", CandidateError) if self.factory else contextlib.nullcontext():
                    self._layer(item, layers, owner)
                del item
        with self.clock("send_wait"):
            self.link.wait_sent()

    def _layer(self, item, layers: list[int], owner: dict[int, int]) -> None:
        """One built layer on both tracks: isolated batches until the chain's input is on its way,
        then the chain (the next layer's rank waits for it), then the isolated batches left."""
        index = item[0].index
        todo = list(self.batches) if self.isolated is not None else []
        if self.chained is not None:
            i = layers.index(index)
            source = owner[layers[i - 1]] if i else None
            while source is not None and todo and not self.link.posted(layers[i - 1]):
                with self.clock("compute", index):
                    self._isolated(item, [todo.pop(0)])
            self._chained(item, source, owner[layers[i + 1]] if i + 1 < len(layers) else None)
        self._first_twice(item)
        with self.clock("compute", index):
            self._isolated(item, todo)

    def _build(self, weights):
        loaded = self.source.build(weights)
        weights.tensors.clear()  # the raw tensors go now (the next layer's are being read)
        index = loaded.index
        self.load_seconds += loaded.seconds
        self.bytes_read += loaded.bytes_read
        module = _candidate(self.factory, self.options.candidate, self.source, loaded) if self.factory \
            else loaded.module
        who = f"--candidate {self.options.candidate}: layer {index}" if self.factory else f"layer {index}"
        return loaded, module, self.source.anatomy.layer(index), who

    def _first_twice(self, item) -> None:
        """The determinism check, on the first layer of the test only (rank 0's)."""
        if self.check_determinism:
            loaded, module, path, who, stacked = item
            with self.clock("determinism", loaded.index):
                self.determinism = determinism(self.run_, loaded, module, path, self.batches[0], self.source,
                                               who, stacked)
            self.check_determinism = False

    def _isolated(self, item, batches) -> None:
        """One layer over `batches` on the reference's recorded inputs (needs no other rank)."""
        loaded, module, path, who, stacked = item
        device, dtype = self.source.device, self.source.dtype
        mine = [t for t in self.targets if t.group == path]
        for batch in batches:
            recorded = input_of(stacked, self.run_, path, batch, dtype, device)
            run_layer(loaded, module, path, [batch], [recorded], self.isolated.recording.collector, mine,
                      str(device), who)

    def _chained(self, item, source: int | None, destination: int | None) -> None:
        """One layer of the chain: its input for every batch (recorded at the chain's start, else
        from the previous layer's rank), then its outputs, sent on to the next layer's rank. Dealt
        round-robin over 2 or more ranks, consecutive layers are never on the same rank."""
        loaded, module, path, who, stacked = item
        device, dtype = self.source.device, self.source.dtype
        if source is None:
            inputs = [input_of(stacked, self.run_, path, b, dtype, device) for b in self.batches]
        else:
            with self.clock("chain_wait", loaded.index):
                inputs = [self.link.recv(source, device) for _ in self.batches]
        mine = [t for t in self.targets if t.group == path]
        with self.clock("chain", loaded.index):
            outputs = [run_layer(loaded, module, path, [batch], [x], self.chained.recording.collector, mine,
                                 str(device), who)[0] for batch, x in zip(self.batches, inputs)]
        del inputs
        if destination is not None:
            with self.clock("send_wait", loaded.index):
                self.link.wait_sent()  # the previous layer's outputs have arrived: one layer's in flight
            for y in outputs:
                self.link.send(y, destination)
            self.link.post(loaded.index)
