"""What an import source hands to `importer.import_run`: its prompts and its tensors, lazily.

A source reads one foreign layout (per-prompt files, an SGLang dump, vLLM hidden states) and
yields *units*: `{prompt index: {tensor name: tensor}}`, each holding every tensor of the run
files it touches (a file is one prompt's one module group, `group_of(name)`), so the importer
writes each file once. Names are already mapped and renamed; the importer checks them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

_LAYER_GROUP = re.compile(r"^(.*?layers\.\d+)(?:\.|$)")

Unit = dict[int, dict[str, torch.Tensor]]


def group_of(name: str) -> str:
    """The run file a tensor goes to: its decoder layer's (`model.layers.7`), else its module's."""
    module = name.rpartition(":")[0]
    match = _LAYER_GROUP.match(module)
    return match.group(1) if match else module


@dataclass
class ImportSource:
    format: str  # "dirs", "safetensors", "sglang", "vllm"
    prompts: list[dict]  # {"index", "text", "token_ids", ...} in index order
    units: Callable[[], Iterator[Unit]]
    settings: dict = field(default_factory=dict)  # how the source was read, recorded in the run
    notes: list[str] = field(default_factory=list)  # what was skipped or assumed (filled while reading)
