"""Is this machine ready to run a model? PASS / WARN / FAIL verdicts, one per check.

The seed's `check_gpu_readiness.py`, extended: GPUs and their memory, driver and CUDA,
library versions against minimums, known numerics bugs for this model on these versions,
the checkpoint's integrity (headers only), the placement verdict for the GPUs present, peer
links, host RAM and disk for offload and dumps, and whether each process must compile its Python
modules again (no usable cached bytecode); under torchrun also the job (ranks per
node, an exchange and an NCCL all-reduce timed: `with_distributed`). Probes come from machine.py; this module
only judges. A machine is ready when no check FAILs.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import socket
import time
from dataclasses import dataclass, field, replace

import torch

from . import _boot, checkpoint, machine, models, quant
from .distributed import Session
from .errors import UserError
from .loading import LoadOptions
from .placement import meta_model, plan_for
from .names import format_ranges
from .paths import refuses_new
from .sizes import format_bytes

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"

MINIMUM_VERSIONS = {"torch": "2.6", "transformers": "5.0", "accelerate": "1.0", "safetensors": "0.4"}
BYTECODE_WARN_MODULES = 200  # modules compiled at every start worth a WARN (about 0.7 s on a 2-core machine)
# transformers versions that drop MiniMax-M2's rotary_dim (issue #48241, fixed by PR #48486).
ROPE_BUG_FIXED_IN = (5, 18)


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # PASS | WARN | FAIL
    detail: str


@dataclass(frozen=True)
class CheckOptions:
    model: str | None = None
    cpu: bool = False  # a CPU-only run is intended: no GPU is not a failure
    out_dir: str = "."  # where dumps will be written (disk-space check)
    load: LoadOptions = field(default_factory=LoadOptions)  # the loading to judge: dtype, tokens, --max-memory, --quant


@dataclass(frozen=True)
class Readiness:
    checks: tuple[Check, ...] = field(default_factory=tuple)

    @property
    def ready(self) -> bool:
        return all(c.status != FAIL for c in self.checks)


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


def check_versions() -> list[Check]:
    out = []
    for package, minimum in MINIMUM_VERSIONS.items():
        try:
            version = md.version(package)
        except md.PackageNotFoundError:
            out.append(Check(package, FAIL, f"not installed (need >= {minimum})"))
            continue
        ok = _version_tuple(version) >= _version_tuple(minimum)
        out.append(Check(package, PASS if ok else FAIL, f"{version} (need >= {minimum})"))
    return out


def check_gpus(cpu: bool) -> tuple[list[Check], list[machine.Gpu]]:
    found = machine.gpus()
    if not found:
        cuda = "a CPU-only torch build" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}"
        if cpu:
            return [Check("gpus", PASS, f"none ({cuda}); CPU-only run intended (--cpu)")], found
        return [Check("gpus", FAIL, f"no GPU visible ({cuda}): run on a GPU machine, or pass --cpu for a CPU-only run")], found
    names = {g.name for g in found}
    detail = "; ".join(f"cuda:{g.index} {g.name} {format_bytes(g.total_bytes)} total, {format_bytes(g.free_bytes)} free"
                       for g in found)
    checks = [Check("gpus", PASS, f"{len(found)} GPU(s): {detail}")]
    if len(names) > 1:
        checks.append(Check("gpu-mix", WARN, f"mixed GPU models ({', '.join(sorted(names))}): "
                                             "balanced placement assumes equal cards; pass --max-memory per GPU"))
    return checks, found


def check_driver(found: list[machine.Gpu]) -> list[Check]:
    if not found:
        return []
    nvml = machine.nvml_info()
    cuda = torch.version.cuda or "?"
    if nvml.driver:
        return [Check("driver", PASS, f"driver {nvml.driver}, torch built for CUDA {cuda}")]
    return [Check("driver", WARN, f"torch built for CUDA {cuda}; driver version unknown: {nvml.error}")]


def check_links(found: list[machine.Gpu]) -> list[Check]:
    if len(found) < 2:
        return []
    peers = machine.peer_access()
    missing = [f"{a}->{b}" for (a, b), ok in peers.items() if not ok]
    nvml = machine.nvml_info()
    links = ", ".join(f"cuda:{i} {n}" for i, n in sorted(nvml.nvlink_links.items())) if nvml.nvlink_links else None
    nv = f"NVLink links: {links}" if links else f"NVLink unknown ({nvml.error})" if nvml.error else "no active NVLink"
    if missing:
        return [Check("peer-links", WARN, f"no peer access for {', '.join(missing[:6])}: activations between "
                                          f"those GPUs go through host memory; {nv}")]
    return [Check("peer-links", PASS, f"peer access between all {len(found)} GPUs; {nv}")]


def check_known_bugs(config) -> list[Check]:
    """Numerics bugs of the installed versions for this model."""
    if config is None or getattr(config, "model_type", None) != "minimax_m2":
        return []
    version = models.transformers_version()
    shown = ".".join(map(str, version))
    if version < ROPE_BUG_FIXED_IN:
        return [Check("rope-bug", WARN, f"transformers {shown} drops MiniMax-M2's rotary_dim (issue #48241): "
                                        "layerwise loads with partial_rotary_factor set; other tools on this "
                                        "install rotate all 128 dims (upgrade to >= 5.18)")]
    return [Check("rope-bug", PASS, f"transformers {shown} keeps MiniMax-M2's partial RoPE")]


def check_router_precision(config, dtype: str) -> list[Check]:
    """For a model whose reference keeps its router in fp32: the router dtypes the model is built
    with for this compute dtype (on the meta device), as loading, streaming and layer tests build
    it: float32, or a FAIL naming the tensor."""
    if config is None or getattr(config, "model_type", None) not in models.FP32_ROUTER_PATTERNS:
        return []
    meta = meta_model(config, models.parse_dtype(dtype))
    found = models.fp32_router_tensors(meta)
    wrong = {n: d for n, d in found.items() if d != torch.float32}
    if wrong:
        name, got = next(iter(wrong.items()))
        return [Check("router-precision", FAIL, f"{name} would be {models.dtype_name(got)} with --dtype {dtype}: "
                                                "routing would differ from the reference (a layerwise bug; report it)")]
    return [Check("router-precision", PASS, f"{len(found)} router tensors (gate weight, e_score_correction_bias) "
                                            f"built in float32 with --dtype {dtype} (transformers alone casts them)")]


def check_quantization(config, found: list[machine.Gpu]) -> list[Check]:
    """The checkpoint's quantization and what each --quant needs on this install."""
    try:
        scheme = quant.scheme_of(config)
    except UserError as err:
        return [Check("quantization", FAIL, str(err))]
    if scheme is None:
        return []
    checks = [Check("quantization", PASS, f"{scheme.describe()}; unquantized: {', '.join(scheme.not_converted) or '-'}"),
              Check("quant-dequantize", PASS, "--quant dequantize (default, the reference): e4m3 x scale in float32, "
                                              "cast to the compute dtype, on any device (transformers' own rule)")]
    fast = [g for g in found if g.capability == "9.0"]
    if fast and scheme.block == (128, 128):
        checks.append(Check("quant-fp8", PASS, f"--quant fp8: torch's block-scaled scaled_mm on cuda:{fast[0].index} "
                                               f"({fast[0].name}); no `kernels` package needed"))
    else:
        why = ("no Hopper (sm90) GPU here" if not fast else
               f"scaled_mm takes 128x128 blocks, this checkpoint has {scheme.block}")
        checks.append(Check("quant-fp8", WARN, f"--quant fp8 runs the exact float32 emulation ({why}): "
                                               "the same numbers as the kernel, slower"))
    return checks


