"""What an import source hands to `importer.import_run`: its prompts and its tensors, lazily.

A source reads one foreign layout (per-prompt files, an SGLang dump, vLLM hidden states) and
yields *units*: `{prompt index: {tensor name: tensor}}`, each holding every tensor of the run
files it touches (a file is one prompt's one module group, names.file_group), so the importer
writes each file once. Names are already mapped and renamed; the importer checks them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

Unit = dict[int, dict[str, torch.Tensor]]


@dataclass
class ImportSource:
    format: str  # "dirs", "safetensors", "sglang", "vllm"
    prompts: list[dict]  # {"index", "text", "token_ids", ...} in index order
    units: Callable[[], Iterator[Unit]]
    settings: dict = field(default_factory=dict)  # how the source was read, recorded in the run
    notes: list[str] = field(default_factory=list)  # what was skipped or assumed (filled while reading)
