"""Facts about this machine: GPUs and their memory, peer links, driver, host RAM, disk, and
how this process's Python modules load (cached bytecode or compiled from source).

Read-only probes, each tolerant of what is absent (no GPU, no NVML): they return what they
can and say what they could not. `check` turns these facts into verdicts; this module judges
nothing.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass

import torch

# in _boot (it runs before torch is imported): Python's rule for a usable .pyc, and the RAM
# available (a probe of this module's too: machine.host_memory_available)
from ._boot import host_memory_available, pyc_valid  # noqa: F401
from .errors import UserError


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    capability: str  # "9.0"


@dataclass(frozen=True)
class GpuMemory:
    """Live memory of one GPU: what torch holds and what the card has."""

    index: int
    allocated_bytes: int
    reserved_bytes: int
    total_bytes: int
    free_bytes: int


def gpus() -> list[Gpu]:
    if not torch.cuda.is_available():
        return []
    found = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        found.append(Gpu(i, props.name, total, free, f"{props.major}.{props.minor}"))
    return found


def default_device() -> str:
    """Where one device's work runs unless told: cuda:0 when a GPU is present, else the CPU."""
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def usable_device(device: str | None, flag: str = "--device") -> str:
    """`device` (default: default_device()) if torch can put a tensor there, else a UserError
    naming `flag`."""
    device = device or default_device()
    try:
        where = torch.device(device)
        if where.type == "meta":  # shapes only: nothing can be read back from it
            raise UserError(f"{flag} meta holds no data (only shapes): give cpu or cuda:N")
        if where.type == "cuda" and torch.cuda.is_available() and (where.index or 0) >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise UserError(f"{flag} {device} is not usable here: this machine has {count} GPU"
                            f"{'s' if count > 1 else ''} (cuda:0-{count - 1}); give one of them or cpu")
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError) as err:
        raise UserError(f"{flag} {device} is not usable here ({str(err).splitlines()[0]})") from None
    return device


def gpu_memory() -> list[GpuMemory]:
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        out.append(GpuMemory(i, torch.cuda.memory_allocated(i), torch.cuda.memory_reserved(i), total, free))
    return out


def host_memory_total() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def existing_ancestor(path: str) -> str:
    """`path` made absolute, or its nearest parent that exists (what a directory made there lands on)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return probe


def disk_free(path: str) -> int:
    return shutil.disk_usage(existing_ancestor(path)).free


def peer_access() -> dict[tuple[int, int], bool]:
    """For each ordered GPU pair, whether CUDA peer-to-peer access is possible."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {(a, b): torch.cuda.can_device_access_peer(a, b) for a in range(n) for b in range(n) if a != b}


@dataclass(frozen=True)
class NvmlInfo:
    driver: str | None
    nvlink_links: dict[int, int]  # GPU index -> number of active NVLink links
    error: str | None = None


def nvml_info() -> NvmlInfo:
    """Driver version and active NVLink links per GPU, through NVML (the `nvml` extra)."""
    try:
        import pynvml
    except ImportError:
        return NvmlInfo(None, {}, "nvidia-ml-py is not installed (pip install 'layerwise[nvml]')")
    try:
        pynvml.nvmlInit()
    except Exception as err:  # NVML raises its own error types; any failure means "no NVML here"
        return NvmlInfo(None, {}, f"NVML unavailable: {err}")
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else driver
        links: dict[int, int] = {}
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            active = 0
            for link in range(getattr(pynvml, "NVML_NVLINK_MAX_LINKS", 18)):
                try:
                    if pynvml.nvmlDeviceGetNvLinkState(handle, link):
                        active += 1
                except Exception:  # link index past what this GPU has, or NVLink unsupported
                    break
            links[i] = active
        return NvmlInfo(driver, links)
    finally:
        pynvml.nvmlShutdown()


@dataclass(frozen=True)
class Bytecode:
    """How the modules this process imported load."""

    modules: int  # imported modules with a Python source file
    compiled: int  # of them, those without a usable cached bytecode file (.pyc): compiled from source
    compiled_bytes: int  # their sources' bytes
    writes: bool  # Python may write bytecode (PYTHONDONTWRITEBYTECODE not set)
    prefix: str | None  # sys.pycache_prefix (PYTHONPYCACHEPREFIX): where bytecode is looked for and written


def bytecode() -> Bytecode:
    """Which imported modules have a cached bytecode file that Python accepts (magic number, and
    the source's mtime and size or its hash). Looked at after the imports: bytecode Python could
    write is there by now, so what is still missing is compiled again by every new process."""
    modules = compiled = size = 0
    for module in list(sys.modules.values()):
        try:  # some entries are lazy objects whose attribute lookups import (and may fail)
            spec = getattr(module, "__spec__", None)
            origin, cached = getattr(spec, "origin", None), getattr(spec, "cached", None)
        except Exception:
            continue
        if not isinstance(origin, str) or not origin.endswith(".py") or not cached or not os.path.exists(origin):
            continue  # a source deleted since (a temporary copy) is compiled by no later process
        modules += 1
        if not pyc_valid(origin, cached):
            compiled += 1
            try:
                size += os.stat(origin).st_size
            except OSError:
                pass
    return Bytecode(modules, compiled, size, not sys.dont_write_bytecode, sys.pycache_prefix)
