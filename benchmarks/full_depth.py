"""The real MiniMax-M2 depth (62 layers, real dimensions, 457 GB bf16) over all GPUs present.

For the 8-GPU issue, on whatever machine is lent. Seeded random weights are generated straight
on the GPUs (no checkpoint: the machine's disk cannot hold 457 GB), placed by the planner:

1. plan the real configuration for the GPUs present with auto / balanced / balanced_low_0 /
   sequential, then build the model with the `auto` map and compare planned and real per-GPU
   memory (weights, then peak during a 4096-token forward against the planned reserve);
2. the placement report;
3. extract of --prompts prompts (residual + router) with the forward overhead of capture
   measured against the plain forward in the same run (interleaved rounds);
4. compare the fp32-router reference with a bf16-router candidate (transformers' own casting).

Single-layer tests of full-size layers by streaming are benchmarks/single_layer_gpu.py (one GPU):
a 62-layer checkpoint does not fit on these machines' disks, and a layer test reads its layer from
a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extract_overhead import interleaved, NullWriter  # noqa: E402
from synthetic import build_on_devices, minimax_config  # noqa: E402

from layerwise import capture, loading, models, placement, report, runs  # noqa: E402
from layerwise.anatomy import find_anatomy  # noqa: E402
from layerwise.collector import Collector  # noqa: E402
from layerwise.extract import ExtractOptions, extract_model  # noqa: E402
from layerwise.prompts import Prompt, make_batches  # noqa: E402


def sh(*argv) -> str:
    proc = subprocess.run([sys.executable, "-m", "layerwise", *argv], capture_output=True, text=True)
    return proc.stdout + proc.stderr


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=62)
    ap.add_argument("--tokens", default="1024,4096")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--work", default="/tmp/lw-full")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    log: dict = {"versions": runs.library_versions()}
    token_sizes = [int(t) for t in args.tokens.split(",")]
    max_tokens = max(token_sizes)

    # 1. plans
    for strategy in ("auto", "balanced", "balanced_low_0", "sequential"):
        print(f"=== layerwise plan builtin:minimax-m2 --device-map {strategy}", flush=True)
        print(sh("plan", "builtin:minimax-m2", "--device-map", strategy, "--tokens", str(max_tokens)), flush=True)
    config = minimax_config(args.layers, tiny=args.tiny)
    dtype = torch.bfloat16
    meta = placement.meta_model(config, dtype)
    gpus = [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    plan = placement.plan_placement(meta, gpus, "auto", cpu_bytes=0, tokens=max_tokens, dtype=dtype) if gpus else \
        placement.plan_placement(meta, [], {"": "cpu"}, cpu_bytes=10**13, dtype=dtype)
    print(report.plan_text(plan), flush=True)
    if gpus and not plan.fits:
        raise SystemExit(f"the model does not fit on these GPUs: {plan.verdict}")
    t0 = time.perf_counter()
    model = build_on_devices(config, plan.device_map, dtype)
    build_s = time.perf_counter() - t0
    anatomy = find_anatomy(model)
    device = loading.input_device(model, anatomy)
    loaded = loading.LoadedModel(model, models.ModelRef("synthetic:minimax-m2", "checkpoint", None), [], plan,
                                 anatomy, build_s)
    rows = loading.placement_rows(loaded)
    print(report.placement_text(loaded, rows), flush=True)
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)
        ids = torch.randint(0, config.vocab_size, (1, max_tokens), device=device)
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)
        torch.cuda.synchronize()
    planned = {d.device: d for d in plan.devices}
    vs = []
    for r in rows:
        p = planned.get(r.device)
        peak = torch.cuda.max_memory_allocated(int(r.device[5:])) if r.device.startswith("cuda") else 0
        vs.append({"device": r.device, "planned_weights_gb": p.weight_bytes / 1e9 if p else None,
                   "actual_weights_gb": r.weight_bytes / 1e9, "allocated_gb": (r.allocated_bytes or 0) / 1e9,
                   "planned_total_gb": p.total_bytes / 1e9 if p else None, "peak_forward_gb": peak / 1e9})
    log["plan_vs_actual"] = vs
    print("plan vs actual:", json.dumps(vs, indent=1), flush=True)

    # 3. capture overhead, interleaved, then extract the reference run
    overhead = []
    targets = capture.plan_targets(anatomy, ("residual", "router"), tuple(range(anatomy.num_layers)))
    for tokens in token_sizes:
        ids = torch.randint(0, config.vocab_size, (1, tokens), device=device)

        def plain():
            with torch.inference_mode():
                model(input_ids=ids, use_cache=False)

        collector = Collector(NullWriter(), targets)
        hooks = capture.Capture(model, targets, collector)
        batch = make_batches([Prompt(0, None, tuple(ids[0].tolist()))], 1, 0)[0]

        def on():
            hooks.__enter__()
            collector.start_batch(batch)

        def captured():
            plain()
            collector.flush()

        t = interleaved({"plain": plain, "lw": (on, captured, lambda _: hooks.__exit__(None, None, None)),
                         "plain_again": plain}, args.reps)
        collector.close()
        t = {k: statistics.median(v) for k, v in t.items()}
        row = {"tokens": tokens, "plain_ms": t["plain"] * 1e3, "plain_again_ms": t["plain_again"] * 1e3,
               "lw_ms": t["lw"] * 1e3, "ratio": t["lw"] / t["plain"]}
        overhead.append(row)
        print(json.dumps(row), flush=True)
    log["overhead"] = overhead
    gen = torch.Generator().manual_seed(1)
    lengths = [token_sizes[i % len(token_sizes)] for i in range(args.prompts)]
    items = [torch.randint(0, config.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    options = ExtractOptions(points="residual,router,logits", batch_size=1, overwrite=True)
    ref = extract_model(loaded, work / "ref", items, options)
    log["extract"] = {"prompts": ref.prompts, "tokens": lengths, "bytes": ref.bytes, "seconds": ref.seconds,
                      "forward_seconds": ref.forward_seconds, "gb_per_s": ref.gb_per_s}
    print("extract:", json.dumps(log["extract"]), flush=True)

    # 4. bf16 router candidate vs fp32 router reference
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.data = layer.mlp.gate.weight.data.to(torch.bfloat16)
            layer.mlp.e_score_correction_bias.data = layer.mlp.e_score_correction_bias.data.to(torch.bfloat16)
    cand = extract_model(loaded, work / "cand", items, options)
    print(f"candidate extract {cand.seconds:.1f} s", flush=True)
    t0 = time.perf_counter()
    text = sh("compare", str(work / "ref"), str(work / "cand"), "--json", str(out / "compare.json"),
              "--plot", str(out / "compare.png"))
    log["compare_s"] = time.perf_counter() - t0
    print(text, flush=True)
    (out / "compare.txt").write_text(text)
    (out / "full_depth.json").write_text(json.dumps(log, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
