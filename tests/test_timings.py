"""timings.py's start-up stages: when the process began (from /proc) and the stages it reached."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from layerwise import timings

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="no /proc here")
def test_process_start_is_when_the_process_began():
    """A fresh interpreter's start, from /proc, lies between its launch and its first line."""
    launched = time.time()
    code = (f"import time; first = time.time(); import sys; sys.path.insert(0, {SRC!r}); "
            "from layerwise import timings; print(first, timings.process_start_unix())")
    first, began = map(float, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                             check=True).stdout.split())
    tick = 0.02  # /proc counts in the kernel's clock ticks (10 ms)
    assert launched - tick <= began <= first + tick, (launched, began, first)


def test_stages_are_listed_in_time_order_each_at_its_last_time(monkeypatch):
    monkeypatch.setattr(timings, "_MARKS", {})
    for stage in ("imported", "model loaded", "imported", "run started"):
        timings.mark(stage)
        time.sleep(0.01)
    got = timings.startup()
    assert [s for s, _ in got["stages"]] == ["model loaded", "imported", "run started"], got
    seconds = [at for _, at in got["stages"]]
    assert seconds == sorted(seconds) and seconds[0] > 0, got  # since the process began, long before
    # without /proc: seconds since the first stage
    monkeypatch.setattr(timings, "process_start_unix", lambda: None)
    got = timings.startup()
    assert got["process_start_unix"] is None and got["stages"][0][1] == 0.0 and got["stages"][-1][1] >= 0.02, got
