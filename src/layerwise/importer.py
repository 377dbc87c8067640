"""`layerwise import`: tensors produced elsewhere (another engine, a custom port) into a run.

SRC is one of these layouts (`--from` names it; without it, it is detected when unmistakable;
docs/FORMAT.md "Importing" has each with a worked example):
- `dirs`: one sub-directory per prompt (`0/`, `1/`, ...), each with one `.npy` or `.pt` file per
  tensor named `<module path>.<role>.npy` and the prompt's token ids in `tokens.npy` (or `.pt`);
- `safetensors`: one file per prompt (`0.safetensors`, ...), keys `<module path>:<role>` + `tokens`;
- `sglang`: SGLang's dumper output (engines/sglang.py);
- `vllm`: vLLM's `extract_hidden_states` files, one per request (engines/vllm.py).
Foreign names go through the name map (`--map FILE`, engines/namemap.py; SGLang has a built-in
one), then the `--rename` rules, in order, then must read `<module path>:<role>`. Shapes
`[seq, ...]` and `[1, seq, ...]` are both accepted; the sequence length must match the prompt's
tokens. `.pt` files are read with `weights_only=True` (no code from the file is run). The run
records the source, the map, the renames and the imported activations' dtype.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch

from .engines import namemap, sglang, vllm
from .engines.namemap import NameMap, combine_into, load_map
from .engines.source import ImportSource
from .errors import UserError
from .models import check_spec
from .engines.files import first_line, load_array
from .names import INPUT, OUTPUT, ROLES, WHOLE_ROLES, file_group, split_name, tensor_name
from .paths import listed_inside, within
from .schema import token_ids
from .recording import Recording
from .runs import Intent, library_versions

FORMATS = ("dirs", "safetensors", "sglang", "vllm")
DECODES = ("skip", "include")  # SGLang's decode steps after the prefill: the first is the default
_SED = re.compile(r"^s([^\w\s\\])")


def parse_renames(rules: list[str] | None) -> list[tuple[re.Pattern, str]]:
    """`s|REGEX|REPLACEMENT|` (any punctuation as the separator, chosen so that neither side holds
    it: the sides may then hold any other character, `=` included) or `REGEX=REPLACEMENT`."""
    out = []
    for rule in rules or []:
        sed = _SED.match(rule)
        if sed and rule.count(sed.group(1)) == 3 and rule.endswith(sed.group(1)):
            pattern, replacement = rule[2:-1].split(sed.group(1))
        elif "=" in rule:
            pattern, replacement = rule.split("=", 1)
        else:
            raise UserError(f"--rename {rule!r} must read s|REGEX|REPLACEMENT| (any punctuation neither side holds "
                            "as the separator, three times) or REGEX=REPLACEMENT")
        try:
            out.append((re.compile(pattern), replacement))
        except re.error as err:
            raise UserError(f"--rename {rule!r}: bad regular expression ({err})") from None
    return out


def renamer(rules: list[tuple[re.Pattern, str]]):
    def rename(name: str) -> str:
        for pattern, replacement in rules:
            name = pattern.sub(replacement, name)
        return name
    return rename


# ------------------------------------------------------------------------------- detection

def detect_format(src: Path) -> str:
    dirs = [p for p in src.iterdir() if p.is_dir() and p.name.isdigit()]
    if vllm.looks_like_vllm(src):
        return "vllm"
    if dirs:
        return "dirs"
    if any(p.stem.isdigit() for p in src.glob("*.safetensors")):
        return "safetensors"
    if sglang.looks_like_sglang(src):
        return "sglang"
    raise UserError(f"{src} holds neither per-prompt directories (0/, 1/, ...), 0.safetensors, 1.safetensors, ..., "
                    "an SGLang dump (step=0___rank=0___...___name=NAME.pt) nor vLLM hidden-states files: see "
                    "docs/FORMAT.md (Importing), or name the layout with --from")


# ----------------------------------------------------------------------- the local layouts

def _raw_name(stem: str) -> str:
    """`model.layers.3.output` -> `model.layers.3:output`; another stem stays as it is (a map or
    --rename rule may still make it a name)."""
    module, _, role = stem.rpartition(".")
    return tensor_name(module, role) if module and role in ROLES else stem


def _local_source(src: Path, fmt: str, name_map: NameMap, rename) -> ImportSource:
    """`dirs` and `safetensors`: {prompt: {raw name: file or tensor}}, one unit per prompt."""
    where = f"import source {src}"
    entries: list[tuple[int, dict]] = []
    if fmt == "dirs":
        for d in sorted((listed_inside(src, p, where) for p in src.iterdir() if p.is_dir() and p.name.isdigit()),
                        key=lambda p: int(p.name)):
            found: dict = {}
            for f in sorted(d.iterdir()):
                if f.suffix not in (".npy", ".pt"):
                    continue
                stem = f.name[: -len(f.suffix)]
                key = "tokens" if stem == "tokens" else _raw_name(stem)
                if key in found:
                    raise UserError(f"{d} holds {key} twice ({found[key].name} and {f.name}): keep one")
                found[key] = listed_inside(src, f, where)
            entries.append((int(d.name), found))
    else:
        if any(p.is_dir() and p.name.isdigit() for p in src.iterdir()):
            files = any(p.suffix == ".safetensors" for p in src.iterdir())
            raise UserError(f"{src} mixes per-prompt directories and .safetensors files: use one layout" if files else
                            f"{src} holds per-prompt directories, the dirs layout, not 0.safetensors, ...: "
                            "use --from dirs")
        from safetensors import safe_open

        for f in sorted((listed_inside(src, p, where) for p in src.glob("*.safetensors") if p.stem.isdigit()),
                        key=lambda p: int(p.stem)):
            try:
                with safe_open(str(f), framework="pt") as fh:
                    entries.append((int(f.stem), {k: fh.get_tensor(k) for k in fh.keys()}))
            except Exception as err:  # safetensors raises its own error type for a file not in its format
                raise UserError(f"{f} is not a safetensors file ({first_line(err)})") from None
    if not entries:
        raise UserError(f"{src} holds no {'per-prompt directories' if fmt == 'dirs' else '0.safetensors, ...'}")
    indices = [i for i, _ in entries]
    if indices != list(range(len(indices))):
        raise UserError(f"{src}: prompts must be numbered 0, 1, 2, ... without gaps (found {indices[:5]}...)")
    prompts = []
    for index, found in entries:
        if "tokens" not in found:
            raise UserError(f"prompt {index} in {src} has no tokens (tokens.npy or a 'tokens' key)")
        tokens = found["tokens"]
        tokens = load_array(tokens) if isinstance(tokens, Path) else tokens
        prompts.append({"index": index, "text": None, "token_ids": _token_ids(tokens, f"prompt {index}'s tokens")})

    def units():
        for index, found in entries:
            tensors: dict[str, torch.Tensor] = {}
            for raw, value in found.items():
                if raw == "tokens":
                    continue
                hit = name_map.lookup(raw)
                name, rule = hit if hit else (raw, None)
                tensor = load_array(value) if isinstance(value, Path) else value
                combine_into(tensors, rename(name), tensor, rule, f"prompt {index} in {src}")
            yield {index: tensors}

    return ImportSource(fmt, prompts, units)


def _token_ids(value: torch.Tensor, where: str) -> list[int]:
    """A prompt's token ids: a 1-D (or [1, seq]) tensor of non-negative integers."""
    if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
        raise UserError(f"{where} holds {str(value.dtype).removeprefix('torch.')} values, not integer token ids")
    if value.dim() > 2 or (value.dim() == 2 and value.shape[0] != 1):
        raise UserError(f"{where} has shape {list(value.shape)}: token ids are [seq] or [1, seq]")
    return token_ids(value.reshape(-1).tolist(), where)


