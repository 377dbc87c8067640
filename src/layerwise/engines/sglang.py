"""SGLang's dumper output (`sglang.srt.debug_utils.dumper`) as its releases write it, into a run.

The dumper writes one `torch.save` file per dumped value, named by its tags joined with `___`:

| release        | directory                                  | file name keys, in order                              | content           |
| 0.4.7-0.4.9    | `sglang_dump_<time>_<tp rank>/` per rank   | forward_pass_id, name, tags                           | the tensor        |
| 0.4.10-0.5.4   | `sglang_dump_<time>/`                      | forward_pass_id, rank, name, dump_index, tags         | the tensor        |
| 0.5.6-0.5.8    | `sglang_dump_<time>/`                      | ... as above, then the context tags (`set_ctx`)       | the tensor        |
| 0.5.9          | `sglang_dump_<time>/`                      | forward_pass_id, rank, dump_index, name, tags, ctx    | {"value", "meta"} |
| 0.5.10-0.5.23  | `$DUMPER_DIR/dump_<UTC time>/`             | step, rank, dump_index, name, recompute_status, tags, | {"value", "meta"} |
|                |                                            | ctx[, pp_rank, tp_rank]                               |                   |

Every era is read by the keys a file name holds, not by guessing the release. One step (forward
pass) of a packed batch is split into prompts with the dumped `input_ids`, `positions`,
`seq_lens` and `rids` / `req_pool_indices` (packing.py; SGLang >= 0.5.10 dumps them by itself,
older releases need them dumped by hand); the ranks' files of one value are joined as its dims
say (`meta["dims"]`, else the name map rule's; shards.py). Names become layerwise names through
the name map (namemap.py). Files are read with `weights_only=True`; sglang is never imported.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..names import file_group, split_name
from .files import load_torch
from .namemap import NameMap, Rule, combine_into
from .packing import StepTokens, plan_prompts
from .shards import AXES, parse_dims, tokens_first, unshard
from .source import ImportSource

_RANK_TAGS = ("pp_rank", "tp_rank", "cp_rank", "ep_rank", "etp_rank")
_KNOWN = ("step", "forward_pass_id", "rank", "dump_index", "name", "recompute_status") + _RANK_TAGS
_PER_RANK_DIR = re.compile(r"sglang_dump_[\d.]+_(\d+)")


@dataclass(frozen=True)
class DumpFile:
    path: Path
    step: int
    rank: int  # the global rank that wrote it (0.4.7-0.4.9: the TP rank in the directory name)
    order: int  # dump_index: the writing rank's counter (0 where the era has none)
    name: str
    tags: tuple[tuple[str, str], ...]  # the call's tags and the context, in file-name order
    rank_tags: tuple[tuple[str, int], ...]  # pp_rank, tp_rank, ... (0.5.14+, when asked for)
    recompute: str | None = None


def parse_file_name(stem: str) -> dict[str, str] | None:
    """`step=0___rank=1___name=x___layer_id=3` -> {"step": "0", ...}; None when not a dump's name."""
    out = {}
    for part in stem.split("___"):
        key, sep, value = part.partition("=")
        if not sep or not key:
            return None
        out[key] = value
    return out if "name" in out else None


def _dump_file(path: Path, dir_rank: int | None) -> DumpFile:
    kv = parse_file_name(path.stem)
    step_text = kv.get("step", kv.get("forward_pass_id", "0"))
    step = int(step_text) if re.fullmatch(r"-?\d+", step_text) else 0  # 0.4.7-0.4.9 may write "None"
    rank = int(kv["rank"]) if "rank" in kv else (dir_rank or 0)
    return DumpFile(path, step, rank, int(kv.get("dump_index", 0)), kv["name"],
                    tuple((k, v) for k, v in kv.items() if k not in _KNOWN),
                    tuple((k, int(kv[k])) for k in _RANK_TAGS if k in kv), kv.get("recompute_status"))


def _has_dump_files(d: Path) -> bool:
    return any(parse_file_name(p.stem) for p in d.glob("*.pt"))


