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