def open_source(src: Path, fmt: str | None, map_file: str | None, rename, decode: str | None,
                layer_ids: str | None) -> ImportSource:
    load_map(map_file)  # a bad map file is refused before anything is read
    fmt = fmt or detect_format(src)
    if fmt not in FORMATS:
        raise UserError(f"--from {fmt!r}: choose from {', '.join(FORMATS)}")
    if layer_ids is not None and fmt != "vllm":  # a flag of another layout would change nothing
        raise UserError(f"--layers names the layers vLLM hidden-states files hold, and {src} is {fmt}: drop --layers")
    if decode is not None and fmt != "sglang":
        raise UserError(f"--decode is for SGLang dumps' decode steps, and {src} is {fmt}: drop --decode")
    if fmt == "sglang":
        return sglang.read_dump(src, import_map(map_file, fmt), rename, decode or DECODES[0])
    if fmt == "vllm":
        return vllm.read_hidden_states(src, layer_ids, import_map(map_file, fmt), rename)
    return _local_source(src, fmt, import_map(map_file, fmt), rename)


def import_map(map_file: str | None, fmt: str | None = None) -> NameMap:
    """The name map in force for a layout: `map_file` over SGLang's built-in rules for SGLang
    dumps (and when the layout is not named), over none for the others."""
    return load_map(map_file, namemap.sglang_default() if fmt in (None, "sglang") else None)


