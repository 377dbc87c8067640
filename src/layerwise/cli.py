"""The `layerwise` command: parse, call one library function, render, return an exit code.

Exit codes: 0 pass / ready / fits, 1 diverged / not ready / does not fit, 2 usage or input error.
A UserError becomes one line on stderr and exit 2; any other exception is a bug and keeps its
traceback. The flags and their defaults are arguments.py's; the renderings report.py's and plot.py's.

Under torchrun (several ranks: `check`, `extract`, `test`) every rank parses the command, joins
the job (distributed.py), agrees with the others on the command and the model, and runs it; rank
0 alone prints, and any rank's failure is one line on rank 0 (exit 2 usage, 1 a rank failed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path

from . import arguments, distributed, loading, machine, models, plot, readiness, recording, report
from .atomic import write_text_atomic
from .compare import compare_paths
from .errors import UserError
from .extract import extract, gather_prompts
from .importer import import_run
from .layer_test import compare_layer_test, run_layer_test
from .runs import MANIFEST
from .sizes import format_bytes, parse_gpus
from .streaming import stream_extract

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _emit_json(data, target: str | None) -> None:
    text = json.dumps(data, indent=2, default=str)
    if target in (None, "-"):
        print(text)
    else:
        write_text_atomic(target, text + "\n")


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
    plan = loading.plan_load(ref, config, arguments.load_options(args), gpu_bytes=gpu_bytes)
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
        if args.stream:
            result, stats = stream_extract(args.model, args.out, items, options, arguments.stream_options(args))
            print(f"streamed {format_bytes(stats.weights_read_bytes)} of weights, one layer at a time "
                  f"(reading {stats.read_seconds:.2f} s, waiting {stats.wait_seconds:.2f} s); peak device memory "
                  f"{format_bytes(stats.peak_device_bytes)}")
        else:
            result = extract(args.model, args.out, items, options, arguments.load_options(args), progress=update)
    finally:
        close()
    resumed = f", {result.resumed_batches} batch(es) already on disk" if result.resumed_batches else ""
    print(f"wrote run {result.path}: {result.prompts} prompt(s), {result.tensors} tensors, "
          f"{format_bytes(result.bytes)} in {result.seconds:.2f} s ({result.gb_per_s:.2f} GB/s){resumed}; "
          f"forward {result.forward_seconds:.2f} s; peak host RAM {format_bytes(result.peak_rss_bytes)}, "
          f"pinned {format_bytes(result.pinned_peak_bytes)}{_ranks_note(args)}")
    return EXIT_OK


def _ranks_note(args) -> str:
    world = distributed.session().world
    if world == 1:
        return ""
    return f"; {world} ranks, tensor parallel" if args.tp else f"; {world} ranks, each its share of the batches"


def cmd_import(args) -> int:
    manifest = import_run(args.src, args.out, args.rename, args.overwrite, args.model)
    print(f"wrote run {args.out}: {len(manifest['prompts'])} prompt(s), {len(manifest['tensors'])} tensors")
    return EXIT_OK


def _progress_line(done: int, total: int) -> None:
    end = "\n" if done >= total else ""
    print(f"\rcompare: {100 * done / max(total, 1):3.0f}% ({format_bytes(done)} of {format_bytes(total)})",
          end=end, file=sys.stderr, flush=True)


def _write_pictures(result, args) -> None:
    if args.plot:
        plot.write_plot(result, args.plot)
    if args.html:
        plot.write_html(result, args.html)


def cmd_test(args) -> int:
    options = arguments.test_options(args)
    prompts = gather_prompts(args.prompt, args.prompts) if (args.prompt or args.prompts) else None
    compare = arguments.compare_options(args)
    if args.plot or args.html:
        plot.require_matplotlib()  # before any work, not after
    result = run_layer_test(args.model, options, prompts)
    if not distributed.session().is_main:
        return EXIT_OK  # under torchrun rank 0 compares and reports
    tested = compare_layer_test(result, compare, progress=_progress_line if sys.stderr.isatty() else None)
    if args.json:
        _emit_json(report.layer_test_json(tested), args.json)
    if args.json != "-":
        print(report.layer_test_text(tested))
    main_report = tested.reports.get(tested.decides) if tested.decides else None
    if main_report is not None:
        _write_pictures(main_report, args)
    return EXIT_OK if tested.passed else EXIT_FAIL


def cmd_compare(args) -> int:
    options = arguments.compare_options(args, args.prompts)
    if args.plot or args.html:
        plot.require_matplotlib()  # before reading gigabytes, not after
    progress = _progress_line if sys.stderr.isatty() else None
    result = compare_paths(args.reference, args.candidate, options, args.baseline, progress=progress)
    if args.json:
        _emit_json(report.report_json(result), args.json)
    if args.json != "-":
        print(report.report_text(result))
    _write_pictures(result, args)
    return EXIT_OK if result.passed else EXIT_FAIL


COMMANDS = {"check": cmd_check, "plan": cmd_plan, "load": cmd_load, "extract": cmd_extract, "import": cmd_import,
            "compare": cmd_compare, "test": cmd_test}


def main(argv: list[str] | None = None) -> int:
    try:
        env = distributed.detect()
    except UserError as err:
        return _print_error(str(err), EXIT_USAGE)
    if env is not None:
        return _main_ranked(argv, env)
    parser = arguments.build_parser()
    try:
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        return COMMANDS[args.command](args)
    except UserError as err:
        return _print_error(str(err), EXIT_USAGE)
    except KeyboardInterrupt:
        print("layerwise: interrupted", file=sys.stderr)
        return 130


def _print_error(message: str, code: int = EXIT_FAIL) -> int:
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
    try:
        return _run_ranked(ranks, args, problem, layout)
    except UserError as err:
        return _failed(ranks, str(err), EXIT_USAGE)
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
    sys.exit(main())
