"""A reference run's own batches, rebuilt for a replay: which points it recorded, its batches
(extract's batching of its prompts), and a batch's input to a layer with the padding tails put
back; and whether a layer's kernels give the same bits twice. For the layer tests' schedules
(replay, pipeline): `ReadAhead`, a layer's weights and recorded inputs read on threads of their
own while the layer before it computes, and `head_start`, what a process pays once on its first
forward pass, paid while its first layer is read.

Reads runs; knows nothing about candidates, tracks or reports.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from .errors import UserError
from .layer_loading import LayerSource
from .names import INPUT, OUTPUT, TOPK_IDS, pad_name, tensor_name
from .prompts import Batch, Prompt, make_batches
from .runs import Run
from .streaming import forward_layer, rehearse
from .timings import warm_device


def recorded_points(run: Run, source: LayerSource, layers: list[int]) -> tuple[str, ...]:
    """The capture points inside decoder layers that the reference recorded for these layers
    (the replay records the same; the residual stream always)."""
    anatomy, names = source.anatomy, set(run.names)
    points = ["residual"]
    for point, sub in (("attn", anatomy.attn_name), ("mlp", anatomy.mlp_name)):
        if sub and any(tensor_name(f"{anatomy.layer(k)}.{sub}", OUTPUT) in names for k in layers):
            points.append(point)
    if any(anatomy.router(k) and tensor_name(anatomy.router(k), TOPK_IDS) in names for k in layers):
        points.append("router")
    return tuple(points)


def reference_batches(run: Run, first_layer: str) -> tuple[list[Batch], bool]:
    """The reference's batches (its prompts, grouped by its batch size, longest first: the
    batching of extract), and whether its padded rows carry recorded padding tails."""
    settings = run.manifest.get("settings") or {}
    batch_size = settings.get("batch_size") or 1
    prompts = []
    for p in run.prompts:
        ids = p.get("token_ids")
        if not ids:  # an imported run without token ids: lengths from the recorded inputs
            ids = [0] * run.entry(tensor_name(first_layer, INPUT), p["index"]).shape[0]
        prompts.append(Prompt(p["index"], p.get("text"), tuple(ids)))
    batches = make_batches(prompts, int(batch_size), 0)
    padded = all(run.has(pad_name(tensor_name(first_layer, INPUT)), p.index)
                 for b in batches for p in b.prompts if len(p.token_ids) < b.input_ids.shape[1])
    return batches, padded


def recorded_input(run: Run, layer_path: str, batch: Batch, dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
    """The batch's input to a layer [B, T, H] as the reference computed it: each prompt's recorded
    input, its padding positions' recorded values after it (zeros where the run has none)."""
    return placed(stacked_input(run, layer_path, batch), dtype, device)


