"""The `layerwise` command: parse, call one library function, render, return an exit code.

Exit codes: 0 pass / ready / fits, 1 diverged / not ready / does not fit, 2 usage or input error.
A UserError becomes one line on stderr and exit 2; any other exception is a bug and keeps its
traceback. The flags and their defaults are arguments.py's; the renderings report.py's and plot.py's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from . import arguments, loading, machine, models, plot, readiness, report
from .atomic import io_reason, write_text_atomic
from .compare import compare_paths
from .errors import UserError
from .formatting import plural, wrap
from .extract import extract, gather_prompts
from .engines.namemap import to_toml
from .importer import import_map, import_run
from .recording import nonfinite_notes
from .layer_test import compare_layer_test, run_layer_test
from .sizes import NoGpu, format_bytes, parse_gpus
from .streaming import stream_extract
from .tokenmap import token_map

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _emit_json(data, target: str | None) -> None:
    text = json.dumps(data, indent=2, default=str)
    if target in (None, "-"):
        print(text)
    else:
        with _writing(target, "--json"):
            write_text_atomic(target, text + "\n")


@contextlib.contextmanager
def _writing(path: str, flag: str):
    """A report file that cannot be written is one line (exit 2), not a traceback."""
    try:
        yield
    except OSError as err:
        raise UserError(f"cannot write {flag} {path}: {io_reason(err)}") from None


def _check_writable(path: str | None, flag: str) -> None:
    """Before any work: an output file's directory must exist and take files."""
    if path in (None, "-"):
        return
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise UserError(f"{flag} {path} is a directory: give a file name")
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        why = "does not exist" if not parent.exists() else ("is not a directory" if not parent.is_dir()
                                                             else "is not writable")
        raise UserError(f"cannot write {flag} {path}: {parent} {why}")


def _print(line: str, file=None) -> None:
    """A line of output, wrapped to 100 columns."""
    print("\n".join(wrap(line)), file=file or sys.stdout)


def _warn(notes) -> None:
    for note in notes:
        print(f"layerwise: warning: {note}", file=sys.stderr)


def cmd_check(args) -> int:
    result = readiness.check_machine(arguments.check_options(args))
    if args.json:
        _emit_json(report.readiness_json(result), None)
    else:
        print(report.readiness_text(result))
    return EXIT_OK if result.ready else EXIT_FAIL


def cmd_plan(args) -> int:
    ref = models.resolve_model(args.model)
    config = models.load_config(ref).config
    gpu_bytes = parse_gpus(args.gpus) if args.gpus else None
    try:
        plan = loading.plan_load(ref, config, arguments.load_options(args), gpu_bytes=gpu_bytes)
    except NoGpu as err:
        raise UserError(f"{err}, or simulate a machine with --gpus (e.g. --gpus 8x80GB)") from None
    if args.json:
        _emit_json(report.plan_json(plan), None)
    else:
        print(report.plan_text(plan))
    return EXIT_OK if plan.fits else EXIT_FAIL


def cmd_load(args) -> int:
    loaded = loading.load_model(args.model, arguments.load_options(args), with_tokenizer=False,
                                progress=sys.stderr.isatty())
    rows = loading.placement_rows(loaded)
    if args.json:
        _emit_json(report.placement_json(loaded, rows), None)
    else:
        print(report.placement_text(loaded, rows))
    return EXIT_OK


def _progress_bar(total_prompts: int):
    """A live bar on stderr (prompts done, GB written, per-GPU memory); None when not a terminal."""
    if not sys.stderr.isatty():
        return None, lambda: None
    from tqdm import tqdm  # only on a terminal

    bar = tqdm(total=total_prompts, unit="prompt", file=sys.stderr, leave=False)

    def update(p):
        bar.n = p.prompts_done
        mem = " ".join(f"cuda:{m.index} {m.allocated_bytes / 1e9:.1f}/{m.total_bytes / 1e9:.0f}GB"
                       for m in machine.gpu_memory())
        bar.set_postfix_str(f"{p.bytes_written / 1e9:.2f} GB written {mem}".strip())
        bar.refresh()

    return update, bar.close


