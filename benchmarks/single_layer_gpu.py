"""Single-layer test of a full-size MiniMax-M2 decoder layer on one GPU, through layerwise.

A one-layer MiniMax-M2 checkpoint with the real dimensions (hidden 3072, 48/8 heads, head_dim 128,
rotary_dim 64, 256 experts top-8, expert intermediate 1536; about 7.3 GB of bf16 weights, router
in fp32; seeded random weights; keys in the hub layout, `block_sparse_moe.experts.E.w1/w2/w3`) is
written to --work. For each prompt length (--tokens, default 1024 and 4096 random token ids):

  reference   `layerwise extract` of the whole one-layer model: bf16, sdpa, batch 1, on the GPU
  candidates  `replay` of layer 0 alone on the reference's recorded input (layer_loading reads
              only that layer from the shards, straight to the GPU):
                same        bf16, sdpa                 (must be bit-exact)
                eager       bf16, eager attention
                fp32        fp32 compute               (the reference's own bf16 error)
                bf16-router transformers' layer with the router cast to bf16 (a --candidate)
                scratch     tests/reference_minimax.py: a hand-written plain-torch layer (a --candidate)

and prints one table: load time and read GB/s, compute time, peak GPU memory, rel_l2 of the layer,
attention and MoE outputs, the share of tokens whose top-8 expert set differs from the reference's,
and the verdict of layerwise's compare (default tolerances by dtype, routing-aware) with the first
divergent tensor. Logs and JSON go to --out ($OUT on the device machine). Dry run on a CPU in
seconds: --tiny.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parents[1] / "src"))

from synthetic import build_on_devices, minimax_config, write_checkpoint  # noqa: E402

from layerwise import open_run  # noqa: E402
from layerwise.compare import compare_runs  # noqa: E402
from layerwise.extract import ExtractOptions, extract  # noqa: E402
from layerwise.loading import LoadOptions  # noqa: E402
from layerwise.replay import ReplayOptions, replay  # noqa: E402

CANDIDATES = {
    "same": ReplayOptions(),
    "eager": ReplayOptions(attn_implementation="eager"),
    "fp32": ReplayOptions(dtype="fp32"),
    "bf16-router": ReplayOptions(candidate=f"{HERE}:bf16_router_layer"),
    "scratch": ReplayOptions(candidate=f"{HERE.parents[1] / 'tests' / 'reference_minimax.py'}:factory"),
}


def bf16_router_layer(config, layer_index, weights):
    """transformers' own MiniMax-M2 layer with the router weight and bias cast to bf16: what a
    bf16 load without the fp32-router rule gives."""
    from transformers.models.minimax_m2.modeling_minimax_m2 import MiniMaxM2DecoderLayer

    with torch.device("meta"):
        layer = MiniMaxM2DecoderLayer(config, layer_index)
    router = ("mlp.gate.weight", "mlp.e_score_correction_bias")
    layer.load_state_dict({k: v.to(torch.bfloat16) if k in router else v for k, v in weights.items()}, assign=True)
    return layer


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def metrics(reference, candidate) -> dict:
    layer = "model.layers.0"
    out = {}
    points = (("layer", f"{layer}:output"), ("attn", f"{layer}.self_attn:output"), ("moe", f"{layer}.mlp:output"))
    for key, name in points:
        if candidate.has(name, 0):
            out[key] = rel_l2(candidate.tensor(name, 0), reference.tensor(name, 0))
    ids = f"{layer}.mlp.gate:topk_ids"
    if candidate.has(ids, 0):
        a = candidate.tensor(ids, 0).sort(-1).values
        b = reference.tensor(ids, 0).sort(-1).values
        out["routing_flips"] = (a != b).any(-1).float().mean().item()
    return out


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"), help="logs and JSON (default: $OUT)")
    ap.add_argument("--work", default="/tmp/layerwise-single-layer", help="checkpoint and runs (about 10 GB)")
    ap.add_argument("--tokens", default=None, help="prompt lengths, comma list (default: 1024,4096; --tiny: 32,128)")
    ap.add_argument("--tiny", action="store_true", help="MiniMax-M2 shrunk to the tiny built-in: a CPU dry run")
    ap.add_argument("--candidates", default=",".join(CANDIDATES), help="which candidates to run")
    args = ap.parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    tokens = [int(t) for t in (args.tokens or ("32,128" if args.tiny else "1024,4096")).split(",")]
    log_lines: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        log_lines.append(line)

    say(f"machine: {torch.cuda.get_device_name(0) if device != 'cpu' else platform.processor() or 'cpu'}; "
        f"torch {torch.__version__}; transformers {__import__('transformers').__version__}")
    ckpt = work / ("ckpt-tiny" if args.tiny else "ckpt")
    t0 = time.perf_counter()
    if not (ckpt / "config.json").is_file():
        config = minimax_config(1, tiny=args.tiny)
        model = build_on_devices(config, {"": device})
        write_checkpoint(model, ckpt, shard="2GB")
        del model
        gc.collect()
        torch.cuda.empty_cache() if device != "cpu" else None
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    say(f"checkpoint {ckpt}: {size / 1e9:.2f} GB in {len(list(ckpt.glob('*.safetensors')))} shard(s), "
        f"ready in {time.perf_counter() - t0:.1f} s")

    rows = []
    generator = torch.Generator().manual_seed(0)
    for length in tokens:
        ids = torch.randint(0, 500 if args.tiny else 32000, (length,), generator=generator).tolist()
        ref_dir = work / f"ref-{length}"
        t0 = time.perf_counter()
        extract(str(ckpt), str(ref_dir), [ids], ExtractOptions(points="residual,attn,mlp,router", batch_size=1,
                                                                overwrite=True),
                LoadOptions(device_map=device, dtype="bf16", attn_implementation="sdpa"))
        gc.collect()
        say(f"reference {length} tokens: extract {time.perf_counter() - t0:.1f} s")
        reference = open_run(ref_dir)
        for name in args.candidates.split(","):
            gc.collect()
            if device != "cpu":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            sync()
            t0 = time.perf_counter()
            result = replay(str(ckpt), reference, [0], replace(CANDIDATES[name], overwrite=True),
                            isolated=work / f"cand-{length}-{name}")
            sync()
            wall = time.perf_counter() - t0
            peak = torch.cuda.max_memory_allocated(device) if device != "cpu" else 0
            candidate = open_run(result.isolated)
            m = metrics(reference, candidate)
            t1 = time.perf_counter()
            judged = compare_runs(reference, candidate)
            m["compare_s"] = time.perf_counter() - t1
            first = judged.first_divergence
            verdict = "exact" if m["layer"] == 0 else ("PASS" if judged.passed else f"FAIL at {first.name}")
            rows.append({"tokens": length, "candidate": name, "load_s": result.load_seconds,
                         "read_gb_s": result.bytes_read / result.load_seconds / 1e9 if result.load_seconds else 0,
                         "compute_s": wall - result.load_seconds, "peak_gpu_gb": peak / 1e9, **m, "verdict": verdict,
                         "weights_gb": result.bytes_read / 1e9})
    say()
    header = f"{'tokens':>6} {'candidate':<12} {'load s':>7} {'GB/s':>6} {'run s':>6} {'peak GB':>8} " \
             f"{'layer rel_l2':>12} {'attn':>9} {'moe':>9} {'flips':>7}  verdict"
    say(header)
    say("-" * len(header))
    for r in rows:
        say(f"{r['tokens']:>6} {r['candidate']:<12} {r['load_s']:>7.2f} {r['read_gb_s']:>6.2f} {r['compute_s']:>6.2f} "
            f"{r['peak_gpu_gb']:>8.2f} {r['layer']:>12.3e} {r.get('attn', float('nan')):>9.2e} "
            f"{r.get('moe', float('nan')):>9.2e} {r.get('routing_flips', float('nan')):>7.2%}  {r['verdict']}")
    say(f"(verdict: layerwise compare with its default tolerances; weights read per load "
        f"{rows[0]['weights_gb']:.2f} GB; 'run s' = compute + writing the run)")
    (out / "single_layer_gpu.json").write_text(json.dumps({"rows": rows, "tiny": args.tiny}, indent=1))
    (out / "single_layer_gpu.log").write_text("\n".join(log_lines) + "\n")
    bad = [r for r in rows if r["candidate"] == "same" and r["verdict"] != "exact"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
