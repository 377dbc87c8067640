"""What a process's first forward pass of a decoder layer costs, and what a rehearsal takes off it.

Each round is a fresh process (what a `layerwise test` process or a torchrun rank is): it makes a
MiniMax-M2-size decoder layer (real dimensions, seeded random bf16 weights, generated on the GPU,
served from memory: no disk), then, as the layer test does while its first layer is read,
`timings.warm_device` and - in the "rehearsed" mode only - `streaming.rehearse` (a miniature of the
layer, a few experts, one batch's shape). Then the real layer is built with layerwise's own
loading code and run over the same batch (batch x tokens random hidden states) three times, each
timed to the GPU's end. What the first pass costs beyond the third is what one process pays once;
the rehearsal's seconds are paid while the first layer is read, where nothing waits for them.

    python benchmarks/first_forward.py --rounds 3            # one GPU, batch 4 x 1024 tokens
    python benchmarks/first_forward.py --tiny                # CPU dry run (tests/test_benchmarks.py)

Modes alternate (plain, rehearsed, plain, ...), --rounds of each. Prints a table; JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("plain", "rehearsed")


def child(args) -> dict:
    """One fresh process's measurements (run with --child MODE)."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from synthetic import build_on_devices, minimax_config

    from layerwise import streaming, timings
    from layerwise.layer_loading import LayerOptions, open_layers
    from layerwise.streaming import forward_layer
    from layerwise.weights import MemoryStore

    device = "cpu" if args.tiny else "cuda:0"
    sync = (lambda: torch.cuda.synchronize(device)) if device != "cpu" else (lambda: None)
    started = time.perf_counter()
    config = minimax_config(1, tiny=args.tiny)
    model = build_on_devices(config, {"": 0 if device != "cpu" else "cpu"})
    store = MemoryStore(dict(model.state_dict()), "a random MiniMax-M2-size layer in memory")
    with tempfile.TemporaryDirectory(prefix="first-forward-") as config_dir:  # config.json alone
        config.save_pretrained(config_dir)
        source = open_layers(config_dir, LayerOptions(dtype="bf16", device=device), store=store)
    sync()
    made = time.perf_counter() - started
    shape = (args.batch, args.tokens)
    start = time.perf_counter()
    timings.warm_device(source.device, source.dtype)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    rehearsed = None
    if args.child == "rehearsed":  # on a CPU the miniature runs itself (rehearse() is for GPUs only)
        rehearsed = streaming.rehearse(source, 0, shape) if device != "cpu" else \
            bool(streaming.miniature_pass(source, 0, shape) is not None)
    rehearse_s = time.perf_counter() - start
    loaded = source.load(0)
    generator = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(*shape, config.hidden_size, dtype=torch.bfloat16, device=device, generator=generator)
    mask = torch.ones(shape, dtype=torch.long)
    passes = []
    outputs = []
    with torch.inference_mode():
        for _ in range(3):
            sync()
            start = time.perf_counter()
            outputs.append(forward_layer(loaded, loaded.module, x, mask, "layer 0"))
            sync()
            passes.append(time.perf_counter() - start)
    same = all(torch.equal(outputs[0], y) for y in outputs[1:])
    return {"mode": args.child, "made_s": made, "warm_s": warm, "rehearse_s": rehearse_s, "rehearsed": rehearsed,
            "passes_s": passes, "first_beyond_third_s": passes[0] - passes[2], "outputs_equal": same}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per mode")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--tiny", action="store_true", help="CPU dry run with the tiny dimensions")
    ap.add_argument("--out", type=Path, default=None, help="folder for first_forward.json")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from synthetic import layerwise_env

    env = layerwise_env()
    rows = []
    for r in range(args.rounds):
        for mode in MODES:
            cmd = [sys.executable, __file__, "--child", mode, "--batch", str(args.batch), "--tokens", str(args.tokens)]
            cmd += ["--tiny"] if args.tiny else []
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                print(f"error: round {r + 1}, mode {mode}: the child process failed (exit {done.returncode})",
                      file=sys.stderr)
                return 1
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"round {r + 1} {mode:9s} warm {row['warm_s']:.3f} s  rehearse {row['rehearse_s']:.3f} s  passes "
                  + " / ".join(f"{p * 1e3:.1f}" for p in row["passes_s"]) + " ms", flush=True)
    print(f"\nbatch {args.batch} x {args.tokens} tokens, {'CPU (tiny)' if args.tiny else 'one GPU'}; "
          "min / median / max over the rounds")
    print("| mode | warm_device | rehearsal | first pass | third pass | first beyond third |")
    print("| --- | --- | --- | --- | --- | --- |")

    def spread(values, scale=1.0, unit="s"):
        v = sorted(x * scale for x in values)
        return f"{v[0]:.3f} / {statistics.median(v):.3f} / {v[-1]:.3f} {unit}"

    summary = {}
    for mode in MODES:
        mine = [r for r in rows if r["mode"] == mode]
        summary[mode] = {k: statistics.median([r[k] for r in mine]) for k in ("warm_s", "rehearse_s",
                                                                                 "first_beyond_third_s")}
        print(f"| {mode} | {spread([r['warm_s'] for r in mine])} | {spread([r['rehearse_s'] for r in mine])} | "
              f"{spread([r['passes_s'][0] for r in mine], 1e3, 'ms')} | "
              f"{spread([r['passes_s'][2] for r in mine], 1e3, 'ms')} | "
              f"{spread([r['first_beyond_third_s'] for r in mine], 1e3, 'ms')} |")
    if not all(r["outputs_equal"] for r in rows):
        print("error: a layer's three passes over the same input differ", file=sys.stderr)
        return 1
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "first_forward.json").write_text(json.dumps({"rows": rows, "summary": summary,
                                                                  "batch": args.batch, "tokens": args.tokens}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
