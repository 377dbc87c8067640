"""Shared fixtures: a private cache for built-in checkpoints, and the tiny models."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch


_RUNS = Path(__file__).resolve().parents[1] / "runs"


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    """The suite writes only under pytest's own temporary directory: the system temp dir (for this
    process and every subprocess it starts) and the built-in checkpoint cache are moved there."""
    base = config._tmp_path_factory.getbasetemp()
    temp = base / "system-temp"
    temp.mkdir(exist_ok=True)
    tempfile.tempdir = str(temp)
    os.environ["TMPDIR"] = str(temp)
    # Built-in checkpoints go to a per-session cache, never the user's.
    os.environ.setdefault("LAYERWISE_CACHE", str(base / "layerwise-cache"))
    config._runs_before = _RUNS.exists()
    torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_sessionfinish(session, exitstatus):
    """A test that wrote the repository's runs/ (a command run as written, without a tmp_path) fails the suite."""
    if _RUNS.exists() and not getattr(session.config, "_runs_before", True):
        session.config.pluginmanager.get_plugin("terminalreporter").write_line(
            f"FAILED: the suite created {_RUNS}: a test wrote outside its tmp_path", red=True)
        session.exitstatus = 1


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
