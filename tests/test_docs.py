"""Every command in docs/MULTI_GPU_GUIDE.md runs as written, with the exit code it states, on a
machine without GPUs (those marked `# GPU` need GPUs and are left out; `torchrun` is this
interpreter's `python -m torch.distributed.run`). The commands run in a private directory: the
guide's `/tmp/...` paths and relative outputs land there, not in /tmp or the repository."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from layerwise import machine
from layerwise.cli import main

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "MULTI_GPU_GUIDE.md"


def guide_commands():
    text = GUIDE.read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.strip()
            if line and not line.endswith("# GPU"):
                lines.append(line)
    return lines


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One directory for the whole guide: later commands read what earlier ones wrote."""
    return tmp_path_factory.mktemp("guide")


def test_guide_has_commands():
    assert len(guide_commands()) >= 10


@pytest.mark.parametrize("line", guide_commands())
def test_guide_command_runs(line, capsys, monkeypatch, workdir):
    command, _, comment = line.partition("  #")
    command = command.strip().replace("/tmp/", f"{workdir}/").replace("/tmp ", f"{workdir} ")
    expected = 1 if "exit 1" in comment else 0
    monkeypatch.chdir(workdir)
    if not command.startswith("layerwise "):
        if command.startswith("python "):  # the repository's scripts, with this interpreter
            script, _, rest = command[len("python "):].partition(" ")
            command = f"{shlex.quote(sys.executable)} {shlex.quote(str(ROOT / script))} {rest}"
        if command.startswith("torchrun "):  # torchrun of this interpreter
            command = f"{shlex.quote(sys.executable)} -m torch.distributed.run {command[len('torchrun '):]}"
        done = subprocess.run(["bash", "-c", command], cwd=workdir, capture_output=True, text=True)
        assert done.returncode == expected, f"{command!r} exited {done.returncode}: {done.stderr[-2000:]}"
        return
    monkeypatch.setattr(machine, "gpus", lambda: [])
    code = main(shlex.split(command)[1:])
    out, err = capsys.readouterr()
    assert code == expected, f"{command!r} exited {code}, the guide says {expected}: {err}"
    assert "Traceback" not in err
    if "4x80GB" in command and "minimax-m2 " in command + " ":
        assert code == 1 and "does NOT fit" in out