def check_checkpoint(ref: models.ModelRef, scheme=None) -> list[Check]:
    if ref.kind != "checkpoint":
        what = "config only, no weights" if ref.kind == "config" else f"GGUF file {ref.path.name}"
        return [Check("checkpoint", PASS, what)]
    try:
        report = checkpoint.inspect_checkpoint(ref.path, scheme)
    except UserError as err:
        return [Check("checkpoint", FAIL, str(err))]
    if report.problems:
        return [Check("checkpoint", FAIL, p) for p in report.problems]
    gaps = checkpoint.index_gaps(checkpoint.weight_map(ref.path))
    if gaps:
        return [Check("checkpoint", FAIL, gap) for gap in gaps]
    return [Check("checkpoint", PASS, f"{len(report.shards)} shard(s), {report.tensor_count} tensors, "
                                      f"{format_bytes(report.total_bytes)}, headers consistent with the index")]


def check_fit(ref: models.ModelRef, config, options: CheckOptions, found: list[machine.Gpu]) -> list[Check]:
    load = options.load
    ram = machine.host_memory_available()
    gpu_bytes = [g.free_bytes for g in found]
    checks = []
    if found and load.quant is None and quant.scheme_of(config) is not None:
        fp8 = plan_for(ref.spec, config, gpu_bytes, ram, **replace(load, quant="fp8").plan_settings())
        checks.append(Check("fit-fp8", PASS if fp8.fits else WARN, f"with --quant fp8: {fp8.verdict}"))
    plan = plan_for(ref.spec, config, gpu_bytes, ram, **load.plan_settings())
    if not found:
        ok = plan.total_weight_bytes < ram
        status = PASS if ok else (WARN if options.cpu else FAIL)
        return [Check("fit", status, f"no GPU: {format_bytes(plan.total_weight_bytes)} of {plan.dtype} weights vs "
                                     f"{format_bytes(ram)} RAM available")]
    label = f" (--quant {plan.quant})" if plan.quant else ""
    return [Check("fit", PASS if plan.fits else FAIL, plan.verdict + label)] + checks


