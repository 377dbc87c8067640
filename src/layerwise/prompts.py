"""Prompts: read them, tokenize them, and batch them deterministically.

A prompt is text or a list of token ids. Files hold one prompt per line, or JSONL objects with
`text` or `token_ids`. Batches are formed from the whole prompt list by length (longest first,
so padding stays small) and never depend on what an interrupted run already wrote: the same
prompts always give the same batches, hence the same bits.
"""

from __future__ import annotations

import array
import contextlib
import errno
import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .quiet import quiet_transformers
from .schema import token_ids


@dataclass(frozen=True)
class Prompt:
    index: int
    text: str | None
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class BrokenTokenizer:
    """A model whose tokenizer files are there but do not load: text prompts fail naming why
    (token-id prompts need no tokenizer)."""
    reason: str


def read_prompt_file(path: str) -> list[str | list[int]]:
    """Plain text (one prompt per non-empty line) or JSONL ({"text": ...} or {"token_ids": [...]});
    "-" is the standard input, a pipe or /dev/stdin reads as a file does."""
    file = Path(path)
    lines = _prompt_text(path).splitlines()
    # .txt is text whatever its lines hold; a file with another name is JSONL when its first line is an object
    suffix = file.suffix.lower()
    jsonl = suffix in (".jsonl", ".json") or (suffix != ".txt" and bool(lines) and lines[0].lstrip().startswith("{"))
    items: list[str | list[int]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not jsonl:
            items.append(line)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path} line {number} is not valid JSON ({err.msg}): each line must be "
                            '{"text": ...} or {"token_ids": [...]}') from None
        if isinstance(obj, dict) and isinstance(obj.get("text"), str):
            items.append(obj["text"])
        elif isinstance(obj, dict) and "token_ids" in obj:
            items.append(token_ids(obj["token_ids"], f"{path} line {number}"))
        else:
            raise UserError(f'{path} line {number} must be {{"text": "..."}} or {{"token_ids": [non-negative ints]}}')
    if not items:
        raise UserError(f"prompts file {path} holds no prompt")
    return items


def _prompt_text(path: str) -> str:
    """The text of a prompts file, a pipe or the standard input ("-"), a byte-order mark dropped."""
    try:
        if path == "-":
            if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):  # torchrun's ranks do not share a stdin
                raise UserError("--prompts - (the standard input) reaches one rank only under torchrun: "
                                "give a file every rank can read")
            data = sys.stdin.buffer.read()
        else:
            mode = os.stat(path).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
                raise UserError(f"prompts file {path} is not a file")
            data = Path(path).read_bytes()
    except OSError as err:  # missing, a symbolic-link loop, no permission
        raise UserError(f"prompts file {path} " + ("does not exist" if err.errno == errno.ENOENT
                                                   else f"cannot be read: {err.strerror or err}")) from None
    try:
        return data.decode("utf-8-sig")  # -sig: a leading byte-order mark is not text
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise UserError(f"prompts file {path} is not UTF-8 text (byte {data[err.start]:#04x} on line {line}): "
                        "save it as UTF-8") from None


def _tokenized(index: int, item: str | list[int], tokenizer, chat_template: bool) -> Prompt:
    """One prompt: a text tokenized (or through the chat template), token ids as given."""
    if not isinstance(item, str):
        return Prompt(index, None, tuple(item))
    if not item.strip():
        raise UserError(f"prompt {index} is empty")
    if isinstance(tokenizer, BrokenTokenizer):
        raise UserError(f"this model's tokenizer does not load ({tokenizer.reason}): fix its files, or give "
                        "prompts as token ids (JSONL with token_ids)")
    if tokenizer is None:
        raise UserError("this model has no tokenizer: give prompts as token ids (JSONL with token_ids)")
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("--chat-template asked for, but the tokenizer has no chat template")
        try:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": item}], tokenize=True,
                                                add_generation_prompt=True)
        except Exception as err:  # the template is code: jinja's syntax errors and raise_exception()
            if not type(err).__module__.startswith("jinja2"):
                raise
            raise UserError(f"the tokenizer's chat template fails on prompt {index}: {type(err).__name__}: "
                            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''} (fix the template "
                            "in the model's files, or leave out --chat-template)") from None
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    else:
        ids = tokenizer(item)["input_ids"]
    return Prompt(index, item, tuple(map(int, ids)))


def tokenize(items: list[str | list[int]], tokenizer, *, chat_template: bool = False,
             max_tokens: int | None = None, context_length: int | None = None,
             vocab_size: int | None = None) -> list[Prompt]:
    """Turn texts into token ids (token-id prompts pass through) and check their length."""
    if not items:
        raise UserError("no prompt given: pass --prompt TEXT or --prompts FILE")
    # transformers' tokenizers report a prompt longer than the model's context; layerwise says it
    # below, in one line
    with quiet_transformers() if any(isinstance(item, str) for item in items) else contextlib.nullcontext():
        prompts = [_tokenized(index, item, tokenizer, chat_template) for index, item in enumerate(items)]
    for p in prompts:
        if not p.token_ids:
            raise UserError(f"prompt {p.index} has no tokens")
        if max_tokens is not None and len(p.token_ids) > max_tokens:
            raise UserError(f"prompt {p.index} has {len(p.token_ids)} tokens, more than --max-tokens {max_tokens}: "
                            "shorten it or raise --max-tokens")
        if context_length and len(p.token_ids) > context_length:
            raise UserError(f"prompt {p.index} has {len(p.token_ids)} tokens, more than the model's context of "
                            f"{context_length}")
        if vocab_size is not None and max(p.token_ids) >= vocab_size:
            raise UserError(f"prompt {p.index} has token id {max(p.token_ids)}, outside the vocabulary of {vocab_size}")
    return prompts


@dataclass(frozen=True)
class Batch:
    prompts: tuple[Prompt, ...]  # in batch-row order
    input_ids: torch.Tensor  # [B, S], right-padded
    attention_mask: torch.Tensor  # [B, S], 1 on real tokens

    @property
    def lengths(self) -> list[int]:
        return [len(p.token_ids) for p in self.prompts]


def make_batches(prompts: list[Prompt], batch_size: int, pad_id: int) -> list[Batch]:
    """Longest first, `batch_size` per batch, right padding (real tokens keep positions 0..n-1)."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    ordered = sorted(prompts, key=lambda p: (-len(p.token_ids), p.index))
    batches = []
    for start in range(0, len(ordered), batch_size):
        group = ordered[start:start + batch_size]
        width = max(len(p.token_ids) for p in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, p in enumerate(group):
            if p.token_ids:  # through an int64 array: a quarter of torch.tensor's time on a tuple of ints
                ids[row, :len(p.token_ids)] = torch.frombuffer(array.array("q", p.token_ids), dtype=torch.long)
            mask[row, :len(p.token_ids)] = 1
        batches.append(Batch(tuple(group), ids, mask))
    return batches
