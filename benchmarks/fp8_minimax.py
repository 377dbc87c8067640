"""MiniMax-M2 in block FP8 on the GPU: the error serving engines' FP8 arithmetic adds, layer by layer.

Three parts, each printing one table and writing JSON to --out (real MiniMax-M2 dimensions,
seeded random weights quantized to e4m3 in 128x128 blocks as the release is; --tiny: the tiny
dimensions with 16x16 blocks, on the CPU, in seconds):

  layer       one full-size layer (3.7 GB of FP8) written as a real checkpoint, read cold,
              dequantized on the GPU and replayed: for each prompt length the reference is
              `extract --stream --quant dequantize` (bf16), the candidate `--quant fp8`
              (W8A8 through torch's block-scaled scaled_mm); per-layer, attention and MoE rel_l2,
              routing flips, and the layer's forward time in FP8 against bf16 (CUDA events).
  full-depth  all --layers layers built in GPU memory as FP8 (230 GB over 2 H200s for 62), the
              bf16 reference streamed from them (each layer dequantized just in time, then
              dropped), then `test --layer all --quant fp8` from the same weights: isolated and
              propagated error of every layer, with wall time per layer and in total against the
              time to read the FP8 bytes at the disk bandwidth measured in the same run.
  stream      --layers real-size FP8 layers as a checkpoint on disk, page cache dropped:
              `extract --stream` against the cold-read floor of the same files; peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parents[1] / "src"))

from synthetic import drop_page_cache, fp8_tensors, minimax_config, minimax_layer_shapes, shared_shapes, write_fp8_checkpoint  # noqa: E402

from layerwise import compare, open_run, replay, runs, zoo  # noqa: E402
from layerwise.extract import ExtractOptions  # noqa: E402
from layerwise.layer_loading import LayerOptions, open_layers  # noqa: E402
from layerwise.layer_test import isolation_table  # noqa: E402
from layerwise.rebatch import recorded_input, reference_batches  # noqa: E402
from layerwise.replay import ReplayOptions  # noqa: E402
from layerwise.streaming import StreamOptions, forward_layer, stream_extract  # noqa: E402
from layerwise.weights import MemoryStore  # noqa: E402

POINTS = "residual,attn,mlp,router"


def uncache(directory: Path) -> None:
    """Drop a directory's files from the page cache: the next read comes from the disk."""
    drop_page_cache(f for f in sorted(directory.rglob("*")) if f.is_file())


