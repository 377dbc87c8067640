"""What a run's manifest costs at the end of an extract: built from the headers the writer wrote
(kept as it wrote each file) against reading every file's header back (the way before
commit "runs: the manifest from the writer's own entries").

Writes one run with RunWriter: --prompts prompts x --files files (a layer each: input, output,
router logits, top-k ids and weights of --tokens x 64 floats), then times build_manifest both
ways in --rounds alternating rounds, from the page cache (the files were just written), and
checks that both give the same entries. Prints min / median / max; JSON to --out.

    python benchmarks/manifest_cost.py                     # 16 prompts x 9 files, as a 16-prompt extract of 8 layers
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from layerwise.runs import RunWriter, build_manifest  # noqa: E402

ROLES = ("input", "output", "router_logits", "topk_ids", "topk_weights")


def spread(seconds: list[float]) -> dict:
    ms = sorted(s * 1e3 for s in seconds)
    return {"min_ms": ms[0], "median_ms": statistics.median(ms), "max_ms": ms[-1]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--files", type=int, default=9, help="files (layers) per prompt")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--tiny", action="store_true", help="a dry run: 2 prompts x 2 files, 2 rounds")
    args = ap.parse_args(argv)
    if args.tiny:
        args.prompts, args.files, args.rounds = 2, 2, 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    intent = {"producer": "manifest_cost", "model": {"spec": "synthetic"}, "settings": {},
              "prompts": [{"index": i} for i in range(args.prompts)]}
    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="lw-manifest-") as work:
        writer = RunWriter(Path(work) / "run", intent)
        for prompt in range(args.prompts):
            for layer in range(args.files):
                writer.put(prompt, f"model.layers.{layer}", {
                    f"model.layers.{layer}:{role}": torch.randn(args.tokens, 64, generator=generator) for role in ROLES})
        writer.close()
        read_back, kept = [], []
        for _ in range(args.rounds):
            start = time.perf_counter()
            a = build_manifest(writer.path, intent, {}, None)
            read_back.append(time.perf_counter() - start)
            start = time.perf_counter()
            b = build_manifest(writer.path, intent, {}, writer.entries())
            kept.append(time.perf_counter() - start)
            if a["tensors"] != b["tensors"] or a["nonfinite"] != b["nonfinite"]:
                print("the writer's entries differ from the files read back", file=sys.stderr)
                return 1
    tensors = len(a["tensors"])
    result = {"prompts": args.prompts, "files": args.prompts * args.files, "tensors": tensors,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "load_average": os.getloadavg()[0], "read_back": spread(read_back), "writer_entries": spread(kept)}
    (out / "manifest_cost.json").write_text(json.dumps(result, indent=1))
    print(f"manifest of {result['files']} files, {tensors} tensors ({result['machine']}, load average "
          f"{result['load_average']:.1f}):")
    for name, key in (("read back from the headers", "read_back"), ("from the writer's entries", "writer_entries")):
        s = result[key]
        print(f"  {name}: {s['min_ms']:.1f} / {s['median_ms']:.1f} / {s['max_ms']:.1f} ms (min / median / max)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
