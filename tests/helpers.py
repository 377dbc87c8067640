"""Test helpers: copies of the tiny checkpoint to break on purpose, CLI runner."""

from __future__ import annotations

import shutil
from pathlib import Path

from layerwise.cli import main


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, fragment: str) -> None:
    assert code == 2, f"exit {code}, stderr: {err!r}"
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert "Traceback" not in err
    assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def assert_runs_equal(a, b, exclude_roles: tuple[str, ...] = ()) -> int:
    """Two runs hold the same tensors (name, prompt, shape, dtype) with the same bits. The message
    names the first difference with its statistics. Returns how many tensors were compared."""
    import torch

    keys_a = {(e.name, e.prompt) for e in a.entries() if e.role not in exclude_roles}
    keys_b = {(e.name, e.prompt) for e in b.entries() if e.role not in exclude_roles}
    assert keys_a == keys_b, (f"tensors differ: only in A {sorted(keys_a - keys_b)[:3]}, "
                              f"only in B {sorted(keys_b - keys_a)[:3]}")
    differ = []
    for name, prompt in sorted(keys_a):
        x, y = a.tensor(name, prompt), b.tensor(name, prompt)
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
            stats = ""
            if x.shape == y.shape and x.is_floating_point():
                d = (x.double() - y.double())
                stats = (f": max |diff| {d.abs().max().item():.3e}, "
                         f"rel_l2 {(d.norm() / x.double().norm().clamp_min(1e-300)).item():.3e}")
            differ.append(f"{name} prompt {prompt} ({x.dtype} {tuple(x.shape)} vs {y.dtype} {tuple(y.shape)}){stats}")
    assert not differ, f"{len(differ)} of {len(keys_a)} tensors differ; first: {differ[0]}"
    return len(keys_a)