def cold_read_gbps(directory: Path) -> tuple[float, int]:
    """Read every file once from the disk (page cache dropped): GB/s and bytes."""
    uncache(directory)
    total, start = 0, time.perf_counter()
    for f in sorted(directory.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while chunk := fh.read(64 << 20):
                total += len(chunk)
    return total / (time.perf_counter() - start) / 1e9, total


def disk_bandwidth(work: Path, gib: float) -> float:
    """Cold-read GB/s of a fresh file of `gib` GiB on the disk holding `work`."""
    probe = work / "disk-probe"
    probe.mkdir(parents=True, exist_ok=True)
    block = os.urandom(64 << 20)
    with open(probe / "probe.safetensors", "wb") as fh:
        for _ in range(max(1, int(gib * 16))):
            fh.write(block)
    gbps, _ = cold_read_gbps(probe)
    (probe / "probe.safetensors").unlink()
    return gbps


def prompts_of(tokens: int, count: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, min(vocab, 200000), (tokens,), generator=g).tolist() for _ in range(count)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed_forward_ms(layer, module, x, mask, device: str, repeats: int = 5) -> float:
    """Median milliseconds of one layer forward (CUDA events on a GPU)."""
    times = []
    for _ in range(repeats + 1):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            forward_layer(layer, module, x, mask, "timing")
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            forward_layer(layer, module, x, mask, "timing")
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times[1:])[len(times[1:]) // 2]


def layer_rows(ref, cand, layers: list[int]) -> list[dict]:
    """Per layer: output, attention and MoE rel_l2 (worst prompt) and routing flips."""
    report = compare.compare_runs(ref, cand)
    out = []
    for k in layers:
        row = {"layer": k}
        for key, module, role in (("output", f"model.layers.{k}", "output"),
                                  ("attn", f"model.layers.{k}.self_attn", "output"),
                                  ("moe", f"model.layers.{k}.mlp", "output")):
            found = [r.rel_l2 for r in report.rows if r.module == module and r.role == role]
            row[key] = max(found) if found else None
        routing = next((r.routing for r in report.routing if r.layer == k and r.routing), None)
        row["flips"] = routing.flips if routing else None
        row["tokens"] = routing.tokens if routing else None
        out.append(row)
    return out


def fmt(x) -> str:
    return "-" if x is None else f"{x:.2e}" if isinstance(x, float) else str(x)


# ------------------------------------------------------------------------------ parts

def part_layer(args, device: str, block) -> dict:
    config = minimax_config(1, tiny=args.tiny)
    ckpt = args.work / "fp8-layer"
    nbytes = write_fp8_checkpoint(config, ckpt, device, block)
    gbps, _ = cold_read_gbps(ckpt)
    results = []
    for tokens in args.tokens:
        prompts = prompts_of(tokens, 2, config.vocab_size, tokens)
        ref_path, iso_path = args.work / f"layer-ref-{tokens}", args.work / f"layer-fp8-{tokens}"
        uncache(ckpt)
        t0 = time.perf_counter()
        stream_extract(str(ckpt), ref_path, prompts, ExtractOptions(points=POINTS, batch_size=2, overwrite=True),
                       StreamOptions(dtype="bf16", device=device, quant="dequantize"))
        ref_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = replay.replay(str(ckpt), ref_path, [0], ReplayOptions(device=device, quant="fp8", overwrite=True),
                               isolated=iso_path)
        fp8_s = time.perf_counter() - t0
        ref = open_run(ref_path)
        row = layer_rows(ref, open_run(iso_path), [0])[0]
        # forward time of the layer: FP8 (scaled_mm) against bf16, same input batch
        src = {m: open_layers(str(ckpt), LayerOptions(dtype="bf16", device=device, quant=m))
               for m in ("dequantize", "fp8")}
        batches, _ = reference_batches(ref, "model.layers.0")
        x = recorded_input(ref, "model.layers.0", batches[0], torch.bfloat16, torch.device(device))
        mask = batches[0].attention_mask
        ms = {}
        for mode, source in src.items():
            t0 = time.perf_counter()
            layer = source.load(0)
            sync(device)
            load_s = time.perf_counter() - t0
            with torch.inference_mode():
                ms[mode] = (timed_forward_ms(layer, layer.module, x, mask, device), load_s)
            del layer
        row.update(tokens=tokens, reference_s=ref_s, fp8_test_s=fp8_s, deterministic=result.deterministic,
                   bf16_forward_ms=ms["dequantize"][0], fp8_forward_ms=ms["fp8"][0],
                   bf16_load_s=ms["dequantize"][1], fp8_load_s=ms["fp8"][1])
        results.append(row)
    print(f"\none MiniMax-M2 layer in FP8 ({nbytes / 1e9:.2f} GB, cold read {gbps:.2f} GB/s), 2 prompts per length")
    print("tokens  layer rel_l2  attn rel_l2  MoE rel_l2  flips        bf16 fwd   fp8 fwd  fp8/bf16  load bf16/fp8 s")
    for r in results:
        print(f"{r['tokens']:>6}  {fmt(r['output']):>12}  {fmt(r['attn']):>11}  {fmt(r['moe']):>10}  "
              f"{r['flips']}/{r['tokens'] and r['tokens']:<6}  {r['bf16_forward_ms']:7.2f} ms {r['fp8_forward_ms']:7.2f} ms"
              f"  {r['fp8_forward_ms'] / r['bf16_forward_ms']:7.2f}x  {r['bf16_load_s']:.2f} / {r['fp8_load_s']:.2f}")
    return {"bytes": nbytes, "cold_read_gbps": gbps, "rows": results}


def memory_store(config, devices: list[str], block, split: float) -> tuple[MemoryStore, float]:
    """Every layer's FP8 tensors made on the GPUs: the first `split` share of layers (and the
    embedding, norm and head) on devices[0], the rest on devices[-1]."""
    start = time.perf_counter()
    n = config.num_hidden_layers
    first = math.ceil(n * split) if len(devices) > 1 else n
    tensors: dict = {}
    gens = {d: torch.Generator(device=d).manual_seed(i) for i, d in enumerate(devices)}
    tensors.update(fp8_tensors(shared_shapes(config), devices[0], block, gens[devices[0]]))
    for k in range(n):
        d = devices[0] if k < first else devices[-1]
        tensors.update(fp8_tensors(minimax_layer_shapes(config, k), d, block, gens[d]))
    for d in devices:
        sync(d)
    return MemoryStore(tensors, "FP8 weights in GPU memory"), time.perf_counter() - start


def write_config(config, directory: Path, block) -> Path:
    """A config.json alone (the weights live in memory): the model argument for the layers."""
    directory.mkdir(parents=True, exist_ok=True)
    raw = dict(zoo.MINIMAX_M2_CONFIG)
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rotary_dim", "num_local_experts", "num_experts_per_tok",
                "vocab_size", "bos_token_id", "eos_token_id"):
        raw[key] = getattr(config, key)
    raw["quantization_config"] = {**zoo.MINIMAX_M2_FP8, "weight_block_size": list(block)}
    (directory / "config.json").write_text(json.dumps(raw))
    return directory