def out_place(out_dir: str) -> tuple[str | None, str]:
    """(what makes `out_dir` unusable for runs, or None; how to name it): a directory that takes
    files, or a path whose nearest existing parent is one (extract makes the rest)."""
    probe = machine.existing_ancestor(out_dir)
    if probe == os.path.abspath(out_dir) and not os.path.isdir(probe):
        return f"--out {out_dir} is a file, not a directory: runs are directories; give a directory", out_dir
    if not os.path.isdir(probe):
        return f"--out {out_dir} cannot be made: {probe} is a file, not a directory", out_dir
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"--out {out_dir}: {probe} is not writable: give a directory you can write", out_dir
    why = refuses_new(probe, "directory")  # what os.access cannot say for root: a read-only mount, /proc, /sys
    if why is not None:
        return f"--out {out_dir}: {probe} takes no new directories{why}: give a directory on a disk you can write", \
            out_dir
    made = probe != os.path.abspath(out_dir)
    return None, f"{out_dir} (not there yet: measured at {probe}, where it would be made)" if made else out_dir


def check_host(options: CheckOptions, config) -> list[Check]:
    ram = machine.host_memory_available()
    total = machine.host_memory_total()
    checks = [Check("host-ram", PASS, f"{format_bytes(ram)} available of {format_bytes(total)}")]
    problem, where = out_place(options.out_dir)
    if problem:
        return checks + [Check("disk", FAIL, problem)]
    disk = machine.disk_free(options.out_dir)
    if config is not None:
        tokens = options.load.tokens
        dump = dump_bytes_estimate(config, tokens, models.parse_dtype(options.load.dtype))
        status = PASS if disk > 2 * dump else WARN
        checks.append(Check("disk", status, f"{format_bytes(disk)} free at {where}; one extract of "
                                            f"{tokens} tokens (residual+router+logits) writes about {format_bytes(dump)}"))
    else:
        checks.append(Check("disk", PASS, f"{format_bytes(disk)} free at {where}"))
    return checks


def check_bytecode() -> Check:
    """Does every new process compile its modules from source again? Judged after the check's
    own imports (torch, transformers and, with a model, its modeling code: what a run imports)."""
    found = machine.bytecode()
    ours = found.prefix is not None and found.prefix == str(_boot.bytecode_dir())
    if found.compiled < BYTECODE_WARN_MODULES:
        extra = f"; {found.compiled} are compiled from source at every start" if found.compiled else ""
        kept = f" (kept by layerwise in {found.prefix}: Python is told to keep none)" if ours else ""
        return Check("bytecode", PASS, f"{found.modules - found.compiled} of {found.modules} imported modules load "
                                       f"from cached bytecode{kept}{extra}")
    where = f"PYTHONPYCACHEPREFIX {found.prefix}" if found.prefix else "their __pycache__ directories"
    cause = "PYTHONDONTWRITEBYTECODE is set, so Python does not cache them" if not found.writes \
        else f"Python cannot write them to {where}"
    return Check("bytecode", WARN, f"{found.compiled} of {found.modules} imported modules "
                                   f"({format_bytes(found.compiled_bytes)} of source) have no usable cached bytecode: "
                                   f"{cause}, and every process compiles them again as it starts (seconds each time); "
                                   "export PYTHONPYCACHEPREFIX=$HOME/.cache/pycache and unset PYTHONDONTWRITEBYTECODE"
                                   + ("; or unset LAYERWISE_BYTECODE_CACHE=0, and layerwise commands keep it in their "
                                      "cache" if os.environ.get(_boot.OFF) == "0" else ""))


def dump_bytes_estimate(config, tokens: int, dtype: torch.dtype) -> int:
    """Bytes of a default extract: every layer's input and output, router logits, logits."""
    size = torch.empty((), dtype=dtype).element_size()
    layers = config.num_hidden_layers
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0
    per_token = 2 * layers * config.hidden_size * size + layers * experts * 4 + config.vocab_size * size
    return tokens * per_token


