"""The shape of what layerwise reads from files: a run's manifest, prompt records, token ids.

A file may be edited by hand, written by another engine or tampered with; what it holds is
checked before it is used, so a missing key, a wrong type (a string version, a list where an
object belongs, `true` as a token id: JSON booleans are not integers) or a path that leaves its
directory is one UserError naming the key, never a traceback or a silent conversion. Pure:
dicts in, the same dicts out (a manifest entry's `module` and `role` filled in from its name).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path, PurePosixPath

from .errors import UserError
from .names import split_name
from .planflags import QUANT_MODES

_HEX64 = re.compile(r"[0-9a-f]{64}")


def is_int(value) -> bool:
    """An integer, and not a boolean (`isinstance(True, int)` holds in Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A finite int or float, not a boolean."""
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def token_ids(value, where: str) -> list[int]:
    """A non-empty list of non-negative integer token ids (booleans and floats refused)."""
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: token_ids must be a non-empty list of non-negative integers")
    for i, t in enumerate(value):
        if not is_int(t) or t < 0:
            raise UserError(f"{where}: token id {i} is {t!r}, not a non-negative integer (JSON true/false "
                            "and fractions are not token ids)")
    return list(value)


def relative_path(text, where: str) -> str:
    """A relative path that stays inside its directory as written: no absolute path, no `..`
    part, no backslash or NUL. (paths.inside also follows symlinks on disk.)"""
    if not isinstance(text, str) or not text or "\\" in text or "\0" in text:
        raise UserError(f"{where}: {text!r} is not a relative file path")
    path = PurePosixPath(text)
    if path.is_absolute() or ".." in path.parts:
        raise UserError(f"{where}: {text!r} points outside its directory; refusing to read it")
    return text


# ---------------------------------------------------------------------------------- manifests

# The sections every layerwise writer has written since format version 1 (docs/FORMAT.md); a
# manifest without one was edited. "anatomy" is required of the producers that write it: an
# imported run has none (its readers take transformers' spelling of the parts).
REQUIRED = {"model": (dict, "'model' (what the run is of)"), "settings": (dict, "'settings' (how it was computed)"),
            "prompts": (list, "'prompts' (what was computed)"), "tensors": (list, "tensors list")}
ANATOMY_WRITERS = ("layerwise extract", "layerwise test", "layerwise vllm_hook")
_ANATOMY = ("layers_path", "embed", "norm", "head")


def _manifest_error(where: str, problem: str) -> UserError:
    return UserError(f"{where}: {problem}: the run was edited or is corrupt (re-extract or re-import it), or its "
                     "producer does not write docs/FORMAT.md")


def _optional(data: dict, key: str, kind: type, where: str) -> None:
    if data.get(key) is not None and not isinstance(data[key], kind):
        raise _manifest_error(where, f"{key} is a {type(data[key]).__name__}, not a {kind.__name__}")


def check_manifest(manifest, where: str, newest_version: int, digests: tuple[str, ...],
                   dtypes: frozenset[str], compute_dtypes: frozenset[str]) -> dict:
    """Check a parsed manifest.json (docs/FORMAT.md) and return it; `where` names the file,
    `digests` the entries' digest fields (tensorfile.DIGESTS), each 64 hex digits or null,
    `dtypes` the torch dtype names a run's tensor files hold, `compute_dtypes` the names
    settings.dtype may take (tolerances know them)."""
    if not isinstance(manifest, dict):
        raise _manifest_error(where, f"the manifest is a JSON {type(manifest).__name__}, not an object")
    version = manifest.get("format_version")
    if not is_int(version) or version < 1:
        raise _manifest_error(where, f"format_version is {version!r}, not a version number")
    if version > newest_version:
        raise UserError(f"{where} has format version {version}; this layerwise reads up to {newest_version}: "
                        "upgrade layerwise")
    _check_sections(manifest, where)
    _check_model(manifest["model"], where)
    _check_settings(manifest["settings"], where, compute_dtypes)
    indices: set[int] = set()
    for i, prompt in enumerate(manifest["prompts"]):
        _check_prompt(prompt, f"{where} prompts[{i}]")
        if prompt["index"] in indices:
            raise _manifest_error(where, f"prompt {prompt['index']} is listed twice")
        indices.add(prompt["index"])
    seen: set = set()
    for i, entry in enumerate(manifest["tensors"]):
        key = _check_entry(entry, f"{where} tensors[{i}]", digests, dtypes)
        if key in seen:
            raise _manifest_error(where, f"tensor {key[0]} of prompt {key[1]} is listed twice")
        if key[1] not in indices:
            raise _manifest_error(where, f"tensor {key[0]!r} is of prompt {key[1]}, which the run's prompts "
                                         f"({len(indices)} listed) do not hold")
        seen.add(key)
    return manifest


def _check_sections(manifest: dict, where: str) -> None:
    """The required sections present and of their type; the optional ones of theirs where present."""
    for key, (kind, what) in REQUIRED.items():
        if manifest.get(key) is None:
            raise _manifest_error(where, f"it has no {what}")
        _optional(manifest, key, kind, where)
    for key in ("anatomy", "reference"):
        _optional(manifest, key, dict, where)
    anatomy = manifest.get("anatomy")
    if anatomy is None and manifest.get("producer") in ANATOMY_WRITERS:
        raise _manifest_error(where, f"it has no 'anatomy', which {manifest['producer']} always writes")
    for key in _ANATOMY:
        if (anatomy or {}).get(key) is not None and not isinstance(anatomy[key], str):
            raise _manifest_error(where, f"anatomy.{key} is {anatomy[key]!r}, not a module path")


def _check_model(model: dict, where: str) -> None:
    for key in ("model_type", "architecture"):
        if model.get(key) is not None and not isinstance(model[key], str):
            raise _manifest_error(where, f"model.{key} is {model[key]!r}, not a string")
    for key in ("num_layers", "hidden_size"):
        if model.get(key) is not None and not (is_int(model[key]) and model[key] >= 1):
            raise _manifest_error(where, f"model.{key} is {model[key]!r}, not a whole number >= 1")


def _check_settings(settings: dict, where: str, compute_dtypes: frozenset[str]) -> None:
    dtype = settings.get("dtype")
    if dtype is not None and not (isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in compute_dtypes):
        raise _manifest_error(where, f"settings.dtype is {dtype!r}, not a dtype name (float32, bfloat16, float16, ...)")
    for key, ok, what in (
            ("batch_size", lambda v: is_int(v) and v >= 1, "a whole number >= 1"),
            ("points", lambda v: isinstance(v, list) and all(isinstance(p, str) for p in v), "a list of names"),
            ("layers", lambda v: isinstance(v, list) and all(is_int(x) and x >= 0 for x in v), "a list of layers"),
            ("attn_implementation", lambda v: isinstance(v, str) and v != "", "an attention implementation's name"),
            ("quant", lambda v: v in QUANT_MODES, " or ".join(QUANT_MODES))):
        if settings.get(key) is not None and not ok(settings[key]):
            raise _manifest_error(where, f"settings.{key} is {settings[key]!r}, not {what}")


def _check_prompt(prompt, where: str) -> None:
    if not isinstance(prompt, dict):
        raise _manifest_error(where, f"a prompt is a {type(prompt).__name__}, not an object")
    if not is_int(prompt.get("index")) or prompt["index"] < 0:
        raise _manifest_error(where, f"index is {prompt.get('index')!r}, not a prompt index")
    if prompt.get("token_ids") is not None:
        token_ids(prompt["token_ids"], where)
    if prompt.get("text") is not None and not isinstance(prompt["text"], str):
        raise _manifest_error(where, "text is not a string")


def _check_entry(entry, where: str, digests: tuple[str, ...], dtypes: frozenset[str]) -> tuple[str, int]:
    if not isinstance(entry, dict):
        raise _manifest_error(where, f"an entry is a {type(entry).__name__}, not an object")
    for key in ("name", "prompt", "shape", "dtype", "file"):
        if key not in entry:
            raise _manifest_error(where, f"the entry has no {key!r}")
    name = entry["name"]
    if not isinstance(name, str) or ":" not in name:
        raise _manifest_error(where, f"name {name!r} is not <module path>:<role>")
    if not is_int(entry["prompt"]) or entry["prompt"] < 0:
        raise _manifest_error(where, f"prompt is {entry['prompt']!r}, not a prompt index")
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(is_int(n) and n >= 0 for n in shape):
        raise _manifest_error(where, f"shape {shape!r} is not a list of sizes")
    if not isinstance(entry["dtype"], str) or entry["dtype"] not in dtypes:
        raise _manifest_error(where, f"tensor {name!r} has dtype {entry['dtype']!r}, not a torch dtype name that "
                                     "a run's files hold (float32, bfloat16, int32, ...)")
    for field in digests:
        digest = entry.get(field)
        if digest is not None and not (isinstance(digest, str) and _HEX64.fullmatch(digest)):
            raise _manifest_error(where, f"{field} {digest!r} is not a hex digest")
    relative_path(entry["file"], where)
    module, role = split_name(name)
    for key, value in (("module", module), ("role", role)):
        if entry.setdefault(key, value) != value:
            raise _manifest_error(where, f"{key} {entry[key]!r} does not match the name {name!r}")
    return name, entry["prompt"]


def read_table_file(path: str | Path, what: str):
    """A user's settings file (`what`: "tolerance file", "name map"): .toml (Python 3.11+) or
    else JSON, read as UTF-8; what it holds is the caller's to check. Each failure is one line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot read {what} {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text: save it as UTF-8") from None
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:
            raise UserError(f"{path}: a TOML {what} needs Python 3.11 or newer; write the same keys as JSON "
                            "(a .json file) instead") from None
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise UserError(f"{path} is not valid TOML: {err}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err.msg}, line {err.lineno}); a {what} is .json or "
                        ".toml") from None
