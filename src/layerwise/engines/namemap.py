r"""The name map: which foreign tensor becomes which layerwise tensor, and how.

A map is a list of rules, tried in order; the first whose `match` (a Python regular expression)
matches a foreign name in full gives the layerwise `<module path>:<role>` name:

    [[rules]]
    match = 'non_intrusive__model\.layers\.(\d+)\.self_attn\.output'
    name = 'model.layers.\1.self_attn:output'   # \1: the match's groups; {layer_id}: a dump tag
    dims = "t h[tp:partial]"                     # SGLang: how tensor-parallel ranks combine
    combine = "sum"                              # several foreign tensors of one step: their sum

A map file may also say which dumped names carry the batch's tokens (`[tokens]`, SGLang) and
whether the built-in rules are still tried after its own (`extend_default`, default true).
`layerwise import --show-map` prints the map in force; docs/FORMAT.md documents the format.

Pure: strings in, strings out; reading a map file is the only effect.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from ..schema import read_table_file

TOKEN_ROLES = ("input_ids", "positions", "seq_lens", "rids", "req_pool_indices")
COMBINE = ("sum",)
_TAG = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Rule:
    match: re.Pattern
    name: str
    dims: str | None = None
    combine: str | None = None

    def target(self, foreign: str, tags: dict[str, str]) -> str | None:
        """The layerwise name for `foreign` (None: this rule does not match it)."""
        m = self.match.fullmatch(foreign)
        if m is None:
            return None
        out = m.expand(self.name)

        def tag(t: re.Match) -> str:
            if t.group(1) not in tags:
                raise UserError(f"name map rule {self.match.pattern!r} -> {self.name!r} needs the tag "
                                f"{t.group(1)}, which {foreign} lacks (its tags: {', '.join(tags) or 'none'})")
            return str(tags[t.group(1)])

        return _TAG.sub(tag, out)


@dataclass(frozen=True)
class NameMap:
    rules: tuple[Rule, ...] = ()
    tokens: dict = field(default_factory=lambda: {r: r for r in TOKEN_ROLES})
    source: str = "built-in"

    def lookup(self, foreign: str, tags: dict[str, str] | None = None) -> tuple[str, Rule] | None:
        for rule in self.rules:
            name = rule.target(foreign, tags or {})
            if name is not None:
                return name, rule
        return None


_ROLE = r"(input|output|router_logits|score_bias|topk_ids|topk_weights)"
_NI = r"non_intrusive__model\."
# SGLang's built-in map: (match, name, dims, combine). Hand-placed dumper.dump calls use the names
# of the first group with a layer_id tag; the non-intrusive dumper (DUMPER_NON_INTRUSIVE_MODE=all,
# SGLang 0.5.10-0.5.20) names module inputs and outputs; its decoder layers return
# (mlp_output, residual), whose sum is the residual stream.
SGLANG_RULES = (
    (r"([\w.]+):" + _ROLE, r"\1:\2", None, None),
    ("layer_input", "model.layers.{layer_id}:input", None, None),
    ("layer_output", "model.layers.{layer_id}:output", None, None),
    ("attn_output", "model.layers.{layer_id}.self_attn:output", None, None),
    ("mlp_output", "model.layers.{layer_id}.mlp:output", None, None),
    (_NI + r"embed_tokens\.output", "model.embed_tokens:output", None, None),
    (_NI + r"layers\.(\d+)\.inputs\.(?:1|3|hidden_states|residual)", r"model.layers.\1:input", None, "sum"),
    (_NI + r"layers\.(\d+)\.output\.[01]", r"model.layers.\1:output", None, "sum"),
    (_NI + r"layers\.(\d+)\.self_attn\.output", r"model.layers.\1.self_attn:output", None, None),
    (_NI + r"layers\.(\d+)\.(?:mlp|block_sparse_moe)\.output", r"model.layers.\1.mlp:output", None, None),
    (_NI + r"layers\.(\d+)\.(?:mlp|block_sparse_moe)\.gate\.output(?:\.0)?",
     r"model.layers.\1.mlp.gate:router_logits", None, None),
    (_NI + r"norm\.output(?:\.0)?", "model.norm:output", None, None),
)


def sglang_default() -> NameMap:
    return NameMap(tuple(Rule(re.compile(m), n, d, c) for m, n, d, c in SGLANG_RULES))


def load_map(path: str | Path | None, default: NameMap | None = None) -> NameMap:
    """The map in force: the file's rules, then (unless it says `extend_default = false`) the
    default's; no file: the default (or an empty map)."""
    base = default or NameMap(source="none")
    if path is None:
        return base
    path = Path(path)
    data = read_table_file(path, "name map")
    return parse_map(data, str(path), base)


