"""A layer test's chain between the ranks of a torchrun job: each layer's outputs carried, bit for
bit, from the rank that computed them to the rank of the next layer (pipeline.py).

`Link(ranks, edges)` is one schedule's transport, for the rank pairs that hand the chain on:

- `send` hands a tensor over and returns at once (its dtype and shape go first, on gloo; the data
  on NCCL when it is on a GPU); `wait_sent` blocks until everything sent has arrived, so a sender
  can keep one layer's outputs in flight and go on with its next layer.
- `post(layer)` after sending a layer's outputs, `posted(layer)` on the receiver: a mark in
  torchrun's store that never blocks, so a rank waiting for the chain can do other work until its
  input is on the way (a gloo receive cannot be polled: it completes only inside `wait`).
- `warm(device)` opens every pair's connection, both ways, while the first layer is still being
  read, instead of on the chain's path: on 2 H200s NCCL took 0.6-1.1 s to connect a pair on its
  first send, and 0.9 s more for the first send back. The pairs are taken in one global order,
  so no two ranks wait on each other.

Every wait is under the session's timeout: a rank that dies makes the others fail, never hang.
"""

from __future__ import annotations

import itertools

import torch

from .distributed import Session

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.uint8,
           torch.bool, torch.float8_e4m3fn)
_SCHEDULES = itertools.count()  # every rank makes the same schedules in the same order: one tag each


class Link:
    """This rank's end of the chain (see the module's docstring). `edges`: the (sender, receiver)
    rank pairs the chain crosses, the same list on every rank."""

    def __init__(self, ranks: Session, edges: list[tuple[int, int]]):
        self.ranks = ranks
        self.pairs = sorted({tuple(sorted(e)) for e in edges if e[0] != e[1]})
        self.tag = f"chain/{next(_SCHEDULES)}"
        self._sent: list = []  # (destination, works, tensors) of sends not yet known to have arrived

    def warm(self, device) -> None:
        """A tiny message each way over every pair this rank is in (NCCL connects each direction
        on its first use), in the pairs' global order: the smallest unfinished pair always has
        both its ranks at it. The lower rank sends first."""
        import torch.distributed as dist

        for low, high in self.pairs:
            if self.ranks.rank not in (low, high):
                continue
            other = high if self.ranks.rank == low else low
            probe = torch.zeros(1, dtype=torch.uint8, device=device)
            with self.ranks.guard(f"connecting to {self.ranks.env.where(other)}"):
                for sender in (low, high):
                    if self.ranks.rank == sender:
                        dist.isend(probe, other).wait()
                    else:
                        dist.recv(probe, other)

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        """A tensor to rank `dst`, bit for bit. It returns at once: the sender goes on with its next
        work while `dst` is still busy with its own (a blocking send would hold both in step)."""
        import torch.distributed as dist

        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        header = torch.zeros(8, dtype=torch.int64)
        header[:2 + tensor.dim()] = torch.tensor([_DTYPES.index(tensor.dtype), tensor.dim(), *tensor.shape])
        with self.ranks.guard(f"sending activations to {self.ranks.env.where(dst)}"):
            self._sent.append((dst, [dist.isend(header, dst), dist.isend(data, dst)], (header, data)))

    def wait_sent(self) -> None:
        """Block until every tensor `send` handed over has reached its rank (the tensors stay
        alive until then)."""
        while self._sent:
            dst, works, _ = self._sent[0]
            with self.ranks.guard(f"sending activations to {self.ranks.env.where(dst)}"):
                for work in works:
                    work.wait()
            self._sent.pop(0)

    def recv(self, src: int, device) -> torch.Tensor:
        import torch.distributed as dist

        header = torch.empty(8, dtype=torch.int64)
        with self.ranks.guard(f"waiting for activations from {self.ranks.env.where(src)}"):
            dist.recv(header, src)
            shape = header[2:2 + int(header[1])].tolist()
            out = torch.empty(shape, dtype=_DTYPES[int(header[0])], device=device)
            dist.recv(out.reshape(-1).view(torch.uint8), src)
        return out

    def post(self, layer: int) -> None:
        """Layer `layer`'s outputs are on their way (after `send`)."""
        with self.ranks.guard("posting to torchrun's store"):
            self.ranks.store.set(f"{self.tag}/{layer}", b"1")

    def posted(self, layer: int) -> bool:
        """Whether layer `layer`'s outputs are on their way to this rank; never blocks."""
        with self.ranks.guard("reading torchrun's store"):
            return self.ranks.store.check([f"{self.tag}/{layer}"])