def dump_dirs(src: Path) -> list[tuple[Path, int | None]]:
    """The directories of one dump and the TP rank each stands for (0.4.7-0.4.9 wrote one per rank).
    SRC may be the dump itself or the directory holding it ($DUMPER_DIR)."""
    if _has_dump_files(src):
        return [(src, None)]
    subs = sorted(d for d in src.iterdir() if d.is_dir() and _has_dump_files(d))
    if len(subs) <= 1:
        return [(d, None) for d in subs]
    per_rank = [_PER_RANK_DIR.fullmatch(d.name) for d in subs]
    if all(per_rank) and not any("rank" in parse_file_name(p.stem) for d in subs for p in d.glob("*.pt")
                                 if parse_file_name(p.stem)):
        ranks = [int(m.group(1)) for m in per_rank]
        if sorted(ranks) == list(range(len(ranks))):
            return [(d, r) for d, r in zip(subs, ranks)]
    raise UserError(f"{src} holds {len(subs)} dumps ({', '.join(d.name for d in subs[:4])}"
                    f"{', ...' if len(subs) > 4 else ''}): pass one of them")


def looks_like_sglang(src: Path) -> bool:
    try:
        return bool(dump_dirs(src))
    except UserError:
        return True  # several dumps: it is SGLang's; read_dump says which to pass


def load_value(f: DumpFile):
    """(value, meta): a bare value (<= 0.5.8) or the {"value", "meta"} dict (>= 0.5.9)."""
    obj = load_torch(f.path)  # weights_only: a pickle that would call code is refused
    if isinstance(obj, dict) and "value" in obj:
        return obj["value"], obj.get("meta") or {}
    return obj, {}


def _ints(value, what: str) -> tuple[int, ...]:
    if isinstance(value, torch.Tensor):
        return tuple(int(x) for x in value.reshape(-1).tolist())
    if isinstance(value, (list, tuple)) and all(isinstance(x, int) for x in value):
        return tuple(value)
    raise UserError(f"{what} holds a {type(value).__name__}, not integers")


def _step_tokens(files: list[DumpFile], tokens: dict) -> dict[int, StepTokens]:
    """Per step, the token fields the lowest rank dumped."""
    found: dict[int, dict] = defaultdict(dict)
    roles = {name: role for role, name in tokens.items()}
    for f in sorted(files, key=lambda f: (f.rank, f.order)):
        role = roles.get(f.name)
        if role is not None and role not in found[f.step]:
            found[f.step][role] = load_value(f)[0]
    out = {}
    for step, fields in found.items():
        if "input_ids" not in fields:
            continue
        rids = fields.get("rids")
        ids = tuple(str(x) for x in rids) if isinstance(rids, (list, tuple)) else None
        if ids is None and "req_pool_indices" in fields:
            ids = _ints(fields["req_pool_indices"], f"step {step} req_pool_indices")
        out[step] = StepTokens(step, _ints(fields["input_ids"], f"step {step} input_ids"),
                               _ints(fields["positions"], "positions") if "positions" in fields else None,
                               _ints(fields["seq_lens"], "seq_lens") if "seq_lens" in fields else None, ids)
    return out


def _coords(f: DumpFile, meta: dict) -> dict:
    info = meta.get("sglang_parallel_info") or {}
    if isinstance(info, dict) and (info.get("attn_dp_size") or 1) > 1:
        raise UserError(f"{f.path.name}: a dump with data-parallel attention (attn_dp_size "
                        f"{info['attn_dp_size']}: ranks hold different tokens) is not supported")
    coords = {"rank": f.rank}
    coords.update({axis: int(info[f"{axis}_rank"]) for axis in AXES if isinstance(info, dict)
                   and isinstance(info.get(f"{axis}_rank"), int)})
    coords.setdefault("tp", dict(f.rank_tags).get("tp_rank", f.rank))
    return coords


def _with_duplicates(files: list[DumpFile]) -> list[tuple[DumpFile, dict[str, str]]]:
    """Each file with its tags plus `duplicate_index`: the how-manyth dump of the same name and
    tags by the same rank in the same step (0, 1, ... by dump_index)."""
    count: dict[tuple, int] = defaultdict(int)
    out = []
    for f in sorted(files, key=lambda f: (f.step, f.rank, f.order)):
        key = (f.step, f.rank, f.name, f.tags)
        out.append((f, {**dict(f.tags), "duplicate_index": str(count[key])}))
        count[key] += 1
    return out


