"""Every command in docs/LAYER_TESTS.md runs as written, in order, on the CPU, and passes (exit 0)
as the doc says, unless its comment says exit 1."""

import re
import shlex
import shutil
from pathlib import Path

from layerwise.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "LAYER_TESTS.md"


def doc_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_layer_tests_doc_commands_run(tmp_path, monkeypatch, capsys):
    commands = doc_commands()
    assert len(commands) >= 5
    (tmp_path / "tests").mkdir()
    shutil.copy(ROOT / "tests" / "reference_minimax.py", tmp_path / "tests")
    monkeypatch.chdir(tmp_path)
    for line in commands:
        command, _, comment = line.partition("  #")
        argv = shlex.split(command)
        assert argv[0] == "layerwise"
        code = main(argv[1:])
        out, err = capsys.readouterr()
        expected = 1 if "exit 1" in comment else 0
        assert code == expected, f"{command!r} exited {code}, the doc says {expected}: {err}\n{out[-2000:]}"
        assert "Traceback" not in err
    assert (tmp_path / "runs" / "t-mine" / "isolated" / "manifest.json").is_file()
