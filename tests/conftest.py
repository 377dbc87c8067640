"""Shared fixtures: a private cache for built-in checkpoints, and the tiny models."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_configure(config):
    # Built-in checkpoints go to a per-session cache, never the user's.
    if "LAYERWISE_CACHE" not in os.environ:
        import tempfile

        os.environ["LAYERWISE_CACHE"] = tempfile.mkdtemp(prefix="layerwise-test-cache-")
    torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA GPUs")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_minimax():
    from layerwise.models import resolve_model

    return resolve_model("builtin:minimax-m2-tiny")


@pytest.fixture(scope="session")
def tiny_llama():
    from layerwise.models import resolve_model

    return resolve_model("builtin:llama-tiny")


@pytest.fixture(scope="session")
def smollm2_fp32():
    """The real SmolLM2 GGUF loaded once on the CPU in fp32 (sdpa): slow, shared by the tests that need it."""
    from layerwise import loading

    return loading.load_model("builtin:smollm2", loading.LoadOptions(device_map="cpu", dtype="fp32",
                                                                     attn_implementation="sdpa"), with_tokenizer=False)
