"""A safetensors checkpoint directory, checked and read tensor by tensor without loading it.

`inspect_checkpoint` reads only the shard headers (a few KB each): which shards the index
lists, whether each exists, whether its size matches its header (a truncated download is
caught before any weight is read), and whether the index and the headers agree on every
tensor. `read_tensors` pulls selected tensors out of the shards, straight to a device, which
is how a single decoder layer is loaded without the rest of the model. The file format itself
is tensorfile.py's.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import tensorfile
from .errors import UserError
from .names import layer_parts
from .paths import hf_cache_root, inside
from .quant import FP8_DTYPE, SCALE_NAMES

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_SHARD = re.compile(r"(.+)-\d+-of-(\d+)\.safetensors")
_FLOAT_SCALES = {tensorfile.code(t) for t in (torch.float32, torch.bfloat16, torch.float16)}


@dataclass(frozen=True)
class CheckpointCheck:
    directory: Path
    shards: tuple[str, ...]  # file names, in index order
    tensor_count: int
    total_bytes: int  # sum of shard sizes
    problems: tuple[str, ...] = field(default_factory=tuple)  # each one line: what and where

    @property
    def ok(self) -> bool:
        return not self.problems


def weight_map(directory: Path) -> dict[str, str]:
    """{tensor name: shard file name} from the index, or from the single model.safetensors.
    Every shard must lie inside the checkpoint (paths.inside; a Hugging Face cache snapshot's
    links into its repository's blobs/ are inside)."""
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            wmap = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            wmap = None
        if not isinstance(wmap, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()):
            raise UserError(f"{index} is not a valid safetensors index (needs a weight_map of tensor name to shard "
                            "file): re-download it")
        for shard in set(wmap.values()):
            member(directory, shard, f"{index} weight_map")
        return wmap
    single = member(directory, SINGLE_NAME, f"checkpoint {directory}")
    if single.is_file():
        return {name: SINGLE_NAME for name in tensorfile.read_header(single)}
    raise UserError(f"{directory} holds no {INDEX_NAME} and no {SINGLE_NAME}: not a safetensors checkpoint")


def member(directory: Path, name: str, where: str) -> Path:
    """A file of the checkpoint, refused unless it resolves inside it (or, for a Hugging Face cache
    snapshot, inside its repository, where the snapshot's links point)."""
    return inside(directory, name, where, also=hf_cache_root(directory))


def inspect_checkpoint(directory: Path, scheme=None) -> CheckpointCheck:
    """Check every shard the index lists, reading headers only. Problems are collected, not raised,
    so `check` can print them all; `require_complete` turns them into a UserError. With an FP8
    `scheme` (quant.QuantScheme), every e4m3 weight must have its scale, of the block grid's shape."""
    directory = Path(directory)
    infos: dict[str, dict] = {}
    wmap = weight_map(directory)
    shards = tuple(dict.fromkeys(wmap.values()))
    problems: list[str] = []
    total = 0
    listed: dict[str, set[str]] = {}
    for name, shard in wmap.items():
        listed.setdefault(shard, set()).add(name)
    for shard in shards:
        path = member(directory, shard, f"{directory / INDEX_NAME} weight_map")
        if not path.is_file():
            problems.append(f"shard {shard} is listed in the index but missing from {directory}")
            continue
        total += path.stat().st_size
        try:
            header = tensorfile.read_header(path)
        except UserError as err:
            problems.append(str(err))
            continue
        missing = sorted(listed[shard] - set(header))
        if missing:
            problems.append(f"shard {shard} lacks {len(missing)} tensor(s) the index puts there (first: {missing[0]})")
        infos.update(header)
    unlisted = _unlisted_shards(directory, set(listed))
    if unlisted:
        problems.append(f"shard {unlisted[0]} is in {directory} but the index lists none of its tensors "
                        f"({len(unlisted)} such shard(s)): re-download the index")
    if scheme is not None:
        problems += fp8_scale_problems(infos, scheme)
    return CheckpointCheck(directory, shards, len(wmap), total, tuple(problems))


def fp8_scale_problems(infos: dict[str, dict], scheme) -> list[str]:
    """Each e4m3 weight's scale: present, float, and [ceil(rows/b0), ceil(cols/b1)] (one value
    per tensor without blocks). One line per problem, naming the tensor."""
    problems = []
    for name, info in infos.items():
        if info.get("dtype") != tensorfile.code(FP8_DTYPE):
            continue
        base = name.removesuffix(".weight")
        scale_name = next((f"{base}.{s}" for s in SCALE_NAMES if f"{base}.{s}" in infos), None)
        if scale_name is None:
            problems.append(f"FP8 weight {name} has no {base}.weight_scale_inv in the checkpoint: re-download it")
            continue
        shape, scale = info["shape"], infos[scale_name]
        if scheme.block is None or len(shape) < 2:
            want = None if math.prod(scale["shape"]) == 1 else "one value"
        else:
            grid = [math.ceil(shape[-2] / scheme.block[0]), math.ceil(shape[-1] / scheme.block[1])]
            want = None if list(scale["shape"][-2:]) == grid and scale["shape"][:-2] == shape[:-2] else grid
        if want is not None:
            problems.append(f"FP8 scale {scale_name} has shape {scale['shape']}, expected {want} for the "
                            f"{shape} weight in the quantization_config's blocks: re-download the checkpoint")
        elif scale.get("dtype") not in _FLOAT_SCALES:
            problems.append(f"FP8 scale {scale_name} is {scale.get('dtype')}, not a float: re-download the checkpoint")
    return problems


def _unlisted_shards(directory: Path, listed: set[str]) -> list[str]:
    """Shards of the index's own series (`model-00004-of-00004.safetensors`) that it lists no
    tensor of: the index dropped their entries. Other files (Mistral's consolidated.safetensors)
    are not the index's business."""
    series = {m.group(1, 2) for m in map(_SHARD.fullmatch, listed) if m}
    return sorted(p.name for p in directory.glob("*.safetensors")
                  if p.name not in listed and (m := _SHARD.fullmatch(p.name)) and m.group(1, 2) in series)


def require_complete(directory: Path, scheme=None) -> CheckpointCheck:
    report = inspect_checkpoint(directory, scheme)
    problems = list(report.problems) or index_gaps(weight_map(Path(directory)))
    if problems:
        more = f" (and {len(problems) - 1} more problem(s); run layerwise check)" if len(problems) > 1 else ""
        raise UserError(problems[0] + more)
    return report


def read_tensors(directory: Path, names: list[str], device: str = "cpu", wmap: dict[str, str] | None = None) -> dict:
    """Read the named tensors from their shards onto `device` (tensorfile.read_tensors: large
    sequential reads, asynchronous copies to a GPU), thread-safe. `wmap` is the checkpoint's
    weight map when the caller already holds it (a large index takes a while to parse)."""
    wmap = weight_map(Path(directory)) if wmap is None else wmap
    by_shard: dict[str, list[str]] = {}
    for name in names:
        if name not in wmap:
            raise UserError(f"tensor {name} is not in the checkpoint at {directory}")
        by_shard.setdefault(wmap[name], []).append(name)
    out = {}
    for shard, shard_names in by_shard.items():
        path = member(Path(directory), shard, f"checkpoint {directory}")
        out.update(tensorfile.read_tensors(path, shard_names, torch.device(device)))
    return out


def index_gaps(wmap: dict[str, str]) -> list[str]:
    """Tensors the index should list but does not, judged from its own structure: a decoder
    layer whose tensor names are a strict subset of the commonest layer's (a tensor dropped from
    the index), or layer numbers with a hole."""
    layers: dict[tuple[str, int], set[str]] = {}
    for name in wmap:
        parts = layer_parts(name)
        if parts and parts[2]:
            layers.setdefault(parts[:2], set()).add(parts[2])
    gaps = []
    for prefix in sorted({p for p, _ in layers}):
        indices = sorted(i for p, i in layers if p == prefix)
        holes = sorted(set(range(indices[-1] + 1)) - set(indices))
        if holes:
            gaps.append(f"the index has no tensor for {prefix}.{holes[0]} ({len(holes)} layer(s) missing): re-download the index")
        common = Counter(frozenset(layers[(prefix, i)]) for i in indices).most_common(1)[0][0]
        for i in indices:
            names = layers[(prefix, i)]
            if names < common:
                missing = sorted(common - names)
                gaps.append(f"the index lacks {len(missing)} tensor(s) of {prefix}.{i} that other layers have "
                            f"(first: {prefix}.{i}.{missing[0]}): re-download the index")
    return gaps