def part_full_depth(args, devices: list[str], block) -> dict:
    config = minimax_config(args.layers, tiny=args.tiny)
    store, build_s = memory_store(config, devices, block, args.split)
    fp8_bytes = sum(t.numel() * t.element_size() for t in store.tensors.values())
    spec = str(write_config(config, args.work / "fp8-config", block))
    disk_gbps = disk_bandwidth(args.work, args.disk_probe_gib)
    prompts = prompts_of(args.tokens[0], args.prompts, config.vocab_size, 7)
    compute = devices[0]
    deq = open_layers(spec, LayerOptions(dtype="bf16", device=compute, quant="dequantize"), store=store)
    ref_path = args.work / "deep-ref"
    t0 = time.perf_counter()
    stream_extract(spec, ref_path, prompts, ExtractOptions(points=POINTS, batch_size=args.prompts, overwrite=True),
                   source=deq)
    ref_s = time.perf_counter() - t0
    layers = list(range(config.num_hidden_layers))
    cand = open_layers(spec, LayerOptions(dtype="bf16", device=compute, quant="fp8"), store=store)
    t0 = time.perf_counter()
    result = replay.replay(spec, ref_path, layers, ReplayOptions(overwrite=True), isolated=args.work / "deep-iso",
                           chained=args.work / "deep-chain", source=cand)
    test_s = time.perf_counter() - t0
    ref = open_run(ref_path)
    iso, chain = open_run(args.work / "deep-iso"), open_run(args.work / "deep-chain")
    rows = layer_rows(ref, iso, layers)
    table = isolation_table(compare.compare_runs(ref, iso), compare.compare_runs(ref, chain), tuple(layers))
    for row, t in zip(rows, table):
        row.update(isolated=t.isolated_rel_l2, propagated=t.propagated_rel_l2, propagated_flips=t.propagated_flips)
    floor_s = fp8_bytes / (disk_gbps * 1e9)
    peak = {d: torch.cuda.max_memory_allocated(d) / 1e9 for d in devices if d.startswith("cuda")}
    print(f"\nall {len(layers)} MiniMax-M2 layers in FP8 in GPU memory ({fp8_bytes / 1e9:.1f} GB over {devices}, "
          f"built in {build_s:.1f} s); {args.prompts} prompt(s) x {args.tokens[0]} tokens")
    print("layer  isolated  propagated  attn      MoE       flips iso/prop")
    for r in rows:
        print(f"{r['layer']:>5}  {fmt(r['isolated']):>8}  {fmt(r['propagated']):>10}  {fmt(r['attn']):>8}  "
              f"{fmt(r['moe']):>8}  {r['flips']}/{r['propagated_flips']}")
    print(f"reference (streamed, dequantized just in time): {ref_s:.1f} s; test --layer all --quant fp8: {test_s:.1f} s "
          f"({test_s / len(layers):.2f} s per layer, isolated + chained); disk {disk_gbps:.2f} GB/s: reading "
          f"{fp8_bytes / 1e9:.0f} GB would take {floor_s:.0f} s; deterministic: {result.deterministic}; "
          f"peak GB {peak}")
    return {"fp8_bytes": fp8_bytes, "build_s": build_s, "reference_s": ref_s, "test_s": test_s,
            "per_layer_s": test_s / len(layers), "disk_gbps": disk_gbps, "disk_floor_s": floor_s,
            "peak_gb": peak, "rows": rows, "notes": list(result.notes)}