def parse_map(data, where: str, base: NameMap) -> NameMap:
    if not isinstance(data, dict):
        raise UserError(f"{where}: a name map is a table with [[rules]] (and optionally [tokens], extend_default)")
    unknown = sorted(set(data) - {"rules", "tokens", "extend_default"})
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r} (known: rules, tokens, extend_default)")
    rules = []
    for i, raw in enumerate(data.get("rules") or []):
        what = f"{where} rule {i + 1}"
        if not isinstance(raw, dict) or not isinstance(raw.get("match"), str) or not isinstance(raw.get("name"), str):
            raise UserError(f"{what}: each rule needs match = 'REGEX' and name = '<module path>:<role>'")
        extra = sorted(set(raw) - {"match", "name", "dims", "combine"})
        if extra:
            raise UserError(f"{what}: unknown key {extra[0]!r} (known: match, name, dims, combine)")
        if raw.get("combine") not in (None, *COMBINE):
            raise UserError(f"{what}: combine = {raw['combine']!r}; the only combination is \"sum\"")
        try:
            pattern = re.compile(raw["match"])
        except re.error as err:
            raise UserError(f"{what}: bad regular expression {raw['match']!r} ({err})") from None
        rules.append(Rule(pattern, raw["name"], raw.get("dims"), raw.get("combine")))
    tokens = data.get("tokens") or {}
    if not isinstance(tokens, dict) or any(k not in TOKEN_ROLES or not isinstance(v, str) for k, v in tokens.items()):
        raise UserError(f"{where}: [tokens] maps {', '.join(TOKEN_ROLES)} to dumped names")
    extend = data.get("extend_default", True)
    if not isinstance(extend, bool):
        raise UserError(f"{where}: extend_default is true or false")
    return NameMap(tuple(rules) + (base.rules if extend else ()), {**base.tokens, **tokens},
                   f"{where}" + (f" + {base.source}" if extend and base.rules else ""))


def _toml_str(text: str) -> str:
    return f"'{text}'" if "'" not in text and "\n" not in text else json.dumps(text)


def to_toml(name_map: NameMap) -> str:
    """The map as a TOML file `--map` reads back (with extend_default = false: it is complete)."""
    lines = [f"# name map in force: {name_map.source}", "extend_default = false", "", "[tokens]"]
    lines += [f"{k} = {_toml_str(v)}" for k, v in name_map.tokens.items()]
    for rule in name_map.rules:
        lines += ["", "[[rules]]", f"match = {_toml_str(rule.match.pattern)}", f"name = {_toml_str(rule.name)}"]
        lines += [f"dims = {_toml_str(rule.dims)}"] if rule.dims else []
        lines += [f"combine = {_toml_str(rule.combine)}"] if rule.combine else []
    return "\n".join(lines) + "\n"


def combine_into(found: dict[str, torch.Tensor], name: str, tensor: torch.Tensor, rule: Rule | None,
                 what: str) -> None:
    """Put `tensor` under `name`; a second tensor for the same name is added when the rule says
    combine = "sum" (in float32, stored in the first tensor's dtype), else refused."""
    if name not in found:
        found[name] = tensor
        return
    if rule is None or rule.combine != "sum":
        raise UserError(f"{what}: two tensors map to {name}; give the rule combine = \"sum\" if they add up "
                        "to it, or map them to different names")
    first = found[name]
    if first.shape != tensor.shape:
        raise UserError(f"{what}: {name} sums tensors of shapes {list(first.shape)} and {list(tensor.shape)}")
    found[name] = (first.float() + tensor.float()).to(first.dtype)
