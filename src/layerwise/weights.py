"""Where a model's tensors come from, by checkpoint name: a safetensors directory or memory.

A `TensorStore` lists tensor names and reads a chosen few onto a device:

- `CheckpointStore(directory)`: the shards named by the index, read span by span straight to the
  device (checkpoint.read_tensors), never the whole file;
- `MemoryStore(tensors)`: tensors already resident somewhere (host memory, or spread over GPUs),
  copied to the device asked for. A model too large for the disk at hand can be built in memory
  with seeded weights and streamed layer by layer from there (the full-size benchmarks do).

Stores know nothing about models, layers or dtypes; names are the checkpoint's own.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint
from .errors import UserError


class CheckpointStore:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._wmap = checkpoint.weight_map(self.directory)

    def names(self) -> list[str]:
        return list(self._wmap)

    def __contains__(self, name: str) -> bool:
        return name in self._wmap

    def read(self, names: list[str], device: str) -> dict[str, torch.Tensor]:
        return checkpoint.read_tensors(self.directory, names, device, wmap=self._wmap)

    def describe(self) -> str:
        return str(self.directory)


class MemoryStore:
    def __init__(self, tensors: dict[str, torch.Tensor], label: str = "tensors in memory"):
        self.tensors = tensors
        self.label = label

    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read(self, names: list[str], device: str) -> dict[str, torch.Tensor]:
        missing = [n for n in names if n not in self.tensors]
        if missing:
            raise UserError(f"tensor {missing[0]} is not among the {self.label}")
        device = torch.device(device)
        # no copy where the tensor already is on the device: readers never write into what they read
        return {n: self.tensors[n].to(device) for n in names}

    def describe(self) -> str:
        return self.label
