"""The `layerwise` command: parse, call one library function, render, return an exit code.

Exit codes: 0 pass / ready / fits, 1 diverged / not ready / does not fit, 2 usage or input error.
A UserError becomes one line on stderr and exit 2; any other exception is a bug and keeps its
traceback. The flags and their defaults are arguments.py's; the renderings report.py's and plot.py's.

Under torchrun (several ranks: `check`, `extract`, `test`) every rank parses the command, joins
the job (distributed.py), agrees with the others on the command and the model, and runs it; rank
0 alone prints, and any rank's failure is one line on rank 0 (exit 2 usage, 1 a rank failed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path

from . import (_boot, _fastplan, arguments, combinations, distributed, loading, machine, models, plot, readiness,
               recording, report, shmbuffers, timings)
from .atomic import io_reason, write_text_atomic
from .compare import compare_paths, unmatched_note
from .errors import UserError
from .formatting import plural, wrap
from .extract import extract, gather_prompts
from .engines.namemap import to_toml
from .importer import import_map, import_run
from .recording import nonfinite_notes
from .layer_test import compare_layer_test, run_layer_test, written_runs
from .paths import check_output_file
from .runs import MANIFEST
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


def _print(line: str, file=None) -> None:
    """A line of output, wrapped to 100 columns."""
    print("\n".join(wrap(line)), file=file or sys.stdout)


def _warn(notes) -> None:
    for note in notes:
        print(f"layerwise: warning: {note}", file=sys.stderr)


def _warn_unmatched(reports) -> None:
    """A tolerance rule that judged no tensor of any report is said on stderr too (a shared
    tolerance file may hold rules for tensors these runs lack: a warning, not an error)."""
    first, *rest = list(reports) or [None]
    _warn(unmatched_note(rule) for rule in (first.unmatched_rules if first else ())
          if all(rule in r.unmatched_rules for r in rest))


def cmd_check(args) -> int:
    result = readiness.check_machine(arguments.check_options(args))
    if distributed.session().world > 1:  # under torchrun: the job's ranks, backend and links too
        result = readiness.with_distributed(result, distributed.session(), getattr(args, "layout_problem", None))
    if args.json:
        _emit_json(report.readiness_json(result), None)
    else:
        print(report.readiness_text(result))
    return EXIT_OK if result.ready else EXIT_FAIL


def cmd_plan(args) -> int:
    ref = models.resolve_model(args.model)
    config = models.load_config(ref).config
    gpu_bytes = parse_gpus(args.gpus) if args.gpus else None
    kept: list = []
    try:
        plan = loading.plan_load(ref, config, arguments.load_options(args), gpu_bytes=gpu_bytes, keep=kept)
    except NoGpu as err:
        raise UserError(f"{err}, or simulate a machine with --gpus (e.g. --gpus 8x80GB)") from None
    if gpu_bytes is not None and ref.kind != "gguf" and kept:  # the next plan of it answered without torch
        _fastplan.keep(args.model, args.dtype, args.quant, *kept[0], plan)
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
    if args.tp and args.stream:
        raise UserError("--tp and --stream: a streamed model runs one layer at a time on one device, a "
                        "tensor-parallel one over the ranks at once; pick one")
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
          f"peak host RAM {format_bytes(result.peak_rss_bytes)}, pinned {format_bytes(result.pinned_peak_bytes)}{_ranks_note(args)}")
    _warn(result.notes)
    return EXIT_OK


def _ranks_note(args) -> str:
    world = distributed.session().world
    if world == 1:
        return ""
    return f"; {world} ranks, tensor parallel" if args.tp else f"; {world} ranks, each its share of the batches"


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


def _check_outputs(args, runs: list[tuple[str, str | None]]) -> None:
    """Before reading gigabytes: matplotlib for pictures, and every output file writable and
    outside the `runs` the command reads and writes ((what, directory))."""
    if args.plot or args.html:
        plot.require_matplotlib()
    for flag in ("json", "plot", "html"):
        check_output_file(getattr(args, flag), f"--{flag}", runs)


def cmd_test(args) -> int:
    options = arguments.test_options(args)
    prompts = gather_prompts(args.prompt, args.prompts) if (args.prompt or args.prompts) else None
    compare = arguments.compare_options(args)
    _check_outputs(args, [("reference", args.reference)] + [(f"{kind} candidate", str(path))
                                                             for kind, path in written_runs(options).items()])
    result = run_layer_test(args.model, options, prompts)
    tested = compare_layer_test(result, compare, progress=_progress_line if sys.stderr.isatty() else None,
                                ranks=distributed.session())  # under torchrun every rank compares its share
    if tested is None:  # not rank 0: rank 0 reports
        return EXIT_OK
    if args.json:
        _emit_json(report.layer_test_json(tested), args.json)
    if args.json != "-":
        print(report.layer_test_text(tested, per_prompt=args.per_prompt))
    _warn_unmatched(tested.reports.values())
    main_report = tested.reports.get(tested.decides) if tested.decides else None
    if main_report is not None:
        _write_pictures(main_report, args)
    return EXIT_OK if tested.passed else EXIT_FAIL


def cmd_compare(args) -> int:
    options = arguments.compare_options(args, args.prompt_index)
    _check_outputs(args, [("REF", args.reference), ("CAND", args.candidate), ("baseline", args.baseline)])
    progress = _progress_line if sys.stderr.isatty() else None
    result = compare_paths(args.reference, args.candidate, options, args.baseline, progress=progress)
    if args.json:
        _emit_json(report.report_json(result), args.json)
    if args.json != "-":
        print(report.report_text(result, per_prompt=args.per_prompt))
    _warn_unmatched([result])
    _write_pictures(result, args)
    return EXIT_OK if result.passed else EXIT_FAIL


COMMANDS = {"check": cmd_check, "plan": cmd_plan, "load": cmd_load, "extract": cmd_extract, "import": cmd_import,
            "compare": cmd_compare, "test": cmd_test}


def entry() -> None:
    """The `layerwise` program (and `python -m layerwise`): main's code is the process's exit code."""
    distributed.exit_process(main())


def main(argv: list[str] | None = None) -> int:
    timings.mark("imported")
    try:
        _boot.read_threads()
        _boot.writer_mode()
    except ValueError as err:
        return _print_error(str(err), EXIT_USAGE)
    try:
        env = distributed.detect()
    except UserError as err:
        return _print_error(str(err), EXIT_USAGE)
    if env is not None:
        return _main_ranked(argv, env)
    parser = arguments.build_parser()
    try:
        args = parser.parse_args(argv)
        combinations.refuse_idle(args)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        code = _ended(COMMANDS[args.command](args))
        sys.stdout.flush()  # a reader gone away (| head) shows here, not at interpreter exit
        return code
    except UserError as err:  # a CandidateError (the candidate under test failed) exits 1
        return _print_error(str(err), err.exit_code)
    except KeyboardInterrupt:
        print("layerwise: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away (`| head`): stop quietly, as SIGPIPE would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _ended(code: int) -> int:
    """A command's work ended, whatever its verdict: in a layerwise process, about to exit, its
    page-locked host buffers are made pageable first (shmbuffers.unpin_all), which the kernel's
    teardown of the process then frees faster. Not after a failure: copies may still be in flight.
    A GPU that fails the synchronization first (a sticky CUDA error) leaves them to the teardown."""
    if _boot.is_command():
        with contextlib.suppress(RuntimeError):
            shmbuffers.unpin_all()
    return code


def _print_error(message: str, code: int = EXIT_FAIL) -> int:
    with contextlib.suppress(OSError, ValueError):  # what was printed goes first, unless its reader is gone
        sys.stdout.flush()
    print(f"layerwise: error: {message}", file=sys.stderr, flush=True)
    return code


RANKED = ("check", "extract", "test")  # the commands torchrun can start on several ranks


def _main_ranked(argv: list[str] | None, env: distributed.Env) -> int:
    """Under torchrun: every rank parses, joins the job, agrees with the others on the command and
    the model, and runs it; rank 0 alone prints. Any rank's failure is one line on rank 0 and
    exit 2 (usage) or 1 (a rank failed) on every rank, never a hang (docs/MULTI_GPU_GUIDE.md)."""
    if env.rank != 0:
        _silence()
    args, problem = None, None
    try:
        args = arguments.build_parser().parse_args(argv)
        combinations.refuse_idle(args)
        logging.basicConfig(level=logging.INFO if args.verbose and env.rank == 0 else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        if args.command not in RANKED:
            raise UserError(f"layerwise {args.command} runs as one process: start it without torchrun")
    except UserError as err:
        problem = str(err)
    hint = "; a run being written keeps no manifest: rerun the same command to resume" \
        if args is not None and args.command in ("extract", "test") else ""
    try:
        ranks, layout = distributed.start(env, arguments.distributed_options(args) if problem is None
                                          else distributed.DistOptions(), on_failure=lambda line: _print_error(line + hint))
    except distributed.RankFailed as err:
        return _print_error(str(err)) if env.rank == 0 else EXIT_FAIL
    timings.mark("joined")
    try:
        return _ended(_run_ranked(ranks, args, problem, layout))
    except UserError as err:  # a CandidateError (the candidate under test failed) exits 1
        return _failed(ranks, str(err), err.exit_code)
    except distributed.RankFailed as err:
        return _failed(ranks, str(err) + hint, EXIT_FAIL)
    except KeyboardInterrupt:
        return _failed(ranks, f"{env.where()} interrupted", 130)
    except Exception as err:  # a bug: its traceback on the rank that hit it, one line on rank 0
        traceback.print_exc()
        first = str(err).splitlines()[0] if str(err) else ""
        return _failed(ranks, f"{env.where()} failed: {type(err).__name__}: {first}{hint}", EXIT_FAIL)
    finally:
        distributed.stop()


def _run_ranked(ranks: distributed.Session, args, problem: str | None, layout: str | None) -> int:
    facts = None
    if args is not None and args.command == "check":
        args.layout_problem, layout = layout, None  # a FAIL line of the report, not a usage error
    if problem is None and layout is None:
        try:
            facts = {"command": arguments.fingerprint(args), "model": _model_identity(args)}
        except UserError as err:
            problem = str(err)
    ranks.settle(problem or layout)
    ranks.agree("the command", facts["command"])
    ranks.agree("the model", facts["model"])
    timings.mark("agreed")
    code = COMMANDS[args.command](args)
    sys.stdout.flush()
    return code


def _model_identity(args) -> dict:
    """What every rank must see alike: the model's config and weight files, the reference run."""
    identity = recording.model_identity(args.model) if getattr(args, "model", None) else {}
    manifest = Path(getattr(args, "reference", None) or "") / MANIFEST
    if getattr(args, "reference", None) and manifest.is_file():
        identity["reference"] = hashlib.sha256(manifest.read_bytes()).hexdigest()
    return identity


def _failed(ranks: distributed.Session, message: str, code: int) -> int:
    if ranks.report_failure(message):
        _print_error(message)
    return code


def _silence() -> None:
    """A rank other than 0 prints nothing: rank 0 reports for the job."""
    sys.stdout = open(os.devnull, "w")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)


if __name__ == "__main__":
    entry()
