"""The command line's grammar: every subcommand's flags, the option groups they share, and
parsed arguments turned into the library's option objects.

Defaults live on the option dataclasses (loading.LoadOptions, extract.ExtractOptions, ...), never
here: a flag's argparse default is None, meaning "the dataclass default", which its help text
shows. `options(cls, **values)` builds a dataclass from the values given and leaves the rest to
it. A usage error is a UserError (one line, exit 2), not argparse's usage block.
"""

from __future__ import annotations

import argparse
import os

from . import __version__
from .capture import DEFAULT_POINTS, POINTS
from .compare import CompareOptions
from .distributed import DistOptions
from .errors import UserError
from .extract import ExtractOptions
from .flagtypes import amount, cosine, count, limit, text, wait_seconds
from .importer import DECODES, FORMATS
from .layer_test import TEST_TYPES, TestOptions
from .loading import LoadOptions
from .names import BadSelection, parse_indices
from .planflags import add_plan as _plan, compute_flags as _compute, placement_flags as _placement, quant_flag as _quant
from .quant import FP8_BACKENDS, DEFAULT_FP8_BACKEND
from .readiness import CheckOptions
from .replay import ReplayOptions
from .streaming import StreamOptions
from .tolerances import build_tolerances
from .zoo import BUILTINS

class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, not a usage block, and no flag takes an empty text."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register("type", None, text)  # the type of every flag declared without one

    def add_argument(self, *names, **kwargs):
        if names and not names[0].startswith("-"):  # a positional (a model, a run): its reader says what to give
            kwargs.setdefault("type", str)
        return super().add_argument(*names, **kwargs)

    def error(self, message):
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def options(cls, **values):
    """`cls(**values)` without the values not given (None): those take the dataclass default."""
    return cls(**{k: v for k, v in values.items() if v is not None})


class _Renamed(argparse.Action):
    """A flag renamed: using it is an error naming the new flag."""

    def __init__(self, option_strings, dest, new: str = "", why: str = "", **kwargs):
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)
        self.new, self.why = new, why

    def __call__(self, parser, namespace, values, option_string=None):
        raise UserError(f"{parser.prog} {option_string} is now {self.new} ({self.why}): "
                        f"write {self.new} {values}")


# --------------------------------------------------------------------------------- option groups

def _fp8_backend(g) -> None:
    g.add_argument("--fp8-backend", choices=FP8_BACKENDS,
                   help="--quant fp8 arithmetic: torch's block-scaled scaled_mm (Hopper GPUs) or an exact float32 "
                        f"emulation (default: {DEFAULT_FP8_BACKEND}, scaled_mm where it runs)")


