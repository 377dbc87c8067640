"""`--modules REGEX[:ROLE]`: capture any named module's output or input, besides the fixed points.

A spec is a regular expression matched against the whole `named_modules()` path
(`model\\.layers\\.\\d+\\.self_attn\\.q_proj`) and the roles to capture, `output` (default),
`input` or both (`:input,output`). A module's output is its tensor (the first tensor of a tuple);
its input is its first positional argument (or `hidden_states=`). Its tensors go to its decoder
layer's file (inside a layer) or to a file of its own, named `<module path>:<role>` like every
tensor. Only token-major tensors (`[batch, tokens, ...]` or `[batch*tokens, ...]`) can be stored
per prompt; capture.Collector refuses others.

Pure: module paths in, capture targets out. Knows no model and no tensors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .anatomy import Anatomy
from .capture import Target
from .errors import UserError
from .names import INPUT, OUTPUT, tensor_name


@dataclass(frozen=True)
class ModuleSpec:
    """`--modules REGEX[:ROLE[,ROLE]]`: the modules whose path the regex matches in full, and
    whether their input, output or both are captured."""

    text: str
    pattern: re.Pattern
    roles: tuple[str, ...]


_MODULE_ROLES = (INPUT, OUTPUT)  # a module's two points (names.py)


def parse_modules(texts: list[str] | tuple[str, ...] | None) -> tuple[ModuleSpec, ...]:
    r""""model\.layers\.\d+\.self_attn\.q_proj" or "...down_proj:input" or "...:input,output".
    A regex may hold ":" (as in "(?:q|k)_proj"): only a last ":" followed by roles is split off."""
    specs = []
    for text in texts or ():
        regex, sep, tail = text.rpartition(":")
        roles = tuple(dict.fromkeys(r.strip() for r in tail.split(","))) if sep else ()
        if not sep or not roles or any(r not in _MODULE_ROLES for r in roles):
            regex, roles = text, ("output",)
        try:
            specs.append(ModuleSpec(text, re.compile(regex), roles))
        except re.error as err:
            raise UserError(f"--modules {text!r}: bad regular expression ({err})") from None
    return tuple(specs)


def module_targets(paths: list[str], specs: tuple[ModuleSpec, ...], anatomy: Anatomy,
                   layers: tuple[int, ...]) -> list[Target]:
    """Targets for the modules (`paths`: the model's `named_modules()` names, in order) that a
    spec matches in full; inside decoder layers only those of `layers`. A module's tensors go to
    its decoder layer's file, else to a file of its own. Each spec must match some module."""
    prefix = anatomy.layers_path + "."
    chosen = {anatomy.layer(i) for i in layers}
    out = []
    for spec in specs:
        matched = [p for p in paths if p and spec.pattern.fullmatch(p)]
        if not matched:
            _bad_roles(spec, paths)
            raise UserError(f"--modules {spec.text!r} matches no module of this model (paths look like "
                            f"{anatomy.layer(0)}.{anatomy.attn_name or 'self_attn'}; regexes must match the "
                            "whole path)")
        for path in matched:
            group = path
            if path.startswith(prefix):
                group = prefix + path[len(prefix):].split(".")[0]
                if group not in chosen:
                    continue
            for role in spec.roles:
                out.append(Target(path, role, (tensor_name(path, role),), group, extra=True))
    return list({t.names[0]: t for t in out}.values())


def _bad_roles(spec: ModuleSpec, paths: list[str]) -> None:
    """A spec that matched nothing because its ":tail" names no role ("...mlp:outputs"), while the
    regex before the colon matches modules: say so, rather than "matches no module"."""
    regex, sep, tail = spec.text.rpartition(":")
    if not sep or not re.fullmatch(r"[A-Za-z_]+(\s*,\s*[A-Za-z_]+)*", tail):
        return
    try:
        pattern = re.compile(regex)
    except re.error:
        return
    if any(p and pattern.fullmatch(p) for p in paths):
        bad = [r.strip() for r in tail.split(",") if r.strip() not in _MODULE_ROLES]
        raise UserError(f"--modules {spec.text!r}: {bad[0]!r} is not a role: give {INPUT}, {OUTPUT} or "
                        f"{INPUT},{OUTPUT} after the last ':'")
