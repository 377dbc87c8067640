"""The commands in docs/COMPARE.md run as written, with the exit codes it states."""

import re
import shlex
from pathlib import Path

from layerwise.cli import main

DOC = Path(__file__).parents[1] / "docs" / "COMPARE.md"


def test_compare_doc_commands_run(tmp_path, monkeypatch, capsys):
    block = re.search(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S).group(1)
    lines = [line.strip() for line in block.splitlines() if line.strip()]
    assert sum(line.startswith("layerwise compare") for line in lines) >= 4
    monkeypatch.chdir(tmp_path)
    for line in lines:
        command, _, comment = line.partition("  #")
        code = main(shlex.split(command)[1:])
        out, err = capsys.readouterr()
        expected = 1 if "exit 1" in comment else 0
        assert code == expected, f"{command!r} exited {code}: {err}"
    assert (tmp_path / "runs" / "report.json").is_file() and (tmp_path / "runs" / "report.html").is_file()
    assert (tmp_path / "runs" / "fp32-vs-bf16.png").stat().st_size > 10_000