# ---------------------------------------------------------------------------------- writing

def _checked(name: str, tensor: torch.Tensor, seq: int, prompt: int) -> torch.Tensor:
    module, sep, role = name.rpartition(":")
    if not sep or not module or role not in ROLES:
        raise UserError(f"tensor {name!r} is not named <module path>:<role> with a role in {', '.join(ROLES)}: "
                        "a --map or --rename rule can rename it (files of the dirs layout are named "
                        "<module path>.<role>.npy)")
    if tensor.dim() >= 2 and tensor.shape[0] == 1 and tensor.shape[1] == seq:
        tensor = tensor[0]
    if role not in WHOLE_ROLES and (tensor.dim() == 0 or tensor.shape[0] != seq):
        raise UserError(f"tensor {name} of prompt {prompt} has shape {list(tensor.shape)}; expected "
                        f"[{seq}, ...] or [1, {seq}, ...] for its {seq} tokens")
    return tensor.contiguous()


def import_run(src: str, out: str, renames: list[str] | None = None, overwrite: bool = False,
               model: str | None = None, *, source_format: str | None = None, map_file: str | None = None,
               decode: str | None = None, layer_ids: str | None = None) -> dict:
    """Write a run from foreign tensors; returns its manifest (its "notes" say what was skipped).
    `decode` (SGLang; default DECODES[0]) and `layer_ids` (vLLM) are refused for other layouts;
    `model`, the spec recorded, may name a checkpoint elsewhere, but not a built-in that is none."""
    source_dir = Path(src)
    if not source_dir.is_dir():
        raise UserError(f"import source {src} is not a directory")
    if within(source_dir, (Path(out),)):
        raise UserError(f"import source {src} lies in --out {out}: the run written there would replace or change "
                        "the source; give --out a directory apart from it")
    if within(Path(out), (source_dir,)):
        raise UserError(f"--out {out} lies in the import source {src}: the run would be written among the tensors "
                        "it is made from; give --out a directory apart from it")
    if decode is not None and decode not in DECODES:
        raise UserError(f"--decode {decode!r}: choose {' or '.join(DECODES)}")
    if model is not None:
        check_spec(model, "--model")
    source = open_source(source_dir, source_format, map_file, renamer(parse_renames(renames)), decode, layer_ids)
    settings = {"source": str(source_dir.resolve()), "format": source.format, "renames": list(renames or []),
                "map": str(Path(map_file).resolve()) if map_file else None, **source.settings}
    intent = Intent(producer="layerwise import",
                    model={"spec": model or f"imported:{source_dir.resolve()}", "model_type": None},
                    settings=settings, prompts=source.prompts)
    with Recording(out, intent, None, overwrite) as run:
        files, dtypes = _write_units(source, run.writer)
        if not files:
            raise UserError(f"nothing to import from {src}: no tensor maps to a layerwise name "
                            f"({'; '.join(source.notes) or 'see --show-map'})")
        dtype = dtypes.most_common(1)[0][0] if dtypes else None
        return run.finish({"versions": library_versions(), "settings": {**settings, "dtype": dtype},
                           "notes": list(source.notes)})


def _write_units(source: ImportSource, writer) -> tuple[int, Counter]:
    """Every unit's tensors checked and written, one file per (prompt, group); returns how many
    files, and how many activations (inputs and outputs) of each dtype, were written."""
    seqs = {p["index"]: len(p["token_ids"]) for p in source.prompts}
    written: set[tuple[int, str]] = set()
    dtypes: Counter = Counter()
    for unit in source.units():
        for prompt, tensors in unit.items():
            groups: dict[str, dict[str, torch.Tensor]] = {}
            for name, tensor in tensors.items():
                module, role = split_name(name)
                groups.setdefault(file_group(module), {})[name] = _checked(name, tensor, seqs[prompt], prompt)
                if tensor.is_floating_point() and role in (INPUT, OUTPUT):
                    dtypes[str(tensor.dtype).removeprefix("torch.")] += 1
            for group, members in groups.items():
                if (prompt, group) in written:
                    raise UserError(f"the renames put tensors of other files into {group} (prompt {prompt}) "
                                    "after it was written: rename whole layers, not parts of them")
                written.add((prompt, group))
                writer.put(prompt, group, members)
    return len(written), dtypes
