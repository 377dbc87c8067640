"""What measuring many small tensors at once would save: `metrics.tensor_metrics` called once per
tensor pair (what compare does) against one batched pass over K same-shaped pairs, in torch calls
and in time, on the CPU or a GPU.

A trace of compare on runs of 512-token tensors (BENCHMARKS.md) found the GPU idle 90 % of the
time and the measuring thread making 225 top-level torch calls a layer: on small tensors the
count of calls, not the arithmetic, bounds it. This measures the same figures (the error sums,
max and mean |a - b|, rel_l2, cosine, SQNR, the worst token) both ways:

  each     `tensor_metrics(a, b)` for each pair, on the metrics' device (GPU blocks on a GPU)
  batched  `metricsbatch.batch_tensor_metrics`, what compare does on a GPU: K pairs stacked
           [K, tokens, width], converted to float64 once, every sum taken along the pair axis,
           all K pairs' figures brought back in one list (one sync)

and checks that the batched figures equal the per-pair ones (relative 1e-9: the sums' order
differs) before timing them. The aten calls each way are counted with a dispatch mode. The pairs
are finite (a pair holding NaN/Inf is measured alone, by tensor_metrics).

    python benchmarks/metrics_batch.py --pairs 116 --tokens 512 --batch 8,32,116 --device cuda:0
    python benchmarks/metrics_batch.py --tiny          # a CPU dry run (tests/test_benchmarks.py)

Prints a table; JSON to --out/metrics_batch.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from layerwise.metrics import CHUNK_ELEMENTS, GPU_CHUNK_ELEMENTS, TensorMetrics, tensor_metrics  # noqa: E402
from layerwise.metricsbatch import batch_tensor_metrics  # noqa: E402


class Calls(TorchDispatchMode):
    """Counts the aten operators dispatched while active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def batched(refs: list[torch.Tensor], cands: list[torch.Tensor], size: int) -> list[TensorMetrics]:
    """The pairs `size` at a time through layerwise's own batched pass (metricsbatch.py)."""
    elements = size * refs[0].numel()
    return batch_tensor_metrics([(a, b, None, None) for a, b in zip(refs, cands)], elements)


def each(refs, cands, chunk: int) -> list[TensorMetrics]:
    return [tensor_metrics(a, b, chunk_elements=chunk) for a, b in zip(refs, cands)]


def same(x: list[TensorMetrics], y: list[TensorMetrics]) -> bool:
    for p, q in zip(x, y, strict=True):
        for key in TensorMetrics.__dataclass_fields__:
            u, v = getattr(p, key), getattr(q, key)
            if u != v and not (isinstance(u, float) and math.isclose(u, v, rel_tol=1e-9, abs_tol=1e-300)):
                return False
    return True


def timed(fn, sync) -> float:
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=116, help="tensor pairs (a compare's layers)")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--width", type=int, default=3072)
    ap.add_argument("--batch", default="8,32,116", help="pairs per batched pass, comma list")
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--tiny", action="store_true", help="6 pairs of 16 x 64 on the CPU: a dry run")
    args = ap.parse_args(argv)
    if args.tiny:
        args.pairs, args.tokens, args.width, args.batch, args.device, args.rounds = 6, 16, 64, "2,6", "cpu", 2
    device = torch.device(args.device)
    chunk = GPU_CHUNK_ELEMENTS if device.type == "cuda" else CHUNK_ELEMENTS
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    refs = [torch.randn(args.tokens, args.width, generator=g).to(torch.bfloat16) for _ in range(args.pairs)]
    cands = [(r.float() + 0.01 * torch.randn(r.shape, generator=g)).to(torch.bfloat16) for r in refs]
    refs, cands = [r.to(device) for r in refs], [c.to(device) for c in cands]
    sizes = [int(s) for s in args.batch.split(",")]
    ways = {"each": lambda: each(refs, cands, chunk)}
    for size in sizes:
        ways[f"batched x {size}"] = lambda size=size: batched(refs, cands, size)
    oracle = ways["each"]()
    result = {"device": str(device), "pairs": args.pairs, "tokens": args.tokens, "width": args.width,
              "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "ways": {}}
    for name, fn in ways.items():
        if not same(fn(), oracle):
            raise RuntimeError(f"{name}: the figures differ from tensor_metrics'")
        with Calls() as calls:
            fn()
        result["ways"][name] = {"aten_calls_per_pair": calls.count / args.pairs, "seconds": []}
    for _ in range(args.rounds):
        for name, fn in ways.items():
            result["ways"][name]["seconds"].append(timed(fn, sync))
    print(f"{args.pairs} pairs of [{args.tokens}, {args.width}] bf16 on {result['name']} ({device}), "
          f"{args.rounds} rounds in turns; every way's figures equal tensor_metrics' (rel 1e-9)")
    print(f"{'way':16s} {'aten calls a pair':>18s} {'ms a pair, min / median / max':>32s}")
    for name, row in result["ways"].items():
        ms = sorted(s / args.pairs * 1e3 for s in row["seconds"])
        print(f"{name:16s} {row['aten_calls_per_pair']:18.1f} {ms[0]:12.3f} / {statistics.median(ms):.3f} / {ms[-1]:.3f}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "metrics_batch.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
