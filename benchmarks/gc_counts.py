"""How many garbage collections a captured forward pass makes, and where, with the collector's
pause (no collection while a batch's layers are launched) and without it.

The capture's hooks on an 8-layer model of MiniMax-M2's layout (tiny dimensions on the CPU, the
real ones on a GPU), residual + router; the host copies made as on a GPU (`copy_host_tensors`)
and dropped by the sink. Each of --passes rounds runs one captured pass (`start_batch`, the
forward call, `flush`) and one plain pass; `gc.callbacks` records every collection's generation,
thread and phase: "layers" (from `start_batch` until the pause is given back, or the forward call
returns), "after-release" (the rest of the captured pass), "flush" and "plain".

    python benchmarks/gc_counts.py --shapes 1x128,4x128 --passes 40

Writes gc_counts.json to --out. --tiny: 4 passes of 1 x 16, a dry run.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import threading
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

import extract_overhead as eo  # noqa: E402
from layerwise import capture  # noqa: E402
from layerwise.anatomy import find_anatomy  # noqa: E402
from layerwise.collector import Collector  # noqa: E402
from synthetic import build_on_devices, minimax_config, write_json  # noqa: E402


def count(model, anatomy, config, device: str, batch_size: int, tokens: int, passes: int, pause: bool) -> dict:
    """Collections by (phase, generation) and by thread over `passes` rounds of one shape."""
    targets = capture.plan_targets(anatomy, ("residual", "router"), tuple(range(anatomy.num_layers)))
    batch, ids, mask = eo.Bench(model, anatomy, config, device).inputs(batch_size, tokens)
    collector = Collector(eo.NullWriter(), targets, copy_host_tensors=device == "cpu")
    collector._gc_pause = pause
    phase, seen = ["idle"], []
    release = collector._release_gc

    def released():
        held = collector._gc_held
        release()
        if held:
            phase[0] = "after-release"
    collector._release_gc = released

    def noted(step, info):
        if step == "start":
            seen.append((phase[0], info["generation"], threading.current_thread().name))
    gc.callbacks.append(noted)
    try:
        with capture.Capture(model, targets, collector), torch.inference_mode():
            for _ in range(passes):
                phase[0] = "layers"
                collector.start_batch(batch)
                model(input_ids=ids, attention_mask=mask, use_cache=False)
                phase[0] = "flush"
                collector.flush()
                phase[0] = "plain"
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            phase[0] = "idle"
        collector.close()
    finally:
        gc.callbacks.remove(noted)
    by_phase = Counter(f"{p}:{g}" for p, g, _ in seen)
    return {"batch": batch_size, "tokens": tokens, "passes": passes, "pause": pause, "collections": len(seen),
            "by_phase_generation": dict(sorted(by_phase.items())), "by_thread": dict(Counter(t for *_, t in seen))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1x128,4x128", help="batch x tokens, comma list")
    ap.add_argument("--passes", type=int, default=40)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--tiny", action="store_true", help="4 passes of 1 x 16, a dry run")
    args = ap.parse_args(argv)
    shapes = [tuple(map(int, s.split("x"))) for s in ("1x16" if args.tiny else args.shapes).split(",")]
    passes = 4 if args.tiny else args.passes
    on_gpu = torch.cuda.is_available() and not args.tiny
    config = minimax_config(args.layers, tiny=not on_gpu)
    device = "cuda:0" if on_gpu else "cpu"
    model = build_on_devices(config, {"": device}, torch.bfloat16 if on_gpu else torch.float32)
    anatomy = find_anatomy(model)
    rows = [count(model, anatomy, config, device, b, t, passes, pause) for b, t in shapes for pause in (True, False)]
    for r in rows:
        print(f"{r['batch']:>3} x {r['tokens']:<5} {'pause' if r['pause'] else 'no pause':>8}: {r['collections']} "
              f"collections in {r['passes']} captured + {r['passes']} plain passes; by phase:generation "
              f"{r['by_phase_generation']}; by thread {r['by_thread']}")
    write_json(args.out, "gc_counts.json", {"device": device, "layers": args.layers, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
