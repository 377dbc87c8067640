"""Foreign tensor files read as numbers, never as code.

`.npy` files are read with numpy's header checked and pickles refused; `.pt` files with
`torch.load(weights_only=True)`, so a pickle that names a callable is refused before it runs.
Anything that is not one of these formats is one line that names the file and says how to save it.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

_NPY_MAGIC = b"\x93NUMPY"


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _called(err: BaseException) -> str | None:
    """The callable a refused pickle names ("GLOBAL posix.system was not an allowed global"), if any."""
    match = re.search(r"GLOBAL ([\w.]+)", str(err))
    return match.group(1) if match else None


def load_npy(path: Path) -> torch.Tensor:
    with open(path, "rb") as fh:
        if fh.read(len(_NPY_MAGIC)) != _NPY_MAGIC:
            raise UserError(f"{path} is not a .npy file (it does not start with numpy's header): save it with numpy.save")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as err:
        if "pickle" in str(err):
            raise UserError(f"{path} holds Python objects, not numbers; layerwise loads tensors only: "
                            "save a numeric array") from None
        raise UserError(f"cannot read {path}: {first_line(err)}") from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {first_line(err)}") from None
    if array.dtype.kind not in "biuf":
        raise UserError(f"{path} holds {array.dtype} data, not numbers: save a numeric array")
    return torch.from_numpy(array)


def load_torch(path: Path):
    """What a .pt file holds (tensors, dicts and lists of them, plain values), loaded with
    weights_only=True; a file that is not torch's format, or that would call code, is one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if _called(err):
            raise UserError(f"{path} holds code (a pickle that calls {_called(err)}); layerwise loads tensors only "
                            "and ran none of it: save plain tensors (torch.save(tensor)) or .npy") from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(err))
        raise UserError(f"{path} is not a torch tensor file ({detail.group(1) if detail else first_line(err)}): "
                        "save it with torch.save(tensor)") from None
    except Exception as err:  # torch raises many types for a file that is not its format
        raise UserError(f"{path} is not a torch tensor file ({first_line(err)}): save it with torch.save(tensor)") \
            from None


def load_array(path: Path) -> torch.Tensor:
    """One tensor from .npy or .pt (a bare tensor, or SGLang's {"value": tensor, "meta": ...})."""
    if path.suffix == ".npy":
        return load_npy(path)
    value = load_torch(path)
    if isinstance(value, dict) and "value" in value:
        value = value["value"]
    if not isinstance(value, torch.Tensor):
        raise UserError(f"{path} holds a {type(value).__name__}, not a tensor")
    return value