def _prompts(g) -> None:
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--prompts", action="append", help="a file: one prompt per line (.txt), or JSONL with text or "
                                                      "token_ids (.jsonl, .json, or a first line that is an object); - reads the "
                                                      "standard input")
    g.add_argument("--chat-template", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    g.add_argument("--max-tokens", type=count, help="refuse prompts longer than this")
    g.add_argument("--points", help=f"what to capture, comma list of {','.join(POINTS)} "
                                    f"(default: {','.join(DEFAULT_POINTS)})")
    g.add_argument("--batch-size", type=count, help=f"prompts per forward pass (default: {ExtractOptions.batch_size})")


def _torchrun(p, gpus: bool = True, tp: bool = False) -> None:
    """Flags that matter when torchrun starts several ranks (docs/MULTI_GPU_GUIDE.md)."""
    g = p.add_argument_group("under torchrun (several ranks, one node or many)")
    g.add_argument("--dist-timeout", type=wait_seconds, metavar="SECONDS",
                   help="the longest a rank waits for the others (joining, every exchange) before failing "
                        f"(default: {DistOptions.timeout_s:g})")
    if gpus:
        g.add_argument("--gpus-per-rank", type=count, metavar="K",
                       help="GPUs of each rank's replica (default: the node's GPUs divided by its ranks)")
    if tp:
        g.add_argument("--tp", action="store_true",
                       help="tensor parallel: the ranks share one model, split by transformers' tp_plan='auto' "
                            "(one GPU each), compute every batch together, and rank 0 writes the run "
                            "(default: each rank a whole replica computing its share of the batches)")


def _tolerances(p, compare: bool = True) -> None:
    """Tolerances and report options, shared by `compare` and `test` (which compares every prompt)."""
    g = p.add_argument_group("tolerances (default: by dtype; a tensor uses the last matching --tolerance, else the "
                             "file, else the global limits, else the dtype default)")
    g.add_argument("--tolerance", action="append", default=[], metavar="PATTERN=CHECKS",
                   help="e.g. 'model.layers.*:output=rel_l2<3e-2' or 'lm_head:output=kl<1e-3,top1>=0.99' (repeatable)")
    g.add_argument("--tolerance-file", metavar="FILE", help="a .toml or .json file of rules and global limits")
    g.add_argument("--rtol", type=limit, help="allclose: every |ref - cand| <= atol + rtol |ref|")
    g.add_argument("--atol", type=limit, help="allclose absolute term (0 when only --rtol is given)")
    g.add_argument("--max-rel-l2", type=limit, help="largest ||ref - cand|| / ||ref||")
    g.add_argument("--min-cosine", type=cosine, help="smallest cosine similarity")
    g.add_argument("--max-abs", type=limit, help="largest |ref - cand|")
    g.add_argument("--max-kl", type=limit, help="largest mean KL(ref || cand) of the logits, in nats")
    if compare:  # test compares every prompt it ran, with no baseline
        p.add_argument("--prompt-index", metavar="INDICES",
                       help="compare only these prompt indices: 0,2 or 0-3 (default: all)")
        p.add_argument("--prompts", action=_Renamed, new="--prompt-index",
                       why="--prompts names a prompt file, in extract and test")
        p.add_argument("--metrics-device", help="where the metrics are computed (default: cuda:0 when a GPU is "
                                                "present, else cpu)")
        p.add_argument("--noise-factor", type=limit, help="with --baseline, a tensor within this many noise floors "
                                                          f"passes (default: {CompareOptions.noise_factor:g})")
    p.add_argument("--tie-threshold", type=limit, help="router score (sigmoid of the logit) margin of a near-tie "
                                                       "(default: by dtype, 1e-4 for fp32 to 1e-2 for bf16)")
    p.add_argument("--logits-topk", type=count,
                   help=f"k of the logits' top-k overlap (default: {CompareOptions.logits_topk})")
    p.add_argument("--per-prompt", action="store_true", help="print every prompt's logits line (default: a summary)")
    p.add_argument("--no-verify", action="store_true", help="skip the digest check of every tensor read")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON ('-': print it instead of the table)")
    p.add_argument("--plot", metavar="FILE.png", help="plot the metrics against layer index (needs matplotlib)")
    p.add_argument("--html", metavar="FILE", help="write one self-contained HTML page: plots, a per-token error map of "
                                                  "the first divergent and the worst layers, every tensor (needs "
                                                  "matplotlib)")


# -------------------------------------------------------------------------------------- commands

def build_parser() -> Parser:
    builtins = ", ".join(f"builtin:{n}" for n in BUILTINS)
    parser = Parser(prog="layerwise", description="Layer-by-layer numerical testing of large language models. A "
                                                  f"MODEL is a checkpoint directory, a .gguf file, or one of: {builtins}.")
    parser.add_argument("--version", action="version", version=f"layerwise {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is being done")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    sub.type = str  # the words after the command are the subcommand's to check, not `text`'s
    for add in (_check, _plan, _load, _extract, _import, _compare, _test):
        add(sub)
    return parser


def _check(sub) -> None:
    p = sub.add_parser("check", help="is this machine ready? PASS/WARN/FAIL lines, exit 0 ready / 1 not ready")
    p.add_argument("model", nargs="?", help="also check this model's files, known bugs and fit")
    p.add_argument("--cpu", action="store_true", help="a CPU-only run is intended: no GPU is not a failure")
    p.add_argument("--max-memory", help="per-device limit for the fit check")
    p.add_argument("--dtype", help=f"compute dtype for the fit check (default: {LoadOptions.dtype})")
    p.add_argument("--tokens", type=count, help=f"forward-pass size (default: {LoadOptions.tokens})")
    p.add_argument("--out", help=f"where dumps will be written, for the disk check (default: {CheckOptions.out_dir})")
    _quant(p, "dequantize")
    p.add_argument("--json", action="store_true", help="print JSON instead of lines")
    _torchrun(p, gpus=False)


def _load(sub) -> None:
    p = sub.add_parser("load", help="load a model over the GPUs and print where every layer went")
    p.add_argument("model", help="MODEL")
    g = p.add_argument_group("placement")
    _placement(g)
    _compute(g)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _extract(sub) -> None:
    p = sub.add_parser("extract", help="capture every layer's activations for some prompts into a run directory")
    p.add_argument("model", help="MODEL")
    p.add_argument("--out", required=True, help="run directory to write (resumed if it holds the same run)")
    p.add_argument("--overwrite", action="store_true", help="replace a different run already in --out")
    g = p.add_argument_group("prompts and capture")
    _prompts(g)
    g.add_argument("--layers", help="restrict to these layers, e.g. 0-9,20 (default: all)")
    g.add_argument("--modules", action="append", metavar="REGEX[:ROLE]",
                   help="also capture every module whose named_modules() path the regex matches in full: its "
                        "output (default), :input or :input,output (repeatable), e.g. "
                        "'model\\.layers\\.\\d+\\.self_attn\\.q_proj'")
    g.add_argument("--pinned-gib", type=amount,
                   help=f"host memory for in-flight GPU->host copies (default: {ExtractOptions.pinned_budget_gib})")
    g = p.add_argument_group("placement")
    _placement(g)
    _compute(g)
    _fp8_backend(g)
    g.add_argument("--stream", action="store_true",
                   help="one decoder layer at a time on one device, for models larger than the GPUs")
    g.add_argument("--device", help="the device for --stream (default: cuda:0, else cpu); --engine llama.cpp: cpu "
                                    "(default) or gpu")
    g.add_argument("--engine", default="transformers", choices=("transformers", "llama.cpp"),
                   help="who computes: transformers (the reference), or llama.cpp itself for a .gguf MODEL through "
                        "llama-cpp-python (the llamacpp extra), recorded under the transformers names of the same "
                        "GGUF (default: %(default)s)")
    _torchrun(p, tp=True)


def _import(sub) -> None:
    p = sub.add_parser("import", help="turn tensors from another engine (SGLang or vLLM dumps, .npy/.pt/.safetensors) "
                                      "into a run",
                       description="Write a run (docs/FORMAT.md, Importing) from tensors another engine or a custom port "
                                   "produced, so that compare can measure it against a layerwise run. SRC is an SGLang "
                                   "dump, vLLM hidden-states files, one directory per prompt (0/, 1/, ...) of "
                                   "<module path>.<role>.npy or .pt files and tokens.npy, or one .safetensors file "
                                   "per prompt keyed <module path>:<role> and tokens. .pt files are read as tensors "
                                   "only (no code runs).")
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
    p.add_argument("--decode", choices=DECODES,
                   help="SGLang: decode steps after the prefill are skipped, or imported as further positions "
                        f"(default: {DECODES[0]})")
    p.add_argument("--layers", help="vLLM: the layer ids the hidden states hold (eagle_aux_hidden_state_layer_ids), "
                                    "e.g. 2,16,32")
    p.add_argument("--model", help="record this model spec in the run (optional)")
    p.add_argument("--overwrite", action="store_true", help="replace a different run already in --out")


def _compare(sub) -> None:
    p = sub.add_parser("compare", help="name the first tensor where two runs diverge; exit 0 pass / 1 diverged",
                       description="Compare a candidate run with a reference run tensor by tensor, in model order, "
                                   "and name the first that breaks its tolerance (docs/COMPARE.md).")
    p.add_argument("reference", metavar="REF", help="the reference run directory")
    p.add_argument("candidate", metavar="CAND", help="the candidate run directory")
    p.add_argument("--baseline", metavar="RUN2", help="a second reference run (another batch size, kernel...): its "
                                                      "distance to REF is the noise floor")
    _tolerances(p)


def _test(sub) -> None:
    p = sub.add_parser("test", help="test layers against a reference run: single (isolated), multi (a chain), "
                                    "full (the whole model), extract-all (make a reference)")
    p.add_argument("model", help="MODEL: the candidate checkpoint (often the reference's own)")
    p.add_argument("--reference", help="the reference run (from layerwise extract); not needed for extract-all")
    p.add_argument("--test-type", choices=TEST_TYPES, help=f"(default: {TestOptions.test_type})")
    p.add_argument("--layer", help=f"single: a layer number or all (default: {TestOptions.layer})")
    p.add_argument("--layers", help="multi: the range A-B chained from A's recorded input (default: every layer); "
                                    "full / extract-all: the layers to capture, e.g. 0-9,20")
    p.add_argument("--out", help=f"directory for the candidate run(s) (default: {TestOptions.out})")
    p.add_argument("--overwrite", action="store_true", help="replace different runs already in --out")
    p.add_argument("--stream", action="store_true",
                   help="full / extract-all: one decoder layer at a time on --device, for models larger than the "
                        "GPUs (single and multi always load one layer at a time)")
    p.add_argument("--record-reference", action="store_true",
                   help="single / multi: record --reference from MODEL over --prompt/--prompts (as extract --stream "
                        "would) in the same read of the checkpoint as the test: one read instead of two")
    g = p.add_argument_group("candidate settings (default: the reference's own)")
    _compute(g, default="the reference's")
    g.add_argument("--device", help="single / multi: where the layers run (default: cuda:0, else cpu)")
    g.add_argument("--candidate", help="package.module:factory (or file.py:factory) building your own decoder layer: "
                                       "factory(config, layer_index, weights) -> nn.Module with the HF layer's call "
                                       "signature")
    g.add_argument("--allow-config-mismatch", action="store_true",
                   help="the model is a variant of the reference's (quantized, converted): its config may differ")
    _fp8_backend(g)
    g.add_argument("--deterministic", action="store_true",
                   help="single / multi: torch's deterministic kernels (when the first layer, run twice, differs)")
    _placement(p.add_argument_group("placement (full, extract-all)"))
    _prompts(p.add_argument_group("prompts and capture (extract-all, --record-reference)"))
    _tolerances(p, compare=False)
    _torchrun(p)


# ------------------------------------------------------------------------------ args -> options

def load_options(args) -> LoadOptions:
    return options(LoadOptions, device_map=args.device_map, max_memory=args.max_memory, dtype=args.dtype,
                   offload_folder=getattr(args, "offload_folder", None),
                   allow_spill=not getattr(args, "no_spill", False),
                   attn_implementation=getattr(args, "attn_implementation", None), tokens=args.tokens,
                   quant=args.quant, fp8_backend=getattr(args, "fp8_backend", None),
                   tensor_parallel=getattr(args, "tp", None))


def distributed_options(args) -> DistOptions:
    return options(DistOptions, timeout_s=args.dist_timeout, gpus_per_rank=getattr(args, "gpus_per_rank", None),
                   tensor_parallel=getattr(args, "tp", None), keep_gpus=args.command == "check" or None)


def fingerprint(args) -> dict:
    """The parsed command as every rank must hold it, by flag; relative paths made absolute
    (ranks started in other directories would name other files)."""
    out = {}
    for key, value in sorted(vars(args).items()):
        if key in _PATHS and value and value != "-" and not str(value).startswith("builtin:"):
            value = [os.path.abspath(v) for v in value] if isinstance(value, list) else os.path.abspath(value)
        out[key if key in ("command", "model") else f"--{key.replace('_', '-')}"] = value
    return out


_PATHS = ("model", "out", "reference", "prompts", "json", "plot", "html", "tolerance_file", "offload_folder")


def check_options(args) -> CheckOptions:
    load = options(LoadOptions, max_memory=args.max_memory, dtype=args.dtype, tokens=args.tokens, quant=args.quant)
    return options(CheckOptions, model=args.model, cpu=args.cpu, out_dir=args.out, load=load)


def extract_options(args) -> ExtractOptions:
    modules = getattr(args, "modules", None)
    return options(ExtractOptions, points=args.points, layers=getattr(args, "layers", None), batch_size=args.batch_size,
                   max_tokens=args.max_tokens, chat_template=args.chat_template, overwrite=args.overwrite,
                   pinned_budget_gib=getattr(args, "pinned_gib", None), modules=tuple(modules) if modules else None)


def import_options(args) -> dict:
    """import_run's keyword arguments from `layerwise import`; those not given take its defaults."""
    return {k: v for k, v in dict(renames=args.rename, overwrite=args.overwrite, model=args.model,
                                  source_format=args.source_format, map_file=args.map, decode=args.decode,
                                  layer_ids=args.layers).items() if v is not None}


def stream_options(args) -> StreamOptions:
    return options(StreamOptions, device=args.device, dtype=args.dtype, attn_implementation=args.attn_implementation,
                   quant=args.quant, fp8_backend=args.fp8_backend)


def test_options(args) -> TestOptions:
    candidate = options(ReplayOptions, dtype=args.dtype, attn_implementation=args.attn_implementation,
                        device=args.device or single_device(args.device_map), candidate=args.candidate,
                        quant=args.quant, fp8_backend=args.fp8_backend, deterministic=args.deterministic,
                        allow_config_mismatch=args.allow_config_mismatch, overwrite=args.overwrite)
    extract = options(ExtractOptions, points=args.points, batch_size=args.batch_size, max_tokens=args.max_tokens,
                      chat_template=args.chat_template, overwrite=args.overwrite)
    return options(TestOptions, test_type=args.test_type, reference=args.reference, layer=args.layer,
                   layers=args.layers, out=args.out, stream=args.stream, record_reference=args.record_reference,
                   candidate=candidate,
                   load=load_options(args), extract=extract)


def compare_options(args, prompts: str | None = None) -> CompareOptions:
    tolerances = build_tolerances(args.tolerance, args.tolerance_file, rtol=args.rtol, atol=args.atol,
                                  max_rel_l2=args.max_rel_l2, min_cosine=args.min_cosine, max_abs=args.max_abs,
                                  max_kl=args.max_kl)
    return options(CompareOptions, tolerances=tolerances, prompts=prompt_indices(prompts),
                   tie_threshold=args.tie_threshold, logits_topk=args.logits_topk,
                   noise_factor=getattr(args, "noise_factor", None), verify=not args.no_verify,
                   device=getattr(args, "metrics_device", None))


def single_device(device_map: str | None) -> str | None:
    """--device-map cuda:1 (or 1, or cpu) also says where a single-layer test runs."""
    if not device_map:
        return None
    if device_map.isdigit():
        return f"cuda:{device_map}"
    if device_map == "cpu" or device_map.startswith("cuda:"):
        return device_map
    return None


def prompt_indices(text: str | None) -> tuple[int, ...] | None:
    """`--prompt-index "0,2"` or `"0-3,7"` -> (0, 2) / (0, 1, 2, 3, 7)."""
    if text is None:
        return None
    try:
        return parse_indices(text)
    except BadSelection as err:
        if err.reversed_range:
            raise UserError(f"--prompt-index {text!r}: {err.part!r} is not a valid index or range") from None
        raise UserError(f"--prompt-index {text!r}: expected prompt indices like 0,2 or 0-3") from None
