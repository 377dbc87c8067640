"""Un-sharding: one tensor from the pieces that parallel ranks dumped, as a dims spec says.

The dims spec is SGLang's comparator syntax (what `dumper.dump(..., dims=...)` records and what
the name map's `dims` gives): one token per tensor dimension, a dimension sharded over a
parallel axis written `h[tp]` (the ranks' pieces concatenated along it, in rank order) or
`h[tp:partial]` (each rank holds a partial sum: the pieces are added, in float32), and after
`#` axes whose ranks hold the same tensor (`# tp:replicated`). Examples: `t h` (tokens x
hidden), `t h[tp]` (a column-parallel output such as q_proj or gate/up), `t h[tp:partial]` (a
row-parallel o_proj or down_proj before its all-reduce), `b s h`. The axes are tp, ep, cp, sp,
dp, attn_tp, attn_dp, moe_ep, moe_tp, moe_dp, etp, edp. Shards are joined innermost (rightmost)
first. Pieces of an axis the spec does not name must be identical (they are replicated);
anything else is refused with what to write. Token-dimension orderings (`zigzag`) are not
supported. Pure: tensors in, a tensor out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import UserError

AXES = ("tp", "ep", "cp", "sp", "dp", "attn_tp", "attn_dp", "moe_ep", "moe_tp", "moe_dp", "etp", "edp")
_DIM = re.compile(r"^(\(?[A-Za-z_0-9*]+\)?)(?:\[([^\]]*)\])?$")


@dataclass(frozen=True)
class DimsSpec:
    text: str
    dims: tuple[str, ...]  # a name per tensor dimension ("t", "h", "(num_heads*head_dim)")
    shards: tuple[tuple[int, str, str], ...]  # (dimension, axis, "concat" | "sum") in the order written
    replicated: tuple[str, ...] = ()

    @property
    def axes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([a for _, a, _ in self.shards] + list(self.replicated)))


def parse_dims(text: str) -> DimsSpec:
    body, _, comment = text.partition("#")
    dims, shards = [], []
    for index, token in enumerate(body.split()):
        m = _DIM.match(token)
        if not m:
            raise UserError(f"dims {text!r}: cannot read {token!r} (write e.g. 't h[tp]' or 't h[tp:partial]')")
        dims.append(m.group(1))
        for modifier in filter(None, (x.strip() for x in (m.group(2) or "").split(","))):
            axis, _, qualifiers = modifier.partition(":")
            if axis not in AXES:
                raise UserError(f"dims {text!r}: unknown parallel axis {axis!r} (known: {', '.join(AXES)})")
            quals = set(filter(None, qualifiers.split("+")))
            if quals - {"partial", "sharded", "natural"}:
                raise UserError(f"dims {text!r}: {modifier!r} is not supported (only partial sums and plain shards; "
                                "zigzag token orders are not)")
            shards.append((index, axis, "sum" if "partial" in quals else "concat"))
    replicated = []
    for item in comment.split():
        axis, _, what = item.partition(":")
        if what == "replicated":
            if axis not in AXES:
                raise UserError(f"dims {text!r}: unknown parallel axis {axis!r}")
            replicated.append(axis)
    if not dims:
        raise UserError(f"dims {text!r} names no dimension")
    return DimsSpec(text, tuple(dims), tuple(shards), tuple(replicated))


Piece = tuple[dict, torch.Tensor]  # ({axis: rank, "rank": global rank}, tensor)


def unshard(pieces: list[Piece], spec: DimsSpec | None, what: str) -> torch.Tensor:
    """One tensor from the ranks' pieces: join the spec's shards, then check that what is left
    is identical on every rank."""
    if spec is not None:
        for dim, axis, how in reversed(spec.shards):
            pieces = _join(pieces, dim, axis, how, spec, what)
    first = pieces[0][1]
    for coords, t in pieces[1:]:
        if t.shape != first.shape or not torch.equal(t, first):
            diff = "shapes differ" if t.shape != first.shape else \
                f"max |diff| {(t.double() - first.double()).abs().max().item():.3g}"
            hint = "'t h[tp]' for column-parallel outputs, 't h[tp:partial]' for row-parallel partial sums"
            raise UserError(f"{what} differs between rank {pieces[0][0].get('rank')} and rank {coords.get('rank')} "
                            f"({diff}) and no dims say how the ranks combine: give its rule dims, e.g. {hint}"
                            + (f" (dims in force: {spec.text!r})" if spec else ""))
    return first


def _join(pieces: list[Piece], dim: int, axis: str, how: str, spec: DimsSpec, what: str) -> list[Piece]:
    others = [a for a in spec.axes if a != axis]
    groups: dict[tuple, list[Piece]] = {}
    for coords, t in pieces:
        if axis not in coords:
            raise UserError(f"{what}: dims {spec.text!r} shard it over {axis}, but the dump does not say which "
                            f"{axis} rank wrote each piece")
        groups.setdefault(tuple(coords.get(a) for a in others), []).append((coords, t))
    out = []
    for members in groups.values():
        members.sort(key=lambda p: p[0][axis])
        ranks = [p[0][axis] for p in members]
        if ranks != list(range(len(ranks))):
            raise UserError(f"{what}: the {axis} ranks dumped are {ranks}, not 0..{len(ranks) - 1}: a rank is missing")
        tensors = [t for _, t in members]
        if how == "concat":
            if dim >= tensors[0].dim():
                raise UserError(f"{what}: dims {spec.text!r} shard dimension {dim}, but it has {tensors[0].dim()}")
            joined = torch.cat(tensors, dim=dim)
        else:
            if any(t.shape != tensors[0].shape for t in tensors):
                raise UserError(f"{what}: partial sums of different shapes on the {axis} ranks")
            joined = torch.stack([t.float() for t in tensors]).sum(0).to(tensors[0].dtype)
        coords = {k: v for k, v in members[0][0].items() if k != axis}
        out.append((coords, joined))
    return out


def tokens_first(t: torch.Tensor, spec: DimsSpec | None) -> torch.Tensor:
    """[tokens, ...]: `b s ...` flattened batch-major, a leading `1` dropped; without a spec a
    leading dimension of 1 before the tokens is dropped."""
    if spec is not None and len(spec.dims) == t.dim():
        if spec.dims[:2] == ("b", "s"):
            return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])
        if spec.dims[0] == "1":
            return t[0]
    if spec is None and t.dim() >= 3 and t.shape[0] == 1:
        return t[0]
    return t
