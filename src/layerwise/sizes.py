"""Byte sizes as people write them ("40GB", "1.5GiB", "0:60GB,1:40GB", "8x80GB").

Decimal units (KB, MB, GB, TB) are powers of 1000 and binary units (KiB, MiB, GiB, TiB) are
powers of 1024, as in accelerate. This module knows nothing about devices that exist: checking
that GPU 3 is really there is the caller's job.
"""

from __future__ import annotations

import re

from .errors import UserError

_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*$")


class NoGpu(UserError):
    """A GPU limit with no GPU to apply it to (`plan` adds: or simulate some with --gpus)."""


def parse_size(text: str, what: str = "size") -> int:
    """"40GB" -> 40_000_000_000. Zero, negative or unit-less sizes are refused."""
    match = _SIZE.match(text)
    if not match:
        raise UserError(f"{what} {text!r} is not a size: write a number and a unit, e.g. 40GB or 37.5GiB")
    number, unit = float(match.group(1)), match.group(2).lower()
    if unit not in _UNITS:
        raise UserError(
            f"{what} {text!r} has unknown unit {match.group(2)!r}: use one of B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
        )
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise UserError(f"{what} {text!r} must be larger than zero")
    return size


def format_bytes(num_bytes: float) -> str:
    """Decimal units, the ones GPU vendors print on the box: 58.32 GB; small sizes in MB/KB."""
    if num_bytes >= 1e9 or num_bytes == 0:
        return f"{num_bytes / 1e9:.2f} GB"
    if num_bytes >= 1e6:
        return f"{num_bytes / 1e6:.1f} MB"
    if num_bytes >= 1e3:
        return f"{num_bytes / 1e3:.1f} KB"
    return f"{num_bytes:.0f} B"


def _device_key(text: str, what: str) -> int | str:
    key = text.strip().lower()
    if key in ("cpu", "disk"):
        return key
    if key.startswith("cuda:"):
        key = key[5:]
    if key.isdigit():
        return int(key)
    raise UserError(f"{what}: device {text!r} is not a GPU index (0, 1, ...), 'cpu' or 'disk'")


def parse_max_memory(text: str, gpu_count: int) -> dict[int | str, int]:
    """Parse --max-memory.

    "40GB" limits every one of the `gpu_count` GPUs; "0:60GB,1:40GB,cpu:200GB" limits the
    devices named (GPUs not named are not used). A GPU index >= gpu_count is refused.
    """
    text = text.strip()
    if not text:
        raise UserError("--max-memory is empty: write e.g. 40GB or 0:60GB,1:40GB,cpu:200GB")
    if ":" not in text:
        size = parse_size(text, "--max-memory")
        if gpu_count == 0:
            raise NoGpu(f"--max-memory {text!r} limits every GPU, but no GPU is present: name devices instead "
                        "(e.g. cpu:200GB)")
        return {index: size for index in range(gpu_count)}
    limits: dict[int | str, int] = {}
    for part in text.split(","):
        if ":" not in part.replace("cuda:", "", 1):
            raise UserError(f"--max-memory part {part!r} must read DEVICE:SIZE, e.g. 0:60GB or cpu:200GB")
        device_text, size_text = part.rsplit(":", 1)
        device = _device_key(device_text, "--max-memory")
        if isinstance(device, int) and device >= gpu_count:
            if not gpu_count:
                raise NoGpu(f"--max-memory names GPU {device} but no GPU is present: drop it")
            raise UserError(f"--max-memory names GPU {device} but only {gpu_count} GPU(s) are present "
                            f"(indices 0-{gpu_count - 1})")
        if device in limits:
            raise UserError(f"--max-memory names device {device_text.strip()!r} twice")
        limits[device] = parse_size(size_text, f"--max-memory for {device_text.strip()}")
    return limits


MAX_GPUS = 1024  # a simulated machine's GPUs (transformers' placement walks every one: 10^5 took minutes)


def parse_gpus(text: str) -> list[int]:
    """Parse --gpus, a simulated machine: "8x80GB" or "0:80GB,1:141GB" -> bytes per GPU."""
    text = text.strip()
    match = re.match(r"^(\d+)\s*[xX]\s*(.+)$", text)
    if match:
        count = int(match.group(1))
        if count < 1 or count > MAX_GPUS:
            raise UserError(f"--gpus {text!r} asks for {count} GPUs: give 1 to {MAX_GPUS}, e.g. 8x80GB")
        return [parse_size(match.group(2), "--gpus")] * count
    if ":" in text:
        sizes: dict[int, int] = {}
        for part in text.split(","):
            index_text, _, size_text = part.partition(":")
            if not index_text.strip().isdigit():
                raise UserError(f"--gpus part {part!r} must read INDEX:SIZE, e.g. 0:80GB")
            if int(index_text) in sizes:
                raise UserError(f"--gpus {text!r} names GPU {int(index_text)} twice: give each GPU once")
            sizes[int(index_text)] = parse_size(size_text, "--gpus")
        if len(sizes) > MAX_GPUS:
            raise UserError(f"--gpus {text!r} names {len(sizes)} GPUs: give 1 to {MAX_GPUS}")
        if sorted(sizes) != list(range(len(sizes))):
            raise UserError(f"--gpus {text!r} must number GPUs 0, 1, 2, ... without gaps")
        return [sizes[i] for i in range(len(sizes))]
    raise UserError(f"--gpus {text!r} is not a machine: write COUNTxSIZE (8x80GB) or 0:80GB,1:141GB")