def part_stream(args, device: str, block) -> dict:
    config = minimax_config(args.layers, tiny=args.tiny)
    ckpt = args.work / "fp8-stream"
    write_fp8_checkpoint(config, ckpt, device, block)
    gbps, read_bytes = cold_read_gbps(ckpt)
    floor_s = read_bytes / (gbps * 1e9)
    prompts = prompts_of(args.tokens[0], args.prompts, config.vocab_size, 11)
    uncache(ckpt)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    result, stats = stream_extract(str(ckpt), args.work / "stream-run", prompts,
                                   ExtractOptions(points="residual,router", batch_size=args.prompts, overwrite=True),
                                   StreamOptions(dtype="bf16", device=device, quant="dequantize"))
    seconds = time.perf_counter() - t0
    print(f"\nstreaming {args.layers} FP8 layers from disk ({read_bytes / 1e9:.1f} GB, cold read {gbps:.2f} GB/s, "
          f"floor {floor_s:.1f} s): {seconds:.1f} s = {seconds / floor_s:.2f}x the floor; weights read "
          f"{stats.weights_read_bytes / 1e9:.1f} GB, compute waited {stats.wait_seconds:.1f} s for reads; "
          f"peak device memory {stats.peak_device_bytes / 1e9:.1f} GB")
    return {"bytes": read_bytes, "cold_read_gbps": gbps, "floor_s": floor_s, "seconds": seconds,
            "ratio": seconds / floor_s, "peak_device_gb": stats.peak_device_bytes / 1e9,
            "wait_s": stats.wait_seconds, "weights_read_gb": stats.weights_read_bytes / 1e9}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=("layer", "full-depth", "stream"))
    ap.add_argument("--tiny", action="store_true", help="tiny dimensions on the CPU (a dry run)")
    ap.add_argument("--layers", type=int, default=62)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--split", type=float, default=0.45, help="full-depth: share of layers on the first GPU")
    ap.add_argument("--disk-probe-gib", type=float, default=4.0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/layerwise-fp8"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    block = (16, 16) if args.tiny else (128, 128)
    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if not args.tiny else []
    device = gpus[0] if gpus else "cpu"
    card = torch.cuda.get_device_name(0) if gpus else "cpu"
    if args.part == "layer":
        data = part_layer(args, device, block)
    elif args.part == "full-depth":
        data = part_full_depth(args, gpus or ["cpu"], block)
    else:
        data = part_stream(args, device, block)
    data.update(card=card, gpus=len(gpus), torch=torch.__version__, args={k: str(v) for k, v in vars(args).items()},
                versions=runs.library_versions())
    (args.out / f"fp8_{args.part}.json").write_text(json.dumps(data, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
