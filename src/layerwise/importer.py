"""`layerwise import`: tensors produced elsewhere (another engine, a custom port) into a run.

SRC is either
- one sub-directory per prompt (`0/`, `1/`, ...), each with one `.npy` or `.pt` file per tensor
  named `<module path>.<role>.npy` and the prompt's token ids in `tokens.npy` (or `tokens.pt`), or
- one `.safetensors` file per prompt (`0.safetensors`, ...) whose keys are `<module path>:<role>`
  plus `tokens`.
`--rename REGEX=REPLACEMENT` rewrites foreign tensor names (applied in order to the full
`<module path>:<role>` name). Shapes `[seq, ...]` and `[1, seq, ...]` are both accepted; the
sequence length must match the prompt's tokens. `.pt` files are read with `weights_only=True`
(no code from the file is run).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .paths import listed_inside
from .schema import token_ids
from .names import ROLES, WHOLE_ROLES, file_group, tensor_name
from .recording import Recording
from .runs import Intent, library_versions

def parse_renames(rules: list[str] | None) -> list[tuple[re.Pattern, str]]:
    out = []
    for rule in rules or []:
        if "=" not in rule:
            raise UserError(f"--rename {rule!r} must read REGEX=REPLACEMENT")
        pattern, replacement = rule.split("=", 1)
        try:
            out.append((re.compile(pattern), replacement))
        except re.error as err:
            raise UserError(f"--rename {rule!r}: bad regular expression ({err})") from None
    return out


def _rename(name: str, renames) -> str:
    for pattern, replacement in renames:
        name = pattern.sub(replacement, name)
    return name


_NPY_MAGIC = b"\x93NUMPY"


def _load_array(path: Path) -> torch.Tensor:
    """A .npy or .pt file holding one tensor; anything else is one line naming the file."""
    if path.suffix == ".npy":
        with open(path, "rb") as fh:
            if fh.read(len(_NPY_MAGIC)) != _NPY_MAGIC:
                raise UserError(f"{path} is not a .npy file (it does not start with numpy's header): "
                                "save it with numpy.save")
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as err:
            if "pickle" in str(err):
                raise UserError(f"{path} holds Python objects, not numbers; layerwise loads tensors only: "
                                "save a numeric array") from None
            raise UserError(f"cannot read {path}: {_first(err)}") from None
        if array.dtype.kind not in "biuf":
            raise UserError(f"{path} holds {array.dtype} data, not numbers: save a numeric array")
        return torch.from_numpy(array)
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if _global(err):  # a pickle that names a callable: code, refused unrun
            raise UserError(f"{path} holds code (a pickle that calls {_global(err)}); layerwise loads tensors only "
                            "and ran none of it: save plain tensors (torch.save(tensor)) or .npy") from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(err))
        raise UserError(f"{path} is not a torch tensor file ({detail.group(1) if detail else _first(err)}): "
                        "save it with torch.save(tensor)") from None
    except Exception as err:  # torch raises many types for a file that is not its format
        raise UserError(f"{path} is not a torch tensor file ({_first(err)}): save it with torch.save(tensor)") from None
    if not isinstance(value, torch.Tensor):
        raise UserError(f"{path} holds a {type(value).__name__}, not a tensor")
    return value


def _first(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _global(err: BaseException) -> str | None:
    """The callable a refused pickle names ("GLOBAL posix.system was not an allowed global"), if any."""
    match = re.search(r"GLOBAL ([\w.]+)", str(err))
    return match.group(1) if match else None


def _token_ids(value: torch.Tensor, where: str) -> list[int]:
    """A prompt's token ids: a 1-D (or [1, seq]) tensor of non-negative integers."""
    if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
        raise UserError(f"{where} holds {str(value.dtype).removeprefix('torch.')} values, not integer token ids")
    if value.dim() > 2 or (value.dim() == 2 and value.shape[0] != 1):
        raise UserError(f"{where} has shape {list(value.shape)}: token ids are [seq] or [1, seq]")
    return token_ids(value.reshape(-1).tolist(), where)


