"""Device maps: what `--device-map` says, and where a module path lands in a map.

A device map is transformers' own {module path: device}, devices being GPU indices, "cpu" or
"disk". `--device-map` is a strategy word (planned by placement.py), one device (`cuda:1`, `1`,
`cpu`) or a JSON file of such a map. Pure, except reading that file; knows no GPUs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import UserError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
DEFAULT_DEVICE_MAP = "auto"  # --device-map unless told
SPILL_DEVICES = ("cpu", "disk")


def read_device_map_file(path: str) -> dict:
    """A JSON file {module path: device}; devices are GPU indices, "cuda:N", "cpu" or "disk"."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"device-map file {path!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read device-map file {path!r}: {getattr(err, 'strerror', None) or err}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"device-map file {path!r} is not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"device-map file {path!r} must hold a non-empty JSON object {{module: device}}")
    return {str(k): normalize_device(v, f"device-map file {path!r}") for k, v in raw.items()}


def normalize_device(value, where: str) -> int | str:
    if isinstance(value, bool):  # JSON true is not GPU 1
        raise UserError(f"{where}: {value!r} is not a device (use a GPU index, cuda:N, cpu or disk)")
    if isinstance(value, int) and value >= 0:
        return value
    text = str(value).strip().lower()
    if text in SPILL_DEVICES:
        return text
    match = re.fullmatch(r"(?:cuda:)?(\d+)", text)
    if match:
        return int(match.group(1))
    raise UserError(f"{where}: {value!r} is not a device (use a GPU index, cuda:N, cpu or disk)")


def parse_device_map(text: str):
    """--device-map: a strategy word, cuda:N / N / cpu, or a JSON file. Returns str or dict."""
    text = text.strip()
    if text in STRATEGIES:
        return text
    if text.endswith(".json") or Path(text).is_file():
        return read_device_map_file(text)
    if text == "cpu" or re.fullmatch(r"(cuda:)?\d+", text):
        return {"": normalize_device(text, "--device-map")}
    raise UserError(f"unknown --device-map {text!r}: use auto, balanced, balanced_low_0, sequential, "
                    "cuda:N, cpu, or a JSON file mapping module names to devices")


def device_of(device_map: dict, name: str):
    """The device a module path lands on: its own entry or its closest mapped ancestor."""
    probe = name
    while True:
        if probe in device_map:
            return device_map[probe]
        if not probe:
            return None
        probe = probe.rpartition(".")[0]


def describe_map(device_map: dict) -> str:
    """A map in a word: its one device when it has one, else "custom"."""
    return device_name(device_map[""]) if set(device_map) == {""} else "custom"


def device_name(device) -> str:
    """A map's device as torch spells it: 0 -> "cuda:0", "cpu" -> "cpu"."""
    return f"cuda:{device}" if isinstance(device, int) else str(device)