def placed(stacked: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A `stacked_input` on the device in the test's dtype (the one conversion recorded_input makes)."""
    return stacked.to(device=device, dtype=dtype)


def stacked_input(run: Run, layer_path: str, batch: Batch) -> torch.Tensor:
    """recorded_input on the host, as stored: what the layer reader's thread reads ahead."""
    rows = []
    width = batch.input_ids.shape[1]
    for p in batch.prompts:
        x = run.tensor(tensor_name(layer_path, INPUT), p.index)  # [n, H]
        if x.shape[0] < width:
            tail = pad_name(tensor_name(layer_path, INPUT))
            pad = run.tensor(tail, p.index) if run.has(tail, p.index) else \
                torch.zeros(width - x.shape[0], *x.shape[1:], dtype=x.dtype)
            x = torch.cat([x, pad])
        rows.append(x)
    return torch.stack(rows)


def head_start(clock, source, index: int, shape: tuple[int, int], capture_bytes: int | None = None) -> None:
    """What a process pays once on its first forward pass, paid on a thread of its own while
    layer `index` is read (and, under torchrun, while the ranks connect): `warm_device` (its
    capture's host buffers for `capture_bytes`, `layer_capture_bytes`), then `rehearse` over a
    batch of `shape`. Nothing else on the process may draw random numbers meanwhile (the
    rehearsal forks the generators' state and puts it back)."""
    clock.timed("warm", index, warm_device, source.device, source.dtype, capture_bytes)
    clock.timed("rehearse", index, rehearse, source, index, shape)


def layer_capture_bytes(run: Run, path: str, tracks: int) -> int:
    """What a layer test's capture holds in flight, about: the reference's tensors of layer `path`
    (what each track records of it), for every track, twice (a layer written while the next one
    is captured)."""
    one = sum(e.nbytes for e in run.entries() if e.module == path or e.module.startswith(path + "."))
    return 2 * tracks * one


INPUTS_AHEAD_BYTES = 1 << 30  # a layer's recorded inputs held ahead on the host; the rest are read when used
INPUT_READERS = 4  # threads reading one layer's recorded inputs (one batch each; a digest check is ~1 GB/s a thread)


class ReadAhead:
    """Layers' weights and recorded inputs read ahead, beside each other (the weights from the
    checkpoint on one thread, the inputs from the reference run's files on INPUT_READERS, a batch
    each, digests checked there): what a layer needs is read while the layer before it is built
    and computes. `submit(index, inputs)`
    starts layer `index` (its inputs too with `inputs`: its first batches', up to
    INPUTS_AHEAD_BYTES, so that a study of thousands of prompts holds no more); `result` waits for
    it and returns (the weights, {id(batch): stacked_input}; `input_of` reads a batch missing there).
    Each read goes into `clock`'s timeline ("read", "read_inputs"). A context manager: leaving it
    waits for the threads."""

    def __init__(self, clock, source, run: Run, batches):
        self.clock, self.source, self.run, self.batches = clock, source, run, batches
        self._weights = ThreadPoolExecutor(1, thread_name_prefix="layerwise-layer-read")
        self._inputs = ThreadPoolExecutor(1, thread_name_prefix="layerwise-input-read")
        self._readers = ThreadPoolExecutor(INPUT_READERS, thread_name_prefix="layerwise-input-file")

    def submit(self, index: int, inputs: bool):
        weights = self._weights.submit(self.clock.timed, "read", index, self.source.read, index)
        stacked = self._inputs.submit(self.clock.timed, "read_inputs", index, self._stacked, index) if inputs else None
        return weights, stacked

    def _stacked(self, index: int) -> dict:
        path, held, chosen = self.source.anatomy.layer(index), 0, []
        name = tensor_name(path, INPUT)
        for b in self.batches:
            if held >= INPUTS_AHEAD_BYTES:
                break
            chosen.append(b)
            held += sum(self.run.entry(name, p.index).nbytes for p in b.prompts)
        # files opened, read and their digests checked on several threads (hashlib lets go of the GIL)
        stacked = self._readers.map(lambda b: stacked_input(self.run, path, b), chosen)
        return {id(b): x for b, x in zip(chosen, stacked)}

    @staticmethod
    def result(pending) -> tuple:
        weights, stacked = pending
        return weights.result(), (stacked.result() if stacked is not None else {})

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._weights.shutdown(wait=True, cancel_futures=True)
        self._inputs.shutdown(wait=True, cancel_futures=True)
        self._readers.shutdown(wait=True, cancel_futures=True)


def input_of(stacked: dict, run: Run, layer_path: str, batch: Batch, dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
    """A batch's recorded input to a layer, on the device: read ahead (`ReadAhead`) if it was,
    else read now."""
    x = stacked.get(id(batch))
    return placed(x, dtype, device) if x is not None else recorded_input(run, layer_path, batch, dtype, device)


def determinism(run: Run, loaded, module, path: str, batch: Batch, source: LayerSource, who: str,
                stacked: dict | None = None) -> tuple[bool, float]:
    """Run the layer twice on the same batch (its input read ahead where `stacked`, ReadAhead's,
    holds it): bit-identical, or the rel_l2 between the two."""
    x = input_of(stacked or {}, run, path, batch, source.dtype, source.device)
    return run_twice(loaded, module, x, batch, who)


def run_twice(loaded, module, x: torch.Tensor, batch: Batch, who: str) -> tuple[bool, float]:
    """`determinism` on a given input `x` of `batch`."""
    a = forward_layer(loaded, module, x, batch.attention_mask, who)
    b = forward_layer(loaded, module, x, batch.attention_mask, who)
    if torch.equal(a, b):
        return True, 0.0
    a, b = a.double(), b.double()
    return False, float((a - b).norm() / a.norm().clamp_min(1e-300))


@contextlib.contextmanager
def deterministic(on: bool):
    """torch's deterministic kernels for the duration (cuBLAS needs its workspace setting first)."""
    if not on:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    except RuntimeError as err:
        if "deterministic" in str(err):
            raise UserError(f"--deterministic: {str(err).splitlines()[0]}") from None
        raise
    finally:
        torch.use_deterministic_algorithms(before)


