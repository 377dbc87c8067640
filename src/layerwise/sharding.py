"""Which rank computes what, when torchrun starts several: pure arithmetic on counts.

- `rank_gpus`: a rank's GPUs among its node's (the node's GPUs split evenly between its ranks,
  or K each); a layout that does not divide them is a UserError.
- `assign`: whole batches to ranks, balanced by their size (tokens), heaviest first to the least
  loaded rank. Work is split, never re-batched: a rank computes the very batches one process
  would, so its tensors are bit-identical to one process's (same kernels, same threads).
- `deal`: ordered items (decoder layers) dealt round-robin, item i to rank i mod N.
- `first_difference` / `digest`: how ranks compare what they were given, and say where it differs.

Every rank computes the same answers from the same numbers: no communication is needed to agree.
"""

from __future__ import annotations

import hashlib
import json

from .errors import UserError


def rank_gpus(local_rank: int, ranks_per_node: int, gpus: int, gpus_per_rank: int | None = None,
              tensor_parallel: bool = False) -> tuple[int, ...]:
    """The GPUs (indices among the node's `gpus` visible ones) of local rank `local_rank`: none on
    a CPU-only node; with `tensor_parallel`, GPU `local_rank` alone."""
    if gpus == 0:
        return ()
    if tensor_parallel:
        if ranks_per_node > gpus:
            raise UserError(f"--tp: {ranks_per_node} ranks per node need {ranks_per_node} GPUs, this node has {gpus}: "
                            f"start at most {gpus} ranks per node (torchrun --nproc-per-node)")
        return (local_rank,)
    if gpus_per_rank is None:
        if gpus % ranks_per_node:
            fits = ", ".join(str(n) for n in range(1, gpus + 1) if gpus % n == 0)
            raise UserError(f"{ranks_per_node} ranks per node do not divide this node's {gpus} GPUs: start {fits} "
                            "ranks per node (torchrun --nproc-per-node), or give each rank --gpus-per-rank K GPUs "
                            f"with {ranks_per_node} x K <= {gpus}")
        gpus_per_rank = gpus // ranks_per_node
    if gpus_per_rank < 1 or gpus_per_rank * ranks_per_node > gpus:
        raise UserError(f"--gpus-per-rank {gpus_per_rank} x {ranks_per_node} ranks per node needs "
                        f"{gpus_per_rank * ranks_per_node} GPUs, this node has {gpus}")
    first = local_rank * gpus_per_rank
    return tuple(range(first, first + gpus_per_rank))


def assign(weights: list[float], ranks: int) -> list[list[int]]:
    """Items (by index) to ranks, heaviest first to the least loaded rank (ties: the lower rank);
    each rank's items in their original order."""
    loads, out = [0.0] * ranks, [[] for _ in range(ranks)]
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        r = min(range(ranks), key=lambda r: (loads[r], r))
        out[r].append(i)
        loads[r] += weights[i]
    return [sorted(o) for o in out]


def deal(n: int, ranks: int) -> list[list[int]]:
    """0..n-1 dealt round-robin: item i to rank i mod `ranks` (ranks beyond n get none)."""
    return [list(range(r, n, ranks)) for r in range(ranks)]


def first_difference(a, b) -> str:
    """Where two JSON-like values first differ, as `key: A vs B` (for one-line messages)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if a.get(key) != b.get(key):
                return f"{key} {_short(a.get(key))} vs {_short(b.get(key))}"
    return f"{_short(a)} vs {_short(b)}"


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def digest(value) -> str:
    """A stable hash of a JSON-like value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