def _prompt_sources(src: Path) -> list[tuple[int, dict[str, torch.Tensor] | dict[str, Path]]]:
    """[(prompt index, {raw name: tensor or file})], tokens under the name "tokens"."""
    where = f"import source {src}"
    dirs = sorted((listed_inside(src, p, where) for p in src.iterdir() if p.is_dir() and p.name.isdigit()),
                  key=lambda p: int(p.name))
    files = sorted((listed_inside(src, p, where) for p in src.glob("*.safetensors") if p.stem.isdigit()),
                   key=lambda p: int(p.stem))
    if dirs and files:
        raise UserError(f"{src} mixes per-prompt directories and .safetensors files: use one layout")
    out: list = []
    if dirs:
        for d in dirs:
            entries = {}
            for f in sorted(d.iterdir()):
                if f.suffix not in (".npy", ".pt"):
                    continue
                listed_inside(src, f, where)
                stem = f.name[: -len(f.suffix)]
                module, _, role = stem.rpartition(".")
                if stem != "tokens" and (role not in ROLES or not module):
                    raise UserError(f"{f} is not named <module path>.<role>{f.suffix} with a role in "
                                    f"{', '.join(ROLES)}")
                key = "tokens" if stem == "tokens" else tensor_name(module, role)
                if key in entries:
                    raise UserError(f"{d} holds {key} twice ({entries[key].name} and {f.name}): keep one")
                entries[key] = f
            out.append((int(d.name), entries))
    elif files:
        from safetensors import safe_open

        for f in files:
            try:
                with safe_open(str(f), framework="pt") as fh:
                    out.append((int(f.stem), {k: fh.get_tensor(k) for k in fh.keys()}))
            except Exception as err:  # safetensors raises its own error type for a file not in its format
                raise UserError(f"{f} is not a safetensors file ({_first(err)})") from None
    else:
        raise UserError(f"{src} holds neither per-prompt directories (0/, 1/, ...) nor 0.safetensors, 1.safetensors, ...")
    indices = [i for i, _ in out]
    if indices != list(range(len(indices))):
        raise UserError(f"{src}: prompts must be numbered 0, 1, 2, ... without gaps (found {indices[:5]}...)")
    return out


def import_run(src: str, out: str, renames: list[str] | None = None, overwrite: bool = False,
               model: str | None = None) -> dict:
    """Write a run from foreign tensors; returns its manifest."""
    source = Path(src)
    if not source.is_dir():
        raise UserError(f"import source {src} is not a directory")
    rules = parse_renames(renames)
    prompts_data = _prompt_sources(source)
    prompts = []
    for index, entries in prompts_data:
        if "tokens" not in entries:
            raise UserError(f"prompt {index} in {src} has no tokens (tokens.npy or a 'tokens' key)")
        tokens = entries["tokens"]
        tokens = _load_array(tokens) if isinstance(tokens, Path) else tokens
        prompts.append({"index": index, "text": None, "token_ids": _token_ids(tokens, f"prompt {index}'s tokens")})
    intent = Intent(producer="layerwise import",
                    model={"spec": model or f"imported:{source.resolve()}", "model_type": None},
                    settings={"source": str(source.resolve()), "renames": list(renames or [])}, prompts=prompts)
    with Recording(out, intent, None, overwrite) as run:
        for (index, entries), prompt in zip(prompts_data, prompts):
            for group, tensors in _groups(entries, rules, index, len(prompt["token_ids"])).items():
                run.writer.put(index, group, tensors)
        return run.finish({"versions": library_versions()})


def _groups(entries: dict, rules, index: int, seq: int) -> dict[str, dict[str, torch.Tensor]]:
    """One prompt's foreign tensors, renamed, checked and grouped into run files."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for raw, value in entries.items():
        if raw == "tokens":
            continue
        name = _rename(raw, rules)
        module, sep, role = name.rpartition(":")
        if not sep or role not in ROLES:
            raise UserError(f"tensor {raw!r} (renamed {name!r}) is not <module path>:<role> with a role in "
                            f"{', '.join(ROLES)}")
        tensor = _load_array(value) if isinstance(value, Path) else value
        if tensor.dim() >= 2 and tensor.shape[0] == 1 and tensor.shape[1] == seq:
            tensor = tensor[0]
        if role not in WHOLE_ROLES and (tensor.dim() == 0 or tensor.shape[0] != seq):
            raise UserError(f"tensor {raw} of prompt {index} has shape {list(tensor.shape)}; expected "
                            f"[{seq}, ...] or [1, {seq}, ...] for its {seq} tokens")
        group = groups.setdefault(file_group(module), {})
        if name in group:
            raise UserError(f"prompt {index}: two tensors become {name} (--rename maps them together): "
                            "rename them apart")
        group[name] = tensor.contiguous()
    return groups
