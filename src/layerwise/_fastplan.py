"""`layerwise plan` answered before torch is imported, from what an earlier plan of the model kept.

A plan's own work takes milliseconds; building the model on the meta device needs torch and
transformers' model code: seconds of imports (4-9 s on a 2-core VM, BENCHMARKS.md). So a plan
keeps its inputs (planning.PlanInputs: the placement tree, the anatomy, the sizes the forward
pass depends on) under <cache>/plans/, once the tree alone placed the model as transformers did
(`keep`, from cli.cmd_plan), and `answer` (run by layerwise/__init__.py right after the bytecode
and prefetch steps, for a layerwise command only) parses a `plan` command line with plan's own
grammar (planflags.py), finds the inputs kept for it and prints the plan: the process ends there,
without torch. What it prints is what the command would (tests/test_fastplan.py).

Kept inputs are found by a key of all they depend on: the model (a built-in's name, or a
checkpoint's config.json: its real path and its bytes), --dtype and --quant as given, the
versions of transformers and torch, and layerwise's own source files (sizes and times: an edit
is another key). Without kept inputs, without --gpus (the GPUs present are asked of torch),
under torchrun, with LAYERWISE_PLAN_CACHE=0, or on anything unexpected (a malformed command line
among them), the command runs as before, and reports its own errors. Standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

from ._boot import cache_root, host_memory_available, is_command, read_threads, writer_mode

OFF = "LAYERWISE_PLAN_CACHE"
FORMAT = 1
KEPT = 64  # plans kept; the oldest go first
_RANKED = ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK")

log = logging.getLogger(__name__)


class _Decline(Exception):
    """The fast answer does not apply: the command runs as before."""


class _Parser(argparse.ArgumentParser):
    """plan's grammar, declining where argparse would print or exit (the command does that)."""

    def __init__(self, *args, **kwargs):
        from .flagtypes import text

        super().__init__(*args, **kwargs)
        self.register("type", None, text)  # an empty value: the command refuses it, as arguments.Parser

    def error(self, message):
        raise _Decline(message)

    def exit(self, status=0, message=None):
        raise _Decline(message)

    def print_help(self, file=None):
        raise _Decline("help")

    def print_usage(self, file=None):
        raise _Decline("usage")


def plans_dir() -> Path:
    return cache_root() / "plans"


def key(spec: str, dtype: str | None, quant: str | None) -> str | None:
    """The key of a plan's inputs (the module's docstring); None for a model whose plans are not
    kept (a .gguf file, a path without a config.json)."""
    spec = spec.strip()
    if spec.startswith("builtin:"):
        model: dict = {"builtin": spec[len("builtin:"):]}
    else:
        config = Path(spec).expanduser() / "config.json"
        if not config.is_file():
            return None
        model = {"config": str(config.resolve()), "sha256": hashlib.sha256(config.read_bytes()).hexdigest()}
    material = {"format": FORMAT, "model": model, "dtype": dtype, "quant": quant,
                "versions": {name: _version(name) for name in ("transformers", "torch")}, "source": _source()}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def _version(package: str) -> str | None:
    from importlib import metadata  # here: every command imports this module, only plan needs it

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _source() -> str:
    """layerwise's source files, by name, size and modification time."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        st = path.stat()
        digest.update(f"{path.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def keep(spec: str, dtype: str | None, quant: str | None, inputs, settings: dict, plan) -> bool:
    """Keep `inputs` for the next plan of this model, if the tree alone gives the very `plan`
    transformers' routine gave (`settings`: plan_from's arguments it was made with). Returns
    whether they were kept; a cache that cannot be written is only logged."""
    from .planning import plan_from

    k = key(spec, dtype, quant)
    if k is None:
        return False
    try:
        again = plan_from(inputs, **settings)
    except Exception as err:  # noqa: BLE001 - the tree cannot place it: nothing kept, the plan stands
        log.debug("plan inputs not kept: %s", err)
        return False
    if again != plan:
        log.debug("plan inputs not kept: the tree places %s otherwise than transformers", spec)
        return False
    from .atomic import write_text_atomic

    directory = plans_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_text_atomic(directory / f"{k}.json", json.dumps({"format": FORMAT, "inputs": inputs.to_json()}),
                          fsync=False)
        kept = sorted(directory.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for old in kept[:-KEPT]:
            old.unlink(missing_ok=True)
    except OSError as err:
        log.debug("plan inputs not kept in %s: %s", directory, err)
        return False
    return True


def load(k: str):
    """The inputs kept under key `k`, or None."""
    from .planning import PlanInputs

    try:
        data = json.loads((plans_dir() / f"{k}.json").read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            return None
        return PlanInputs.from_json(data["inputs"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def answer(argv: list[str] | None = None) -> None:
    """For a layerwise `plan` command with kept inputs: print the plan and end the process with
    the command's exit code (0 fits, 1 not). Returns (the command runs) in every other case."""
    args = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get(OFF) == "0" or not args or args[0] != "plan" or any(v in os.environ for v in _RANKED):
        return
    if argv is None and not is_command():
        return
    try:
        read_threads(), writer_mode()  # a bad LAYERWISE_READ_THREADS or LAYERWISE_WRITER is the command's to report
        text, code = _plan_text(args)
    except Exception:  # noqa: BLE001 - any doubt: the command runs, and reports what is wrong
        return
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away (`| head`), as the command itself handles it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        os._exit(141)
    os._exit(code)


def _plan_text(args: list[str]) -> tuple[str, int]:
    from .devicemap import DEFAULT_DEVICE_MAP
    from .planflags import add_plan
    from .planning import DEFAULT_TOKENS, plan_from
    from .report import plan_json, plan_text
    from .sizes import parse_gpus

    parser = _Parser(prog="layerwise")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    sub.type = str  # the words after the command are plan's to check
    add_plan(sub)
    ns = parser.parse_args(args)
    if not ns.gpus:
        raise _Decline("the GPUs present")
    k = key(ns.model, ns.dtype, ns.quant)
    inputs = load(k) if k else None
    if inputs is None:
        raise _Decline("nothing kept")
    plan = plan_from(inputs, parse_gpus(ns.gpus), host_memory_available(), device_map=ns.device_map or DEFAULT_DEVICE_MAP,
                     max_memory=ns.max_memory, tokens=ns.tokens or DEFAULT_TOKENS, model_name=ns.model.strip())
    text = json.dumps(plan_json(plan), indent=2, default=str) if ns.json else plan_text(plan)
    return text, 0 if plan.fits else 1
