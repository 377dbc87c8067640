"""Reading several runs side by side, ahead of their use: what compare measures arrives read and
verified while the previous tensors are being measured, within a memory window.

Knows runs and their tensors; nothing about metrics or verdicts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from .runs import Run

READ_AHEAD_BYTES = 1 << 30  # tensors read and verified ahead of the one being measured
READ_WORKERS = 8  # threads reading and hashing them (file reads and digests release the GIL)


def read_units(runs: dict[str, Run | None], units: Iterator[tuple[int, tuple[str, ...]]], verify: bool = True,
               prefetch: bool = True, ahead_bytes: int | None = None,
               workers: int | None = None) -> Iterator[tuple[int, tuple[str, ...], dict]]:
    """Read several runs unit by unit: for each (prompt, names) of `units`, yield (prompt, names,
    {(side, name): tensor}) with the tensors of every run (by side) that holds them, in order.
    With `prefetch`, `workers` threads read and verify the following units while the caller
    works on this one, up to `ahead_bytes` ahead (at least one unit): the disk stays busy and the
    hashing spreads over cores, while memory stays bounded. A unit is released once yielded.
    Defaults: READ_AHEAD_BYTES and READ_WORKERS, read at call time."""
    ahead_bytes = READ_AHEAD_BYTES if ahead_bytes is None else ahead_bytes
    workers = READ_WORKERS if workers is None else workers
    pool = ThreadPoolExecutor(max_workers=workers if prefetch else 1, thread_name_prefix="layerwise-read")
    window: deque = deque()  # (prompt, names, futures, bytes)
    ahead = 0

    def submit(p: int, unit: tuple[str, ...]) -> tuple:
        keys = [(side, name) for name in unit for side, run in runs.items() if run is not None and run.has(name, p)]
        futures = {(side, name): pool.submit(runs[side].tensor, name, p, verify) for side, name in keys}
        return p, unit, futures, sum(runs[side].entry(name, p).nbytes for side, name in keys)

    try:
        pending = iter(units)
        more = True
        while True:
            while more and (not window or (prefetch and ahead < ahead_bytes)):
                following = next(pending, None)
                if following is None:
                    more = False
                    break
                window.append(submit(*following))
                ahead += window[-1][3]
            if not window:
                return
            p, unit, futures, nbytes = window.popleft()
            tensors = {key: future.result() for key, future in futures.items()}
            futures.clear()  # the futures hold the tensors too
            ahead -= nbytes
            yield p, unit, tensors
            tensors.clear()  # release this unit
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