def cmd_extract(args) -> int:
    options = arguments.extract_options(args)
    items = gather_prompts(args.prompt, args.prompts)
    update, close = _progress_bar(len(items))
    try:
        if args.engine == "llama.cpp":
            from .engines.llamacpp import extract_gguf  # llama-cpp-python, an optional extra

            if args.stream:
                raise UserError("--stream is for --engine transformers; llama.cpp runs the whole GGUF itself")
            result = extract_gguf(args.model, args.out, items, options, device=args.device or "cpu")
        elif args.stream:
            result, stats = stream_extract(args.model, args.out, items, options, arguments.stream_options(args))
            _print(f"streamed {format_bytes(stats.weights_read_bytes)} of weights, one layer at a time "
                   f"(reading {stats.read_seconds:.2f} s, waiting {stats.wait_seconds:.2f} s); peak device memory "
                   f"{format_bytes(stats.peak_device_bytes)}")
        else:
            result = extract(args.model, args.out, items, options, arguments.load_options(args), progress=update)
    finally:
        close()
    resumed = f", {plural(result.resumed_batches, 'batch', 'batches')} already on disk" \
        if result.resumed_batches else ""
    _print(f"wrote run {result.path}: {plural(result.prompts, 'prompt')}, {plural(result.tensors, 'tensor')}, "
           f"{format_bytes(result.bytes)}{resumed}")
    print(f"  {result.seconds:.2f} s ({result.gb_per_s:.2f} GB/s), forward {result.forward_seconds:.2f} s; "
          f"peak host RAM {format_bytes(result.peak_rss_bytes)}, pinned {format_bytes(result.pinned_peak_bytes)}")
    _warn(result.notes)
    return EXIT_OK


def cmd_import(args) -> int:
    if args.show_map:
        print(to_toml(import_map(args.map, args.source_format)), end="")
        return EXIT_OK
    if not args.src or not args.out:
        raise UserError("layerwise import: give SRC and --out RUN (see layerwise import --help)")
    manifest = import_run(args.src, args.out, **arguments.import_options(args))
    settings = manifest["settings"]
    print(f"wrote run {args.out} from {settings['format']} ({settings.get('dtype') or 'no activations'}): "
          f"{plural(len(manifest['prompts']), 'prompt')}, {plural(len(manifest['tensors']), 'tensor')}")
    for note in manifest.get("notes") or []:
        print(f"note: {note}")
    _warn(nonfinite_notes(manifest))
    return EXIT_OK


def _progress_line(done: int, total: int) -> None:
    end = "\n" if done >= total else ""
    print(f"\rcompare: {100 * done / max(total, 1):3.0f}% ({format_bytes(done)} of {format_bytes(total)})",
          end=end, file=sys.stderr, flush=True)


def _write_pictures(result, args) -> None:
    if args.plot:
        with _writing(args.plot, "--plot"):
            plot.write_plot(result, args.plot)
    if args.html:
        with _writing(args.html, "--html"):
            plot.write_html(result, args.html, token_map(result))


def _check_outputs(args) -> None:
    """Before reading gigabytes: matplotlib for pictures, and every output file writable."""
    if args.plot or args.html:
        plot.require_matplotlib()
    for flag in ("json", "plot", "html"):
        _check_writable(getattr(args, flag), f"--{flag}")


def cmd_test(args) -> int:
    options = arguments.test_options(args)
    prompts = gather_prompts(args.prompt, args.prompts) if (args.prompt or args.prompts) else None
    compare = arguments.compare_options(args)
    _check_outputs(args)
    result = run_layer_test(args.model, options, prompts)
    tested = compare_layer_test(result, compare, progress=_progress_line if sys.stderr.isatty() else None)
    if args.json:
        _emit_json(report.layer_test_json(tested), args.json)
    if args.json != "-":
        print(report.layer_test_text(tested, per_prompt=args.per_prompt))
    main_report = tested.reports.get(tested.decides) if tested.decides else None
    if main_report is not None:
        _write_pictures(main_report, args)
    return EXIT_OK if tested.passed else EXIT_FAIL


def cmd_compare(args) -> int:
    options = arguments.compare_options(args, args.prompt_index)
    _check_outputs(args)
    progress = _progress_line if sys.stderr.isatty() else None
    result = compare_paths(args.reference, args.candidate, options, args.baseline, progress=progress)
    if args.json:
        _emit_json(report.report_json(result), args.json)
    if args.json != "-":
        print(report.report_text(result, per_prompt=args.per_prompt))
    _write_pictures(result, args)
    return EXIT_OK if result.passed else EXIT_FAIL


COMMANDS = {"check": cmd_check, "plan": cmd_plan, "load": cmd_load, "extract": cmd_extract, "import": cmd_import,
            "compare": cmd_compare, "test": cmd_test}


def main(argv: list[str] | None = None) -> int:
    parser = arguments.build_parser()
    try:
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a reader gone away (| head) shows here, not at interpreter exit
        return code
    except UserError as err:  # a CandidateError (the candidate under test failed) exits 1
        print(f"layerwise: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("layerwise: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away (`| head`): stop quietly, as SIGPIPE would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
