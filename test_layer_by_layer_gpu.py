#!/usr/bin/env python3
"""The seed's layer-test script, kept working: a thin wrapper over `layerwise test`.

    python test_layer_by_layer_gpu.py --test-type extract-all            # writes the reference run
    python test_layer_by_layer_gpu.py --test-type single --layer all     # each layer on its own
    python test_layer_by_layer_gpu.py --test-type multi --layers 0-7     # a chain of layers
    python test_layer_by_layer_gpu.py --test-type full --device-map balanced --max-memory 0:60GB,1:40GB

Defaults are the seed's: --device-map auto (for full and extract-all, which place the whole model;
single and multi run on --device, or on a --device-map of one device), the reference in
runs/reference (extract-all writes it there, the other tests read it and write runs/test-TYPE), a
few built-in prompts. Every other flag is `layerwise test`'s (see `layerwise test --help` and
docs/LAYER_TESTS.md). Not a pytest file (conftest.py ignores it).
"""

import argparse
import sys

from layerwise.cli import main
from layerwise.distributed import exit_process
from layerwise.zoo import DEFAULT_MODEL

DEFAULT_PROMPTS = ["The capital of France is", "def fibonacci(n):", "混合专家模型的路由器"]


def translate(argv: list[str]) -> list[str]:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--test-type", default="extract-all")
    parser.add_argument("--reference", default="runs/reference")
    parser.add_argument("--out", default=None)
    parser.add_argument("--device-map")
    parser.add_argument("--prompt", action="append")
    parser.add_argument("--prompts", action="append")
    known, rest = parser.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        return ["test", "--help"]
    args = ["test", known.model, "--test-type", known.test_type]
    whole = known.test_type in ("full", "extract-all")  # a single layer goes to --device, not a map
    if known.device_map or whole:
        args += ["--device-map", known.device_map or "auto"]
    if known.test_type == "extract-all":
        args += ["--out", known.out or known.reference]
        prompts = [("--prompt", p) for p in known.prompt or []] + [("--prompts", f) for f in known.prompts or []]
        for flag, value in prompts or [("--prompt", p) for p in DEFAULT_PROMPTS]:
            args += [flag, value]
    else:
        args += ["--reference", known.reference, "--out", known.out or f"runs/test-{known.test_type}"]
    return args + rest


if __name__ == "__main__":
    exit_process(main(translate(sys.argv[1:])))
