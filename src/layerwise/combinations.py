"""Flags that would change nothing beside the others given: each is refused in one line that says
why, before any work starts. A flag either takes effect or says why it cannot; nothing given is
silently dropped.

Reads the parsed command line only. The flags and their defaults are arguments.py's; a check
that needs a model or a run (`--fp8-backend` where the reference's `--quant` decides,
`--record-reference` with full) is the library's, made where that is known.
"""

from __future__ import annotations

from .arguments import single_device
from .errors import UserError
from .layer_test import TestOptions

# the flags that place a whole model over the GPUs (planflags.placement_flags), and those that
# make prompts and say what to capture (arguments._prompts)
PLACEMENT = ("device_map", "max_memory", "tokens", "offload_folder", "no_spill")
PROMPTS = ("prompt", "prompts", "chat_template", "max_tokens", "points", "batch_size")


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def given(args, dests) -> str | None:
    """The first of `dests` given on the command line, as a flag (None, False and [] were not)."""
    return next((flag(d) for d in dests if getattr(args, d, None) not in (None, False, [])), None)


def refuse_idle(args) -> None:
    """UserError naming the first flag of `args` (a parsed command) that would do nothing."""
    check = {"extract": _extract, "test": _test, "compare": _compare}.get(args.command)
    if check is not None:
        check(args)


def _extract(args) -> None:
    one_device = args.stream or args.engine == "llama.cpp"
    placed = given(args, PLACEMENT)
    if one_device and placed:
        how = "--stream runs one decoder layer at a time" if args.stream else "--engine llama.cpp runs the GGUF"
        raise UserError(f"{placed} places a whole model over the GPUs, and {how} on --device: drop {placed}")
    if args.device and not one_device:
        raise UserError(f"--device is where --stream (or --engine llama.cpp) runs, and a whole model goes where "
                        f"--device-map puts it: write --device-map {args.device}, or add --stream")
    if args.fp8_backend and args.quant != "fp8":
        raise UserError("--fp8-backend is the arithmetic of --quant fp8, which this extract does not compute: "
                        "add --quant fp8, or drop --fp8-backend")


def _test(args) -> None:
    kind = args.test_type or TestOptions.test_type
    layered = kind in ("single", "multi")  # one layer at a time, on the reference's recorded inputs
    if args.record_reference and not layered:  # as run_layer_test says it, before the flags it explains
        raise UserError(f"--record-reference is for --test-type single or multi ({kind} reads the model once "
                        "already): drop it, or extract the reference first")
    if args.layer is not None and kind != "single":
        raise UserError(f"--layer picks --test-type single's layer; {kind} takes --layers (e.g. 0-3): drop --layer")
    if args.layers is not None and kind == "single":
        raise UserError("--layers is for --test-type multi, full and extract-all; single tests --layer K (or all): "
                        "write --layer, or --test-type multi")
    if args.stream and layered:
        raise UserError(f"--stream is for --test-type full and extract-all; {kind} always loads one layer at a "
                        "time: drop --stream")
    if args.deterministic and not layered:
        raise UserError(f"--deterministic is for --test-type single and multi (a layer run twice); {kind} runs "
                        "the whole model: drop it")
    if args.candidate and kind == "extract-all":
        raise UserError("--candidate replaces one decoder layer: use it with --test-type single or multi")
    prompted = given(args, PROMPTS)
    if prompted and not (kind == "extract-all" or (layered and args.record_reference)):
        hint = " (or add --record-reference)" if layered else ""
        raise UserError(f"{prompted} is for --test-type extract-all and --record-reference; {kind} runs the "
                        f"reference's own prompts and capture points: drop {prompted}{hint}")
    _test_devices(args, kind, layered)
    if args.fp8_backend and args.quant == "dequantize":
        raise UserError("--fp8-backend is the arithmetic of --quant fp8, and --quant dequantize is given: "
                        "give --quant fp8, or drop --fp8-backend")


def _test_devices(args, kind: str, layered: bool) -> None:
    """single, multi and --stream run on one device (--device, or a --device-map naming one);
    full and extract-all load the whole model where the placement flags put it."""
    one_device = layered or args.stream
    if args.device and not one_device:
        raise UserError(f"--device is where single, multi and --stream run; {kind} loads the whole model where "
                        f"--device-map puts it: write --device-map {args.device}, or add --stream")
    if not one_device:
        return
    idle = [d for d in PLACEMENT if d != "device_map" or args.device or not single_device(args.device_map)]
    placed = given(args, idle)
    if placed:
        how = f"{kind} runs" if layered else "--stream runs"
        raise UserError(f"{placed} places a whole model over the GPUs, and {how} one layer at a time on --device: "
                        f"drop {placed}")


def _compare(args) -> None:
    if args.noise_factor is not None and not args.baseline:
        raise UserError("--noise-factor scales the noise floor that --baseline RUN2 measures, and no --baseline is "
                        "given: add --baseline, or drop --noise-factor")