def check_machine(options: CheckOptions) -> Readiness:
    checks: list[Check] = []
    gpu_checks, found = check_gpus(options.cpu)
    checks += gpu_checks + check_driver(found) + check_versions()
    config = ref = None
    if options.model:
        ref = models.resolve_model(options.model)
        try:
            config = models.load_config(ref, check_quant=False).config
            checks.append(Check("config", PASS, f"{config.model_type}, {config.num_hidden_layers} layers, "
                                                f"hidden {config.hidden_size}"))
        except UserError as err:
            checks.append(Check("config", FAIL, str(err)))
        if config is not None:
            checks += check_quantization(config, found)
        scheme = None
        if config is not None:
            try:
                scheme = quant.scheme_of(config)
            except UserError:
                pass  # reported by check_quantization
        checks += check_known_bugs(config) + check_router_precision(config, options.load.dtype)
        checks += check_checkpoint(ref, scheme)
        if config is not None and not any(c.name == "quantization" and c.status == FAIL for c in checks):
            checks += check_fit(ref, config, options, found)
    checks += check_links(found) + check_host(options, config) + [check_bytecode()]
    return Readiness(tuple(checks))


def with_distributed(result: Readiness, ranks: Session, layout_problem: str | None = None) -> Readiness:
    """`result` and the checks of the torchrun job this rank is part of (every rank calls it)."""
    return replace(result, checks=result.checks + tuple(check_distributed(ranks, layout_problem)))


def check_distributed(ranks: Session, layout_problem: str | None = None) -> list[Check]:
    """The job as its ranks see it: how many on which nodes, an exchange timed, each rank's GPUs,
    and with GPUs an NCCL all-reduce timed (NVLink or PCIe shows in its bandwidth)."""
    t0 = time.perf_counter()
    facts = ranks.all_gather({"host": socket.gethostname(), "gpus": torch.cuda.device_count(), "problem": layout_problem})
    ms = (time.perf_counter() - t0) * 1e3
    hosts: dict[str, list[int]] = {}
    for r, f in enumerate(facts):
        hosts.setdefault(f["host"], []).append(r)
    nodes = "; ".join(f"{h}: {len(rs)} rank(s) ({format_ranges(rs)})" for h, rs in hosts.items())
    checks = [Check("distributed", PASS, f"{ranks.world} ranks on {len(hosts)} node(s) answered in {ms:.0f} ms, "
                                         f"backend {ranks.backend}, --dist-timeout {ranks.timeout_s:g} s: {nodes}")]
    odd = next(((r, f["problem"]) for r, f in enumerate(facts) if f["problem"]), None)
    if odd is not None:
        checks.append(Check("rank-gpus", FAIL, f"{ranks.env.where(odd[0])}: {odd[1]}"))
    elif any(f["gpus"] for f in facts):
        per_node = ", ".join(f"{h}: {facts[rs[0]]['gpus']} GPU(s) for {len(rs)} rank(s)" for h, rs in hosts.items())
        checks.append(Check("rank-gpus", PASS, f"each rank a replica on its node's share of GPUs ({per_node})"))
    if "nccl" in (ranks.backend or ""):
        checks.append(check_nccl(ranks))
    return checks


def check_nccl(ranks: Session, megabytes: int = 64, reps: int = 5) -> Check:
    """An all-reduce over every rank's GPU through NCCL, timed (bus bandwidth, as nccl-tests count it)."""
    import torch.distributed as dist

    version = ".".join(map(str, torch.cuda.nccl.version()))
    x = torch.ones(megabytes << 18, device="cuda")  # float32: 4 bytes each
    try:
        dist.all_reduce(x)  # warm-up: NCCL connects here
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            dist.all_reduce(x)
        torch.cuda.synchronize()
    except RuntimeError as err:
        return Check("nccl", FAIL, f"NCCL {version}: an all-reduce over {ranks.world} ranks failed: "
                                   f"{str(err).splitlines()[0] if str(err) else type(err).__name__}")
    seconds = (time.perf_counter() - t0) / reps
    bus = 2 * (ranks.world - 1) / ranks.world * x.numel() * 4 / seconds / 1e9
    nvml = machine.nvml_info()
    links = (f"NVLink links on this node: {', '.join(f'{i}:{n}' for i, n in sorted(nvml.nvlink_links.items()))}"
             if nvml.nvlink_links else f"NVLink unknown ({nvml.error})" if nvml.error else "no active NVLink")
    forced = ", ".join(f"{k}={os.environ[k]}" for k in ("NCCL_P2P_DISABLE", "NCCL_P2P_LEVEL", "NCCL_IB_DISABLE")
                       if k in os.environ)
    return Check("nccl", PASS, f"NCCL {version}: all-reduce of {megabytes} MiB over {ranks.world} ranks at "
                               f"{bus:.1f} GB/s bus bandwidth; {links}" + (f"; {forced}" if forced else ""))
