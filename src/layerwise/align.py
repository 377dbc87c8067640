"""Which parts of two runs can be compared, checked from their manifests before any tensor is read.

Prompts are matched by index and must hold the same token ids; tensors by name and must have
the same shape; the runs must be of the same model (model type, architecture, layer count and
hidden size, where both manifests say). Dtypes and settings may differ: that is what a
comparison is for. What only one run holds is listed as skipped, grouped per layer range. Pure:
it reads the manifests of runs already open, never a tensor or a file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .errors import UserError
from .names import PAD_ROLE, Layout, format_ranges, model_order_key

if TYPE_CHECKING:
    from .runs import Run

@dataclass(frozen=True)
class Alignment:
    prompts: tuple[int, ...]  # compared prompt indices
    names: tuple[str, ...]  # tensors compared in at least one prompt, in model order
    pairs: dict[int, set[str]]  # prompt -> names present in both runs
    skipped: tuple[str, ...]  # what only one run holds, one line per group
    total_bytes: int  # bytes to read from all runs


def _model_identity(run: Run) -> dict:
    model = run.manifest.get("model") or {}
    return {k: model.get(k) for k in ("model_type", "architecture", "num_layers", "hidden_size")}


def _check_same_model(ref: Run, cand: Run, what: str) -> None:
    a, b = _model_identity(ref), _model_identity(cand)
    for key in a:
        if a[key] is not None and b[key] is not None and a[key] != b[key]:
            raise UserError(f"REF and {what} are runs of different models ({key} {a[key]} vs {b[key]}): "
                            "compare two runs of the same model")


def _prompt_map(run: Run) -> dict[int, dict]:
    return {int(p["index"]): p for p in run.prompts}


def _check_same_prompt(index: int, a: dict, b: dict, what: str) -> None:
    ta, tb = a.get("token_ids"), b.get("token_ids")
    if ta is not None and tb is not None:
        if list(ta) != list(tb):
            where = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
            raise UserError(f"prompt {index} differs between REF and {what} ({len(ta)} vs {len(tb)} tokens, "
                            f"first difference at token {where}): compare runs made from the same prompts")
    elif a.get("text") is not None and b.get("text") is not None and a["text"] != b["text"]:
        raise UserError(f"prompt {index} differs between REF and {what} (texts differ): compare runs made "
                        "from the same prompts")


def _order_key(run: Run) -> Callable[[str], tuple]:
    layout = Layout.of(run.manifest.get("anatomy"))
    return lambda name: model_order_key(name, layout.layers_path, layout.embed, layout.norm, layout.head)


def align_runs(ref: Run, cand: Run, baseline: Run | None = None, prompts: tuple[int, ...] | None = None) -> Alignment:
    """What can be compared: the prompts both runs hold with the same tokens and the tensors both
    hold with the same shapes. Raises UserError when nothing meaningful can be."""
    _check_same_model(ref, cand, "CAND")
    rp, cp = _prompt_map(ref), _prompt_map(cand)
    skipped: list[str] = []
    if prompts is not None:
        for p in prompts:
            for run, pm, label in ((ref, rp, "REF"), (cand, cp, "CAND")):
                if p not in pm:
                    raise UserError(f"--prompt-index {p}: {label} ({run.path}) has no prompt {p} "
                                    f"(it has {format_ranges(sorted(pm))})")
        prompts = tuple(prompts)
    else:
        prompts = tuple(sorted(set(rp) & set(cp)))
        for label, only in (("REF", set(rp) - set(cp)), ("CAND", set(cp) - set(rp))):
            if only:
                skipped.append(f"prompts {format_ranges(sorted(only))}: only in {label}")
    if not prompts:
        raise UserError(f"REF and CAND have no prompt in common (REF: {format_ranges(sorted(rp))}, "
                        f"CAND: {format_ranges(sorted(cp))}): compare runs made from the same prompts")
    for p in prompts:
        _check_same_prompt(p, rp[p], cp[p], "CAND")
    if baseline is not None:
        _check_same_model(ref, baseline, "BASELINE")
        bp = _prompt_map(baseline)
        for p in prompts:
            if p not in bp:
                raise UserError(f"the baseline ({baseline.path}) has no prompt {p}: give a baseline made "
                                "from the same prompts as REF")
            _check_same_prompt(p, rp[p], bp[p], "BASELINE")
    pairs, only_ref, only_cand, total = {}, set(), set(), 0
    by_prompt_r, by_prompt_c = _names_by_prompt(ref), _names_by_prompt(cand)
    for p in prompts:
        names_r, names_c = by_prompt_r.get(p, set()), by_prompt_c.get(p, set())
        only_ref |= names_r - names_c
        only_cand |= names_c - names_r
        common = names_r & names_c
        for name in common:
            er, ec = ref.entry(name, p), cand.entry(name, p)
            if er.shape != ec.shape:
                raise UserError(f"{name} (prompt {p}) has shape {list(er.shape)} in REF but {list(ec.shape)} "
                                "in CAND: the runs cannot be compared tensor by tensor")
            total += er.nbytes + ec.nbytes
            if baseline is not None and baseline.has(name, p):
                eb = baseline.entry(name, p)
                if eb.shape != er.shape:
                    raise UserError(f"{name} (prompt {p}) has shape {list(eb.shape)} in the baseline but "
                                    f"{list(er.shape)} in REF")
                total += eb.nbytes
        pairs[p] = common
    names = tuple(sorted(set().union(*pairs.values()), key=_order_key(ref)))
    if not names:
        raise UserError("REF and CAND have no tensor in common (different capture points?): "
                        "extract both with the same --points")
    for label, only in (("REF", only_ref - set(names)), ("CAND", only_cand - set(names))):
        skipped.extend(f"{group}: only in {label}" for group in _group_names(sorted(only, key=_order_key(ref))))
    return Alignment(prompts, names, pairs, tuple(skipped), total)


def _names_by_prompt(run: Run) -> dict[int, set[str]]:
    """Tensor names per prompt, without the padding tails (kept for replays, never compared)."""
    out: dict[int, set[str]] = {}
    for e in run.entries():
        if e.role != PAD_ROLE:
            out.setdefault(e.prompt, set()).add(e.name)
    return out


def _group_names(names: list[str]) -> list[str]:
    """model.layers.0:input ... model.layers.9:input -> model.layers.{0-9}:input (one line)."""
    groups: dict[str, list[int]] = {}
    for name in names:
        match = re.search(r"\.(\d+)(?=[.:])", name)
        key = name if not match else name[:match.start(1)] + "{}" + name[match.end(1):]
        groups.setdefault(key, []).append(int(match.group(1)) if match else -1)
    out = []
    for key, nums in groups.items():
        if -1 in nums:
            out.append(key)
        else:
            out.append(key.replace("{}", str(nums[0]) if len(nums) == 1 else "{" + format_ranges(sorted(nums)) + "}"))
    return out
