"""Packed engine steps into prompts: which rows of which step belong to which prompt.

Serving engines run ragged batches: one forward step holds the new tokens of several requests
back to back (`[tokens, hidden]`, no batch dimension). With each step's `input_ids`, `positions`
(each token's position in its sequence) and `seq_lens` (each request's length after the step,
cached prefix included), a step splits into requests: request i takes the next
`seq_lens[i] - positions[first]` tokens, whose positions must run consecutively. A request that
starts at position 0 is a new prompt; one that starts later continues the prompt it belongs to
(by request id, else pool index, else the one open prompt of that length): a chunk of a long
prefill, or a decode step (one token). Decode tokens are skipped or appended (`decode`).

Without `seq_lens` a step is one request; without `positions` every request starts at 0. A
continuation of exactly one token counts as a decode step, so a prefill chunk of one token would
be taken for one (documented). Pure: lists of ints in, plans out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError


@dataclass(frozen=True)
class StepTokens:
    step: int
    input_ids: tuple[int, ...]
    positions: tuple[int, ...] | None = None
    seq_lens: tuple[int, ...] | None = None
    seq_ids: tuple | None = None  # per request: request id (rids) or pool index; None: unknown


@dataclass
class PromptPlan:
    key: object  # the request id or pool index it was seen under (None: unknown)
    token_ids: list[int] = field(default_factory=list)
    pieces: list[tuple[int, int, int]] = field(default_factory=list)  # (step, first row, end row)
    next_position: int = 0
    decode_tokens: int = 0  # decode tokens seen (imported or skipped)


def segments(st: StepTokens) -> list[tuple[int, int, int]]:
    """[(first row, end row, first position)] of each request of one step, in batch order."""
    total = len(st.input_ids)
    if st.positions is not None and len(st.positions) != total:
        raise UserError(f"step {st.step}: {len(st.positions)} positions for {total} input ids")
    if st.seq_lens is None:
        return [(0, total, st.positions[0] if st.positions else 0)] if total else []
    out, cursor = [], 0
    for i, length in enumerate(st.seq_lens):
        first = st.positions[cursor] if st.positions and cursor < total else 0
        count = length - first
        if count < 1 or cursor + count > total:
            raise UserError(f"step {st.step}: request {i} (seq_len {length}, first position {first}) does not fit the "
                            f"step's {total} tokens: input_ids, positions and seq_lens disagree")
        if st.positions and list(st.positions[cursor:cursor + count]) != list(range(first, length)):
            raise UserError(f"step {st.step}: request {i}'s positions are not {first}..{length - 1}: the step is not "
                            "a packed batch of whole requests")
        out.append((cursor, cursor + count, first))
        cursor += count
    return out  # rows past the last request are padding


def plan_prompts(steps: list[StepTokens], decode: str = "skip") -> tuple[list[PromptPlan], list[str]]:
    """Prompts in the order they first appear, with the step rows that make each; notes."""
    prompts: list[PromptPlan] = []
    by_key: dict = {}
    skipped = 0
    for st in sorted(steps, key=lambda s: s.step):
        for i, (begin, end, first) in enumerate(segments(st)):
            key = st.seq_ids[i] if st.seq_ids is not None and i < len(st.seq_ids) else None
            ids = list(st.input_ids[begin:end])
            if first == 0:
                plan = PromptPlan(key, ids, [(st.step, begin, end)], end - begin)
                prompts.append(plan)
                if key is not None:
                    by_key[key] = plan
                continue
            plan = _continued(prompts, by_key, key, first, st.step, i)
            plan.next_position += end - begin
            if end - begin == 1 or plan.decode_tokens:  # a decode step
                plan.decode_tokens += end - begin
                if decode == "skip":
                    skipped += end - begin
                    continue
            plan.token_ids += ids
            plan.pieces.append((st.step, begin, end))
    notes = [f"{skipped} decode token(s) skipped (--decode include imports them as further positions)"] \
        if skipped else []
    return prompts, notes


def _continued(prompts: list[PromptPlan], by_key: dict, key, first: int, step: int, index: int) -> PromptPlan:
    """The open prompt a request starting at position `first` continues."""
    if key is not None:
        candidates = [by_key[key]] if key in by_key else []
    else:
        candidates = [p for p in prompts if p.key is None and p.next_position == first]
    if len(candidates) == 1 and candidates[0].next_position == first:
        return candidates[0]
    if len(candidates) > 1:
        raise UserError(f"step {step}: request {index} (first position {first}) continues one of "
                        f"{len(candidates)} prompts of that length: dump rids or req_pool_indices to tell them apart")
    raise UserError(f"step {step}: request {index} starts at position {first}, but no earlier step computed its "
                    "first tokens (a cached prefix: run SGLang with --disable-radix-cache, or dump from the "
                    "first step)")
