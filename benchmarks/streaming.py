"""Streaming a model from disk, side by side with a device_map load + extract of the same model.

A MiniMax-M2-shaped checkpoint (real dimensions, --layers layers, seeded random bf16 weights) is
written to --dir. With the page cache dropped before each (when allowed), it times:

  disk_read   reading every shard once (the floor's I/O term: bytes / this bandwidth)
  stream      `extract --stream` of the prompts on one GPU (layer K+1 read while K computes)
  device_map  from_pretrained(device_map) + `extract` of the same prompts (the model fits here)
  offload     accelerate disk offload (--offload-gb of GPU for weights, the rest from disk):
              one forward of one prompt, for its seconds-per-forward

The floor for streaming is bytes / disk_read + compute (the device_map forward time). The
streamed and device_map runs are compared tensor by tensor (they must be bit-identical).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import build_on_devices, minimax_config, write_checkpoint  # noqa: E402

from layerwise import loading, runs  # noqa: E402
from layerwise.extract import ExtractOptions, extract_model  # noqa: E402
from layerwise.streaming import StreamOptions, stream_extract  # noqa: E402


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def read_all(directory: Path) -> tuple[int, float]:
    total, start = 0, time.perf_counter()
    for f in sorted(directory.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while chunk := fh.read(64 << 20):
                total += len(chunk)
    return total, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=None, help="fewer experts than 256 (smaller checkpoint)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--dir", default="/tmp/lw-stream-ckpt")
    ap.add_argument("--work", default="/tmp/lw-stream-work", help="where the runs are written (not $OUT: GBs)")
    ap.add_argument("--offload-gb", type=float, default=0, help="also time accelerate disk offload (0: skip)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--bench-md", default=None)
    args = ap.parse_args(argv)
    out, ckpt, work = Path(args.out), Path(args.dir), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    card = torch.cuda.get_device_name(0) if device != "cpu" else "cpu"
    config = minimax_config(args.layers, tiny=args.tiny, experts=args.experts)
    if not (ckpt / "config.json").exists():
        t0 = time.perf_counter()
        write_checkpoint(build_on_devices(config, {"": device}), ckpt, shard="4GB")
        if device != "cpu":
            torch.cuda.empty_cache()
        print(f"wrote {ckpt} in {time.perf_counter() - t0:.1f} s", flush=True)
    ckpt_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    items = [torch.randint(0, config.vocab_size, (args.tokens,), generator=torch.Generator().manual_seed(i)).tolist()
             for i in range(args.prompts)]
    options = ExtractOptions(points="residual,router", batch_size=1, overwrite=True)
    cold = drop_caches()
    nbytes, read_s = read_all(ckpt)
    read_bw = nbytes / read_s / 1e9
    print(f"checkpoint {nbytes / 1e9:.2f} GB read in {read_s:.2f} s = {read_bw:.2f} GB/s (cold cache: {cold})", flush=True)

    drop_caches()
    t0 = time.perf_counter()
    streamed, stats = stream_extract(str(ckpt), work / "stream-run", items, options, StreamOptions(device=device))
    stream_s = time.perf_counter() - t0
    print(f"stream: {stream_s:.2f} s; weights {stats.weights_read_bytes / 1e9:.2f} GB, read {stats.read_seconds:.2f} s, "
          f"waited {stats.wait_seconds:.2f} s, peak device {stats.peak_device_bytes / 1e9:.2f} GB", flush=True)

    drop_caches()
    t0 = time.perf_counter()
    loaded = loading.load_model(str(ckpt), loading.LoadOptions(device_map=device if device != "cpu" else "cpu",
                                                               tokens=args.tokens))
    load_s = time.perf_counter() - t0
    full = extract_model(loaded, work / "full-run", items, options)
    device_map_s = time.perf_counter() - t0
    peak_full = torch.cuda.max_memory_allocated(device) if device != "cpu" else 0
    compute_s = full.forward_seconds
    print(f"device_map: load {load_s:.2f} s + extract {full.seconds:.2f} s (forward {compute_s:.2f} s) = "
          f"{device_map_s:.2f} s; peak device {peak_full / 1e9:.2f} GB", flush=True)

    a, b = runs.open_run(work / "stream-run"), runs.open_run(work / "full-run")
    mismatched = [(n, p) for n in a.names for p in range(args.prompts) if not torch.equal(a.tensor(n, p), b.tensor(n, p))]
    print(f"streamed vs device_map: {len(a.names) * args.prompts} tensors, {len(mismatched)} differ", flush=True)
    del loaded
    if device != "cpu":
        torch.cuda.empty_cache()

    offload = None
    if args.offload_gb and device != "cpu":
        drop_caches()
        off_dir = work / "offload"
        t0 = time.perf_counter()
        model = loading.load_model(str(ckpt), loading.LoadOptions(device_map="sequential", tokens=args.tokens,
                                   max_memory=f"0:{args.offload_gb}GB,cpu:1GB", offload_folder=str(off_dir)),
                                   with_tokenizer=False).model
        off_load = time.perf_counter() - t0
        ids = torch.tensor([items[0]], device="cuda:0")
        with torch.inference_mode():
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            torch.cuda.synchronize()
            off_fwd = time.perf_counter() - t0
        offload = {"gpu_gb": args.offload_gb, "load_s": off_load, "forward_s": off_fwd}
        print(f"accelerate offload: load {off_load:.2f} s, one forward {off_fwd:.2f} s", flush=True)
        del model
        shutil.rmtree(off_dir, ignore_errors=True)

    floor = nbytes / (read_bw * 1e9) + compute_s
    result = {"card": card, "layers": args.layers, "checkpoint_gb": ckpt_bytes / 1e9, "disk_read_gb_s": read_bw,
              "cold_cache": cold, "prompts": args.prompts, "tokens": args.tokens, "stream_s": stream_s,
              "stream_read_s": stats.read_seconds, "stream_wait_s": stats.wait_seconds,
              "stream_peak_device_gb": stats.peak_device_bytes / 1e9, "device_map_s": device_map_s,
              "device_map_load_s": load_s, "compute_s": compute_s, "device_map_peak_gb": peak_full / 1e9,
              "floor_s": floor, "ratio": stream_s / floor, "mismatched_tensors": len(mismatched), "offload": offload,
              "versions": runs.library_versions()}
    (out / "streaming.json").write_text(json.dumps(result, indent=1))
    v = result["versions"]
    layer_gb = ckpt_bytes / 1e9 / args.layers
    md = [f"### streaming: {card}, MiniMax-M2 dims, {args.layers} layers{'' if not args.experts else f', {args.experts} experts'} "
          f"({ckpt_bytes / 1e9:.1f} GB checkpoint), {args.prompts} x {args.tokens} tokens, torch {v['torch']}, "
          f"transformers {v['transformers']}", "",
          "| what | seconds | note |", "|---|---|---|",
          f"| disk read of the checkpoint | {read_s:.2f} | {read_bw:.2f} GB/s ({'page cache dropped' if cold else 'warm page cache'}) |",
          f"| `extract --stream` (1 GPU) | {stream_s:.2f} | floor {floor:.2f} s = bytes/disk + compute {compute_s:.2f} s: "
          f"**{stream_s / floor:.2f}x**; waited for weights {stats.wait_seconds:.2f} s; peak GPU memory "
          f"{stats.peak_device_bytes / 1e9:.1f} GB (~{stats.peak_device_bytes / 1e9 / layer_gb:.1f} layers of {layer_gb:.1f} GB) |",
          f"| `from_pretrained(device_map)` + `extract` | {device_map_s:.2f} | load {load_s:.2f} s; peak GPU memory "
          f"{peak_full / 1e9:.1f} GB |"]
    if offload:
        md.append(f"| accelerate disk offload, 1 forward of {args.tokens} tokens | {offload['forward_s']:.2f} | "
                  f"{offload['gpu_gb']} GB of weights on the GPU, the rest from disk; load {offload['load_s']:.2f} s |")
    md += ["", f"Streamed and device_map runs: {len(mismatched)} of {len(a.names) * args.prompts} tensors differ.", ""]
    table = "\n".join(md)
    print(table)
    (out / "streaming.md").write_text(table + "\n")
    if args.bench_md:
        with open(args.bench_md, "a") as fh:
            fh.write("\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
