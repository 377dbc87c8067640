"""The `layerwise` command: parse, call one library function, render, return an exit code.

Exit codes: 0 pass / ready / fits, 1 diverged / not ready / does not fit, 2 usage or input error.
A UserError becomes one line on stderr and exit 2; any other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from . import __version__
from .errors import UserError
from .loading import LoadOptions
from .readiness import CheckOptions
from .zoo import BUILTINS, DEFAULT_MODEL

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, not a usage block."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def _add_load_options(p: argparse.ArgumentParser, with_offload: bool = True) -> None:
    d = LoadOptions()
    g = p.add_argument_group("placement")
    g.add_argument("--device-map", default=d.device_map,
                   help="auto, balanced, balanced_low_0, sequential, cuda:N, cpu, or a JSON file "
                        "{module: device} (default: %(default)s)")
    g.add_argument("--max-memory", default=d.max_memory,
                   help='per-device limit, weights plus forward pass: "40GB" (every GPU), "0:60GB,1:40GB", "cpu:200GB"')
    g.add_argument("--dtype", default=d.dtype, help="compute dtype: bf16, fp16, fp32 (default: %(default)s)")
    g.add_argument("--tokens", type=int, default=d.tokens,
                   help="forward-pass size (batch x sequence) to leave GPU room for (default: %(default)s)")
    _add_quant_option(g)
    if with_offload:
        g.add_argument("--offload-folder", default=d.offload_folder, help="where weights that spill to disk go")
        g.add_argument("--no-spill", action="store_true",
                       help="refuse to load when any weight would land on cpu or disk")
        g.add_argument("--attn-implementation", default=d.attn_implementation,
                       help="eager, sdpa or flash_attention_2 (default: transformers' choice)")


def _add_quant_option(g, default_help: str = "dequantize") -> None:
    from .quant import QUANT_MODES

    g.add_argument("--quant", default=None, choices=QUANT_MODES,
                   help="FP8 checkpoints: dequantize (weights e4m3 x scale in the compute dtype, the reference) or "
                        "fp8 (W8A8 block FP8 as vLLM/SGLang compute it) (default: " + default_help + ")")


def _add_fp8_backend_option(g) -> None:
    g.add_argument("--fp8-backend", default="auto", choices=("auto", "scaled_mm", "emulate"),
                   help="--quant fp8 arithmetic: torch's block-scaled scaled_mm (Hopper GPUs) or an exact float32 "
                        "emulation (default: %(default)s, scaled_mm where it runs)")


def _load_options(args) -> LoadOptions:
    return LoadOptions(
        device_map=args.device_map, max_memory=args.max_memory, dtype=args.dtype,
        offload_folder=getattr(args, "offload_folder", None), allow_spill=not getattr(args, "no_spill", False),
        attn_implementation=getattr(args, "attn_implementation", None), tokens=args.tokens, quant=args.quant,
    )


def _emit_json(data, target: str | None) -> None:
    text = json.dumps(data, indent=2, default=str)
    if target in (None, "-"):
        print(text)
    else:
        from .atomic import write_text_atomic

        write_text_atomic(target, text + "\n")


def cmd_check(args) -> int:
    from . import readiness, render

    d = CheckOptions()
    options = CheckOptions(model=args.model, cpu=args.cpu, max_memory=args.max_memory, dtype=args.dtype or d.dtype,
                           tokens=args.tokens or d.tokens, out_dir=args.out or d.out_dir, quant=args.quant)
    result = readiness.check_machine(options)
    if args.json:
        _emit_json(render.readiness_json(result), None)
    else:
        print(render.readiness_text(result))
    return EXIT_OK if result.ready else EXIT_FAIL


def cmd_plan(args) -> int:
    from . import loading, models, render
    from .sizes import parse_gpus

    ref = models.resolve_model(args.model)
    config = models.load_config(ref).config
    gpu_bytes = parse_gpus(args.gpus) if args.gpus else None
    plan = loading.plan_for(ref, config, _load_options(args), gpu_bytes=gpu_bytes)
    if args.json:
        _emit_json(render.plan_json(plan), None)
    else:
        print(render.plan_text(plan))
    return EXIT_OK if plan.fits else EXIT_FAIL


def cmd_load(args) -> int:
    from . import loading, render

    loaded = loading.load_model(args.model, _load_options(args), with_tokenizer=False, progress=sys.stderr.isatty())
    rows = loading.placement_report(loaded)
    if args.json:
        _emit_json(render.placement_json(loaded, rows), None)
    else:
        print(render.placement_text(loaded, rows))
    return EXIT_OK


def _progress_bar(total_prompts: int):
    """A live bar on stderr (prompts done, GB written, per-GPU memory); None when not a terminal."""
    if not sys.stderr.isatty():
        return None, lambda: None
    from tqdm import tqdm

    from . import machine

    bar = tqdm(total=total_prompts, unit="prompt", file=sys.stderr, leave=False)

    def update(p):
        bar.n = p.prompts_done
        mem = " ".join(f"cuda:{m.index} {m.allocated_bytes / 1e9:.1f}/{m.total_bytes / 1e9:.0f}GB"
                       for m in machine.gpu_memory())
        bar.set_postfix_str(f"{p.bytes_written / 1e9:.2f} GB written {mem}".strip())
        bar.refresh()

    return update, bar.close


def cmd_extract(args) -> int:
    from .extract import ExtractOptions, extract, gather_prompts
    from .sizes import format_bytes

    d = ExtractOptions()
    options = ExtractOptions(
        points=args.points, layers=args.layers, modules=tuple(args.modules or ()),
        batch_size=d.batch_size if args.batch_size is None else args.batch_size,
        max_tokens=args.max_tokens, chat_template=args.chat_template, overwrite=args.overwrite,
        pinned_budget_gib=d.pinned_budget_gib if args.pinned_gib is None else args.pinned_gib,
    )
    items = gather_prompts(args.prompt, args.prompts)
    update, close = _progress_bar(len(items))
    try:
        if args.engine == "llama.cpp":
            from .engines.llamacpp import extract_gguf

            if args.stream:
                raise UserError("--stream is for --engine transformers; llama.cpp runs the whole GGUF itself")
            result = extract_gguf(args.model, args.out, items, options, device=args.device or "cpu")
        elif args.stream:
            from .streaming import StreamOptions, stream_extract

            result, stats = stream_extract(args.model, args.out, items, options, StreamOptions(
                device=args.device, dtype=args.dtype, attn_implementation=args.attn_implementation, quant=args.quant,
                fp8_backend=args.fp8_backend), progress=None)
            print(f"streamed {format_bytes(stats.weights_read_bytes)} of weights, one layer at a time "
                  f"(reading {stats.read_seconds:.2f} s, waiting {stats.wait_seconds:.2f} s); peak device memory "
                  f"{format_bytes(stats.peak_device_bytes)}")
        else:
            result = extract(args.model, args.out, items, options, _load_options(args), progress=update)
    finally:
        close()
    resumed = f", {result.resumed_batches} batch(es) already on disk" if result.resumed_batches else ""
    print(f"wrote run {result.path}: {result.prompts} prompt(s), {result.tensors} tensors, "
          f"{format_bytes(result.bytes)} in {result.seconds:.2f} s ({result.gb_per_s:.2f} GB/s){resumed}; "
          f"forward {result.forward_seconds:.2f} s; peak host RAM {format_bytes(result.peak_rss_bytes)}, "
          f"pinned {format_bytes(result.pinned_peak_bytes)}")
    for note in result.notes:
        print(f"note: {note}")
    return EXIT_OK


def cmd_import(args) -> int:
    from .importer import import_run

    if args.show_map:
        from .engines import namemap

        default = namemap.sglang_default() if args.source_format in (None, "sglang") else None
        print(namemap.to_toml(namemap.load_map(args.map, default)), end="")
        return EXIT_OK
    if not args.src or not args.out:
        raise UserError("layerwise import: give SRC and --out RUN (see layerwise import --help)")
    manifest = import_run(args.src, args.out, args.rename, args.overwrite, args.model,
                          source_format=args.source_format, map_file=args.map, decode=args.decode,
                          layer_ids=args.layers)
    settings = manifest["settings"]
    print(f"wrote run {args.out} from {settings['format']} ({settings.get('dtype') or 'no activations'}): "
          f"{len(manifest['prompts'])} prompt(s), {len(manifest['tensors'])} tensors")
    for note in manifest.get("notes") or []:
        print(f"note: {note}")
    return EXIT_OK


def cmd_test(args) -> int:
    from . import render, report
    from .extract import ExtractOptions, gather_prompts
    from .layer_test import TestOptions, compare_layer_test, run_layer_test
    from .replay import ReplayOptions

    t = TestOptions()
    options = TestOptions(test_type=args.test_type, reference=args.reference, layer=args.layer or t.layer,
                          layers=args.layers, out=args.out or t.out, stream=args.stream)
    candidate = ReplayOptions(dtype=args.dtype, attn_implementation=args.attn_implementation,
                              device=args.device or _single_device(args.device_map), candidate=args.candidate,
                              quant=args.quant, fp8_backend=args.fp8_backend, deterministic=args.deterministic,
                              allow_config_mismatch=args.allow_config_mismatch, overwrite=args.overwrite)
    d, e = LoadOptions(), ExtractOptions()
    load = LoadOptions(device_map=args.device_map, max_memory=args.max_memory, dtype=args.dtype or d.dtype,
                       offload_folder=args.offload_folder, allow_spill=not args.no_spill,
                       attn_implementation=args.attn_implementation, tokens=args.tokens, quant=args.quant)
    extract_options = ExtractOptions(points=args.points, batch_size=args.batch_size or e.batch_size,
                                     max_tokens=args.max_tokens, chat_template=args.chat_template,
                                     overwrite=args.overwrite)
    prompts = gather_prompts(args.prompt, args.prompts) if (args.prompt or args.prompts) else None
    compare = _compare_options(args)
    if args.plot or args.html:
        report.require_matplotlib()  # before any work, not after
    result = run_layer_test(args.model, options, candidate, load, extract_options, prompts)
    tested = compare_layer_test(result, compare, progress=_progress_line if sys.stderr.isatty() else None)
    if args.json:
        _emit_json(report.layer_test_json(tested), args.json)
    if args.json != "-":
        print(render.layer_test_text(tested))
    main = tested.reports.get(tested.decides) if tested.decides else None
    if main is not None and args.plot:
        report.write_plot(main, args.plot)
    if main is not None and args.html:
        from .tokenmap import token_map

        report.write_html(main, args.html, token_map(main))
    return EXIT_OK if tested.passed else EXIT_FAIL


def _single_device(device_map: str | None) -> str | None:
    """--device-map cuda:1 (or 1, or cpu) also says where a single-layer test runs."""
    if not device_map:
        return None
    if device_map.isdigit():
        return f"cuda:{device_map}"
    if device_map == "cpu" or device_map.startswith("cuda:"):
        return device_map
    return None


def _parse_prompts(text: str | None) -> tuple[int, ...] | None:
    """"0,2" or "0-3,7" -> (0, 2) / (0, 1, 2, 3, 7)."""
    if text is None:
        return None
    out: list[int] = []
    for part in text.split(","):
        first, sep, last = part.strip().partition("-")
        try:
            lo, hi = int(first), int(last) if sep else int(first)
        except ValueError:
            raise UserError(f"--prompts {text!r}: expected prompt indices like 0,2 or 0-3") from None
        if lo < 0 or hi < lo:
            raise UserError(f"--prompts {text!r}: {part.strip()!r} is not a valid index or range")
        out.extend(range(lo, hi + 1))
    return tuple(dict.fromkeys(out))


def _progress_line(done: int, total: int) -> None:
    from .sizes import format_bytes

    end = "\n" if done >= total else ""
    print(f"\rcompare: {100 * done / max(total, 1):3.0f}% ({format_bytes(done)} of {format_bytes(total)})",
          end=end, file=sys.stderr, flush=True)


def _compare_options(args, prompts: str | None = None):
    from .compare import CompareOptions
    from .tolerances import build_tolerances

    tolerances = build_tolerances(args.tolerance, args.tolerance_file, rtol=args.rtol, atol=args.atol,
                                  max_rel_l2=args.max_rel_l2, min_cosine=args.min_cosine, max_abs=args.max_abs,
                                  max_kl=args.max_kl)
    return CompareOptions(tolerances=tolerances, prompts=_parse_prompts(prompts),
                          tie_threshold=args.tie_threshold, logits_topk=args.logits_topk,
                          noise_factor=args.noise_factor, verify=not args.no_verify)


def cmd_compare(args) -> int:
    from . import report
    from .compare import compare_paths

    options = _compare_options(args, args.prompts)
    if args.plot or args.html:
        report.require_matplotlib()  # before reading gigabytes, not after
    progress = _progress_line if sys.stderr.isatty() else None
    result = compare_paths(args.reference, args.candidate, options, args.baseline, progress=progress)
    if args.json:
        _emit_json(report.report_json(result), args.json)
    if args.json != "-":
        print(report.report_text(result))
    if args.plot:
        report.write_plot(result, args.plot)
    if args.html:
        from .tokenmap import token_map

        report.write_html(result, args.html, token_map(result))
    return EXIT_OK if result.passed else EXIT_FAIL


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="name the first tensor where two runs diverge; exit 0 pass / 1 diverged",
                       description="Compare a candidate run with a reference run tensor by tensor, in model order, "
                                   "and name the first that breaks its tolerance (docs/COMPARE.md).")
    p.add_argument("reference", metavar="REF", help="the reference run directory")
    p.add_argument("candidate", metavar="CAND", help="the candidate run directory")
    p.add_argument("--baseline", metavar="RUN2", help="a second reference run (another batch size, kernel...): its "
                                                      "distance to REF is the noise floor")
    _add_compare_options(p)
    p.set_defaults(func=cmd_compare)


def _add_compare_options(p, prompt_filter: bool = True) -> None:
    """Tolerances and report options, shared by `compare` and `test` (which compares every prompt)."""
    from .compare import CompareOptions

    d = CompareOptions()
    g = p.add_argument_group("tolerances (default: by dtype; a tensor uses the last matching --tolerance, else the "
                             "file, else the global limits, else the dtype default)")
    g.add_argument("--tolerance", action="append", default=[], metavar="PATTERN=CHECKS",
                   help="e.g. 'model.layers.*:output=rel_l2<3e-2' or 'lm_head:output=kl<1e-3,top1>=0.99' (repeatable)")
    g.add_argument("--tolerance-file", metavar="FILE", help="a .toml or .json file of rules and global limits")
    g.add_argument("--rtol", type=float, help="allclose: every |ref - cand| <= atol + rtol |ref|")
    g.add_argument("--atol", type=float, help="allclose absolute term (0 when only --rtol is given)")
    g.add_argument("--max-rel-l2", type=float, help="largest ||ref - cand|| / ||ref||")
    g.add_argument("--min-cosine", type=float, help="smallest cosine similarity")
    g.add_argument("--max-abs", type=float, help="largest |ref - cand|")
    g.add_argument("--max-kl", type=float, help="largest mean KL(ref || cand) of the logits, in nats")
    if prompt_filter:
        p.add_argument("--prompts", help="compare only these prompt indices: 0,2 or 0-3 (default: all)")
    p.add_argument("--tie-threshold", type=float, default=d.tie_threshold,
                   help="router score (sigmoid of the logit) margin of a near-tie (default: by dtype, 1e-4 for "
                        "fp32 to 1e-2 for bf16)")
    p.add_argument("--noise-factor", type=float, default=d.noise_factor,
                   help="with --baseline, a tensor within this many noise floors passes (default: %(default)g)")
    p.add_argument("--logits-topk", type=int, default=d.logits_topk, help="k of the logits' top-k overlap "
                                                                           "(default: %(default)d)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of every tensor read")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON ('-': print it instead of the table)")
    p.add_argument("--plot", metavar="FILE.png", help="plot the metrics against layer index (needs matplotlib)")
    p.add_argument("--html", metavar="FILE", help="write one self-contained HTML page: plots, a per-token error map of "
                                                  "the first divergent and the worst layers, every tensor (needs "
                                                  "matplotlib)")


def build_parser() -> argparse.ArgumentParser:
    builtins = ", ".join(f"builtin:{n}" for n in BUILTINS)
    parser = _Parser(prog="layerwise", description="Layer-by-layer numerical testing of large language models. "
                                                   f"A MODEL is a checkpoint directory, a .gguf file, or one of: {builtins}.")
    parser.add_argument("--version", action="version", version=f"layerwise {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is being done")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("check", help="is this machine ready? PASS/WARN/FAIL lines, exit 0 ready / 1 not ready")
    p.add_argument("model", nargs="?", help="also check this model's files, known bugs and fit")
    p.add_argument("--cpu", action="store_true", help="a CPU-only run is intended: no GPU is not a failure")
    p.add_argument("--max-memory", default=None, help="per-device limit for the fit check")
    p.add_argument("--dtype", default=None, help=f"compute dtype for the fit check (default: {CheckOptions.dtype})")
    p.add_argument("--tokens", type=int, default=None, help=f"forward-pass size (default: {CheckOptions.tokens})")
    p.add_argument("--out", default=None, help="where dumps will be written, for the disk check (default: .)")
    _add_quant_option(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of lines")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("plan", help="where the weights would go, without weights or GPUs; exit 0 fits / 1 spills")
    p.add_argument("model", help=f"MODEL (e.g. builtin:minimax-m2, default model {DEFAULT_MODEL})")
    p.add_argument("--gpus", help="simulate a machine: 8x80GB or 0:80GB,1:141GB (default: the GPUs present)")
    _add_load_options(p, with_offload=False)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("load", help="load a model over the GPUs and print where every layer went")
    p.add_argument("model", help="MODEL")
    _add_load_options(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_load)

    from .capture import DEFAULT_POINTS, POINTS
    from .extract import ExtractOptions

    d = ExtractOptions()
    p = sub.add_parser("extract", help="capture every layer's activations for some prompts into a run directory")
    p.add_argument("model", help="MODEL")
    p.add_argument("--out", required=True, help="run directory to write (resumed if it holds the same run)")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts", action="append", help="a file: one prompt per line, or JSONL with text or token_ids")
    p.add_argument("--chat-template", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="refuse prompts longer than this")
    p.add_argument("--points", default=None,
                   help=f"what to capture, comma list of {','.join(POINTS)} (default: {','.join(DEFAULT_POINTS)})")
    p.add_argument("--layers", default=d.layers, help="restrict to these layers, e.g. 0-9,20 (default: all)")
    p.add_argument("--modules", action="append", metavar="REGEX[:ROLE]",
                   help="also capture every module whose named_modules() path the regex matches in full: its "
                        "output (default), :input or :input,output (repeatable), e.g. "
                        "'model\\.layers\\.\\d+\\.self_attn\\.q_proj'")
    p.add_argument("--batch-size", type=int, default=None, help=f"prompts per forward pass (default: {d.batch_size})")
    p.add_argument("--pinned-gib", type=float, default=None,
                   help=f"host memory for in-flight GPU->host copies (default: {d.pinned_budget_gib})")
    p.add_argument("--overwrite", action="store_true", help="replace a different run already in --out")
    p.add_argument("--stream", action="store_true",
                   help="one decoder layer at a time on one device, for models larger than the GPUs")
    p.add_argument("--device", default=None, help="the device for --stream (default: cuda:0, else cpu); "
                                                  "--engine llama.cpp: cpu (default) or gpu")
    p.add_argument("--engine", default="transformers", choices=("transformers", "llama.cpp"),
                   help="who computes: transformers (the reference), or llama.cpp itself for a .gguf MODEL through "
                        "llama-cpp-python (the llamacpp extra), recorded under the transformers names of the same "
                        "GGUF (default: %(default)s)")
    _add_load_options(p)
    _add_fp8_backend_option(p)
    p.set_defaults(func=cmd_extract)

    _add_import_parser(sub)

    _add_compare(sub)
    _add_test_parser(sub)
    return parser


def _add_import_parser(sub) -> None:
    from .importer import FORMATS

    p = sub.add_parser("import", help="turn tensors from another engine (SGLang or vLLM dumps, .npy/.pt/.safetensors) "
                                      "into a run",
                       description="Import foreign tensors into a run (docs/FORMAT.md, Importing).")
    p.add_argument("src", nargs="?", help="an SGLang dump directory, vLLM hidden-states files, 0/, 1/, ... with "
                                          "<module>.<role>.npy and tokens.npy, or 0.safetensors, ...")
    p.add_argument("--out", help="run directory to write")
    p.add_argument("--from", dest="source_format", choices=FORMATS,
                   help="the layout of SRC (default: detected when unmistakable)")
    p.add_argument("--map", metavar="FILE", help="name map (.toml or .json): foreign names -> <module path>:<role>, "
                                                  "and for SGLang how TP ranks combine (see --show-map)")
    p.add_argument("--show-map", action="store_true", help="print the name map in force as TOML and exit")
    p.add_argument("--rename", action="append", metavar="s|REGEX|REPLACEMENT|",
                   help="rewrite tensor names after the map (repeatable): s|REGEX|REPLACEMENT| with any punctuation "
                        "that neither side holds as the separator, or REGEX=REPLACEMENT")
    p.add_argument("--decode", choices=("skip", "include"), default="skip",
                   help="SGLang: decode steps after the prefill are skipped, or imported as further positions "
                        "(default: %(default)s)")
    p.add_argument("--layers", help="vLLM: the layer ids the hidden states hold (eagle_aux_hidden_state_layer_ids), "
                                    "e.g. 2,16,32")
    p.add_argument("--model", default=None, help="record this model spec in the run (optional)")
    p.add_argument("--overwrite", action="store_true", help="replace a different run already in --out")
    p.set_defaults(func=cmd_import)


def _add_test_parser(sub) -> None:
    from .layer_test import TEST_TYPES, TestOptions

    t = TestOptions()
    p = sub.add_parser("test", help="test layers against a reference run: single (isolated), multi (a chain), "
                                    "full (the whole model), extract-all (make a reference)")
    p.add_argument("model", help="MODEL: the candidate checkpoint (often the reference's own)")
    p.add_argument("--reference", help="the reference run (from layerwise extract); not needed for extract-all")
    p.add_argument("--test-type", default=t.test_type, choices=TEST_TYPES, help="(default: %(default)s)")
    p.add_argument("--layer", default=None, help=f"single: a layer number or all (default: {t.layer})")
    p.add_argument("--layers", default=t.layers,
                   help="multi: the range A-B chained from A's recorded input (default: every layer); "
                        "full / extract-all: the layers to capture, e.g. 0-9,20")
    p.add_argument("--out", default=None, help=f"directory for the candidate run(s) (default: {t.out})")
    p.add_argument("--overwrite", action="store_true", help="replace different runs already in --out")
    p.add_argument("--stream", action="store_true",
                   help="full / extract-all: one decoder layer at a time on --device, for models larger than the "
                        "GPUs (single and multi always load one layer at a time)")
    g = p.add_argument_group("candidate settings (default: the reference's own)")
    g.add_argument("--dtype", default=None, help="compute dtype: bf16, fp16, fp32")
    g.add_argument("--attn-implementation", default=None, help="eager, sdpa or flash_attention_2")
    g.add_argument("--device", default=None, help="single / multi: where the layers run (default: cuda:0, else cpu)")
    g.add_argument("--candidate", default=None,
                   help="package.module:factory (or file.py:factory) building your own decoder layer: "
                        "factory(config, layer_index, weights) -> nn.Module with the HF layer's call signature")
    g.add_argument("--allow-config-mismatch", action="store_true",
                   help="the model is a variant of the reference's (quantized, converted): its config may differ")
    _add_quant_option(g, "the reference's")
    _add_fp8_backend_option(g)
    g.add_argument("--deterministic", action="store_true",
                   help="single / multi: torch's deterministic kernels (when the first layer, run twice, differs)")
    d = LoadOptions()
    g = p.add_argument_group("placement (full, extract-all)")
    g.add_argument("--device-map", default=d.device_map, help="auto, balanced, sequential, cuda:N, cpu, or a JSON "
                                                              "file (default: %(default)s)")
    g.add_argument("--max-memory", default=d.max_memory, help='per-device limit: "40GB" or "0:60GB,1:40GB"')
    g.add_argument("--offload-folder", default=d.offload_folder, help="where weights that spill to disk go")
    g.add_argument("--no-spill", action="store_true", help="refuse to load when any weight would land on cpu or disk")
    g.add_argument("--tokens", type=int, default=d.tokens, help="forward-pass size to leave GPU room for")
    g = p.add_argument_group("prompts and capture (extract-all)")
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--prompts", action="append", help="a file: one prompt per line, or JSONL with text or token_ids")
    g.add_argument("--points", default=None, help="what to capture, e.g. residual,attn,mlp,router,logits")
    g.add_argument("--batch-size", type=int, default=None, help="prompts per forward pass")
    g.add_argument("--max-tokens", type=int, default=None, help="refuse prompts longer than this")
    g.add_argument("--chat-template", action="store_true", help="wrap each prompt in the chat template")
    _add_compare_options(p, prompt_filter=False)
    p.set_defaults(func=cmd_test)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        return args.func(args)
    except UserError as err:
        print(f"layerwise: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("layerwise: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