def read_dump(src: Path, name_map: NameMap, rename, decode: str = "skip") -> ImportSource:
    dirs = dump_dirs(src)
    if not dirs:
        raise UserError(f"{src} holds no SGLang dump files (step=...___name=....pt)")
    files = [_dump_file(p, rank) for d, rank in dirs for p in sorted(d.glob("*.pt")) if parse_file_name(p.stem)]
    notes: list[str] = []
    recomputed = [f for f in files if f.recompute == "recompute"]
    files = [f for f in files if f.recompute != "recompute"]
    if recomputed:
        notes.append(f"{len(recomputed)} files of activation recomputation skipped")
    token_names = set(name_map.tokens.values())
    steps = _step_tokens([f for f in files if f.name in token_names], name_map.tokens)
    targets: dict[str, dict[int, dict[tuple, list]]] = {}  # target -> step -> bundle -> [(file, rule)]
    unmatched: set[str] = set()
    for f, tags in _with_duplicates([f for f in files if f.name not in token_names]):
        hit = name_map.lookup(f.name, tags)
        if hit is None:
            unmatched.add(f.name)
            continue
        name = rename(hit[0])
        bundle = (f.name, f.tags, tags["duplicate_index"])
        targets.setdefault(name, {}).setdefault(f.step, {}).setdefault(bundle, []).append((f, hit[1]))
    if unmatched:
        shown = sorted(unmatched)
        notes.append(f"not imported (no name map rule): {', '.join(shown[:8])}"
                     f"{f' and {len(shown) - 8} more' if len(shown) > 8 else ''}")
    missing = sorted({s for t in targets.values() for s in t} - set(steps))
    if missing:
        raise UserError(f"step {missing[0]} of {src} has tensors but no input_ids: SGLang >= 0.5.10 dumps input_ids, "
                        "positions, seq_lens and rids itself (DUMPER_NON_INTRUSIVE_MODE=core, the default); with older "
                        "releases dump them by hand, e.g. dumper.dump('input_ids', forward_batch.input_ids)")
    plans, plan_notes = plan_prompts([steps[s] for s in sorted(steps)], decode)
    notes += plan_notes
    prompts = [{"index": i, "text": None, "token_ids": p.token_ids,
                **({"source_id": str(p.key)} if p.key is not None else {})} for i, p in enumerate(plans)]
    by_group: dict[str, list[str]] = {}
    for name in targets:
        by_group.setdefault(file_group(split_name(name)[0]), []).append(name)

    def units():
        for names in by_group.values():
            unit: dict[int, dict[str, torch.Tensor]] = {}
            for name in names:
                per_step = {s: _step_tensor(name, s, bundles, len(steps[s].input_ids))
                            for s, bundles in targets[name].items()}
                partial = []
                for index, plan in enumerate(plans):
                    if all(s in per_step for s, _, _ in plan.pieces):
                        unit.setdefault(index, {})[name] = torch.cat([per_step[s][b:e] for s, b, e in plan.pieces])
                    else:
                        partial.append(index)
                if partial:
                    notes.append(f"{name} was not dumped in every step of prompt(s) {', '.join(map(str, partial))}: "
                                 "not imported for them")
            yield unit

    settings = {"decode": decode, "name_map": name_map.source, "steps": len(steps),
                "ranks": len({f.rank for f in files})}
    return ImportSource("sglang", prompts, units, settings, notes)


def _step_tensor(name: str, step: int, bundles: dict[tuple, list[tuple[DumpFile, Rule]]], rows: int) -> torch.Tensor:
    """One target's tensor for one step: each bundle's ranks joined, bundles combined by the rule."""
    found: dict[str, torch.Tensor] = {}
    for (foreign, _, _), members in bundles.items():
        pieces, dims, rule = [], None, members[0][1]
        for f, _ in members:
            value, meta = load_value(f)
            if not isinstance(value, torch.Tensor):
                raise UserError(f"{f.path.name} holds a {type(value).__name__}, not a tensor")
            pieces.append((_coords(f, meta), value))
            dims = dims or meta.get("dims")
        spec = parse_dims(dims or rule.dims) if (dims or rule.dims) else None
        what = f"{foreign} (step {step})"
        combine_into(found, name, tokens_first(unshard(pieces, spec, what), spec), rule, what)
    tensor = found[name]
    if tensor.dim() == 0 or tensor.shape[0] != rows:
        raise UserError(f"{name} in step {step} has shape {list(tensor.shape)}, but the step has {rows} tokens: only "
                        "per-token tensors [tokens, ...] can be imported (give dims such as 'b s h' for other layouts)")
    return tensor
