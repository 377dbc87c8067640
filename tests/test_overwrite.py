"""`--overwrite` never loses the old run (issue 13, class 4: data loss).

The new run is written beside the old one (`.RUN.replacing`) and swapped in when complete, so at
every moment RUN is one whole run: the old one, or the new one. Tested by SIGKILL at random
points of `import --overwrite` and `extract --overwrite` (subprocesses), a full disk (a file
size limit, and a tiny tmpfs where one can be mounted), a swap that fails and an old run that
cannot be removed. And no command writes into a run it reads: a report inside REF, CAND or the
baseline, a layer test's runs in or around its reference, an import into a directory holding
its source are refused before any work, the runs left byte for byte as they were.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from synthetic_runs import toy_run

from helpers import assert_one_line_error, run_cli
from layerwise import runs

MODEL = "builtin:minimax-m2-tiny"
ENV = dict(os.environ, PYTHONUNBUFFERED="1")


def _import_source(path, seed: int, prompts: int = 150):
    """An import source of `prompts` per-prompt directories (a few small tensors each)."""
    rng = np.random.default_rng(seed)
    for p in range(prompts):
        d = path / str(p)
        d.mkdir(parents=True)
        n = int(rng.integers(2, 6))
        np.save(d / "tokens.npy", rng.integers(0, 100, n))
        for layer in range(4):
            np.save(d / f"model.layers.{layer}.output.npy", rng.standard_normal((n, 16)).astype(np.float32))
    return path


def _state(run_dir):
    """The tensors a complete run lists, every one read and verified (raises if RUN is not one)."""
    run = runs.open_run(run_dir)
    for e in run.entries():
        run.tensor(e.name, e.prompt)
    return tuple((e.name, e.prompt, e.digests) for e in run.entries())


def _kill_during(cmd, staging, trigger: tuple) -> bool:
    """Start `cmd` and SIGKILL it when `trigger` fires: ("files", n) once the staging directory
    holds n tensor files, ("time", s) after s seconds, ("none",) never. True if it was killed
    before it ended."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start = time.time()
    while proc.poll() is None and time.time() - start < 180:
        kind = trigger[0]
        try:  # the staging directory may be swapped in while it is listed
            written = len(list(staging.glob("tensors/*/*.safetensors"))) if kind == "files" and staging.is_dir() else 0
        except FileNotFoundError:
            written = 0
        if (kind == "files" and written >= trigger[1]) or (kind == "time" and time.time() - start > trigger[1]):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    proc.wait()
    return False


def _triggers(rounds: int, files: int, seconds: float, seed: int) -> list[tuple]:
    """Random kill points: after a random number of the `files` files, at a random moment of the
    `seconds` a run takes (up to just after its end: the swap), and in every four rounds two
    (one of each command, alternated) none."""
    rng = random.Random(seed)
    return [("none",) if i % 4 >= 2 else ("files", rng.randint(0, files - 1)) if i % 2 else
            ("time", rng.uniform(0.1, 1.05) * seconds) for i in range(rounds)]


def _alternate(tmp_path, commands, states, triggers):
    """Overwrite RUN alternately with each command's run, killed at the given points; after every
    round RUN is whole and is one of the runs the commands make. Returns (kills, states seen)."""
    out = tmp_path / "run"
    staging = out.with_name(f".{out.name}.replacing")
    kills, seen = 0, set()
    for i, trigger in enumerate(triggers):
        kills += _kill_during(commands[i % len(commands)], staging, trigger)
        state = _state(out)
        assert state in states, f"round {i} ({trigger}): RUN holds neither complete run"
        seen.add(states.index(state))
    return kills, seen


@pytest.mark.slow
def test_import_overwrite_killed_at_random_points_keeps_a_whole_run(tmp_path):
    sources = [_import_source(tmp_path / f"src{k}", k) for k in range(2)]
    out = tmp_path / "run"
    commands = [[sys.executable, "-m", "layerwise", "import", str(s), "--out", str(out), "--overwrite"]
                for s in sources]
    states = []
    started = time.time()
    for cmd in commands:  # each run once, uninterrupted: what a complete RUN may hold
        subprocess.run(cmd, check=True, env=ENV, capture_output=True)
        states.append(_state(out))
    seconds = (time.time() - started) / 2
    assert states[0] != states[1]
    files = len(runs.open_run(out).entries())  # one tensor per file here
    kills, seen = _alternate(tmp_path, commands, states, _triggers(16, files, seconds, seed=13))
    rng, extra = random.Random(14), 0
    while kills < 6 and extra < 8:  # a busy machine starves the file-count poller: kill by the clock in more
        order = commands[extra % 2:] + commands[:extra % 2]  # rounds (the loaded command runs longer too)
        more, again = _alternate(tmp_path, order, states, [("time", rng.uniform(0.4, 0.95) * seconds)])
        kills, seen, extra = kills + more, seen | again, extra + 1
    assert kills >= 6, f"only {kills} of {16 + extra} rounds were killed before they ended"
    assert seen == {0, 1}, "the rounds never replaced the run"


@pytest.mark.slow
def test_extract_overwrite_killed_keeps_the_old_run_and_resumes(tmp_path):
    out = tmp_path / "run"
    base = [sys.executable, "-m", "layerwise", "extract", MODEL, "--out", str(out), "--overwrite",
            "--points", "residual,logits", "--batch-size", "1"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"prompt number {i} " + "word " * (i % 30) for i in range(40)) + "\n")
    old = base + ["--prompts", str(prompts), "--dtype", "fp32"]
    new = base + ["--prompts", str(prompts), "--dtype", "bf16"]
    subprocess.run(old, check=True, env=ENV, capture_output=True)
    before = _state(out)
    staging = out.with_name(f".{out.name}.replacing")
    files = len({e.file for e in runs.open_run(out).entries()})
    for trigger in [("files", 1), ("files", random.Random(3).randint(2, files - 10)), ("files", files - 10)]:
        killed = _kill_during(new, staging, trigger)
        assert killed, "the extract ended before the kill"
        assert _state(out) == before, "a killed --overwrite touched the old run"
    done = subprocess.run(new, env=ENV, capture_output=True, text=True)  # resumes in the staging directory
    assert done.returncode == 0, done.stderr
    after = _state(out)
    assert after != before and not staging.exists()
    assert json.loads((out / runs.MANIFEST).read_text())["settings"]["dtype"] == "bfloat16"


def _extract_args(out, *extra):
    return ["extract", MODEL, "--out", out, "--prompt", "x" * 300, "--points", "residual,logits", *extra]


def test_overwrite_on_a_full_disk_keeps_the_old_run(tmp_path, capsys):
    import resource

    out = tmp_path / "run"
    assert run_cli(capsys, *_extract_args(out, "--dtype", "fp32"))[0] == 0
    before = _state(out)

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    cmd = [sys.executable, "-m", "layerwise", *map(str, _extract_args(out, "--dtype", "bf16", "--overwrite"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit_file_size)
    assert_one_line_error(proc.returncode, proc.stderr, "is the disk full?")
    assert _state(out) == before


def test_overwrite_on_a_tiny_filesystem_keeps_the_old_run(tmp_path, capsys):
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = mount / "run"
        code, _, err = run_cli(capsys, *_extract_args(out, "--dtype", "fp32"))
        if code != 0:
            pytest.skip(f"the first run does not fit the tmpfs: {err}")
        before = _state(out)
        cmd = [sys.executable, "-m", "layerwise", *map(str, _extract_args(out, "--dtype", "bf16", "--overwrite")),
               "--prompt", "y" * 900]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert_one_line_error(proc.returncode, proc.stderr, "is the disk full?")
        assert _state(out) == before
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_failed_swap_keeps_both_runs(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert run_cli(capsys, *_extract_args(out, "--dtype", "fp32"))[0] == 0
    before = _state(out)

    def refuse(new, target):
        raise PermissionError(13, "Permission denied", str(target))

    monkeypatch.setattr(runs, "swap_directories", refuse)
    code, _, err = run_cli(capsys, *_extract_args(out, "--dtype", "bf16", "--overwrite"))
    assert_one_line_error(code, err, "cannot replace")
    assert _state(out) == before
    assert _state(tmp_path / ".run.replacing") != before  # the new run is whole beside it


def test_an_old_run_that_cannot_be_removed_is_one_line(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert run_cli(capsys, *_extract_args(out, "--dtype", "fp32"))[0] == 0
    real = shutil.rmtree

    def refuse(path, *a, **k):
        if str(path).endswith(".replacing"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(runs.shutil, "rmtree", refuse)
    code, _, err = run_cli(capsys, *_extract_args(out, "--dtype", "bf16", "--overwrite"))
    assert_one_line_error(code, err, "cannot be removed")
    assert json.loads((out / runs.MANIFEST).read_text())["settings"]["dtype"] == "bfloat16"
    assert _state(out)  # the new run is whole


def test_overwrite_refuses_a_directory_in_the_way(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(capsys, *_extract_args(out, "--dtype", "fp32"))[0] == 0
    (tmp_path / ".run.replacing").mkdir()
    (tmp_path / ".run.replacing" / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, *_extract_args(out, "--dtype", "bf16", "--overwrite"))
    assert_one_line_error(code, err, "is not a layerwise run")
    assert (tmp_path / ".run.replacing" / "notes.txt").read_text() == "mine"


def test_overwrite_into_an_unwritable_place_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, *_extract_args(blocker / "run"))
    assert_one_line_error(code, err, "cannot write the run")


def test_the_writer_swaps_runs_in_one_step(tmp_path):
    """The swap itself: afterwards RUN is the new run and the old one sits under the staging name."""
    from layerwise.atomic import swap_directories

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("new")
    (b / "x").write_text("old")
    swap_directories(a, b)
    assert (b / "x").read_text() == "new" and (a / "x").read_text() == "old"


# ------------------------------------------------------------------------- no writes into a run read

def _files(directory) -> dict:
    """Every file under `directory` (relative path -> bytes): a run as it lies on disk."""
    return {str(f.relative_to(directory)): f.read_bytes() for f in sorted(directory.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("toys")
    return {what: toy_run(root / what).path for what in ("REF", "CAND", "baseline")}


@pytest.mark.parametrize("flag, name", [("--json", "manifest.json"), ("--html", "r.html"),
                                        ("--plot", "tensors/p00000/r.png")])
@pytest.mark.parametrize("what", ["REF", "CAND", "baseline"])
def test_a_compare_report_inside_a_run_it_reads_is_refused(toy_runs, capsys, flag, name, what):
    before = {k: _files(v) for k, v in toy_runs.items()}
    target = toy_runs[what] / name
    code, _, err = run_cli(capsys, "compare", toy_runs["REF"], toy_runs["CAND"], "--baseline", toy_runs["baseline"],
                           flag, target)
    assert_one_line_error(code, err, f"{flag} {target} lies inside the {what} run")
    assert {k: _files(v) for k, v in toy_runs.items()} == before


def test_a_report_through_a_link_to_a_run_is_refused(toy_runs, tmp_path, capsys):
    (tmp_path / "link").symlink_to(toy_runs["CAND"])
    before = _files(toy_runs["CAND"])
    code, _, err = run_cli(capsys, "compare", toy_runs["REF"], toy_runs["CAND"], "--json", tmp_path / "link" / "r.json")
    assert_one_line_error(code, err, "lies inside the CAND run")
    assert _files(toy_runs["CAND"]) == before
    assert run_cli(capsys, "compare", toy_runs["REF"], toy_runs["CAND"], "--json", tmp_path / "r.json")[0] == 0


@pytest.fixture(scope="module")
def minimax_ref(tmp_path_factory):
    ref = tmp_path_factory.mktemp("minimax") / "ref"
    from layerwise.cli import main
    assert main(["extract", MODEL, "--out", str(ref), "--prompt", "Hi", "--dtype", "fp32"]) == 0
    return ref


def _layer_test_cases(ref, tmp):
    """(what, argv after `layerwise test MODEL`, fragment, the runs that must stay as they are)."""
    inside = tmp / "o" / "isolated"
    shutil.copytree(ref, inside)
    full = tmp / "f" / "full"
    shutil.copytree(ref, full)
    other = tmp / "other"
    shutil.copytree(ref, other)
    return [
        ("--out the reference", ["--reference", ref, "--out", ref, "--layer", "1"], "is a run directory", [ref]),
        ("--out inside the reference", ["--reference", ref, "--out", ref / "t", "--layer", "1"],
         "the test would write into its own reference", [ref]),
        ("the reference is --out's isolated run", ["--reference", inside, "--out", tmp / "o", "--layer", "1",
                                                   "--overwrite"], "the test would write into its own reference",
         [inside]),
        ("the reference is --out's full run", ["--reference", full, "--out", full.parent, "--test-type", "full"],
         "the test would write into its own reference", [full]),
        ("extract-all over the reference", ["--reference", ref, "--out", ref, "--test-type", "extract-all",
                                            "--overwrite"], "the test would write into its own reference", [ref]),
        ("--record-reference into --out's chained run", ["--record-reference", "--reference", tmp / "o2" / "chained",
                                                         "--out", tmp / "o2", "--prompt", "Hi"],
         "the test would write into its own reference", []),
        ("--out another run", ["--reference", ref, "--out", other, "--layer", "1"], "is a run directory", [other]),
        ("--json inside the reference", ["--reference", ref, "--out", tmp / "t", "--layer", "1", "--json",
                                         ref / "r.json"], "lies inside the reference run", [ref]),
        ("--html inside a candidate run", ["--reference", ref, "--out", tmp / "t", "--layer", "1", "--html",
                                           tmp / "t" / "isolated" / "r.html"], "lies inside the isolated candidate run",
         [ref]),
    ]


def test_a_layer_test_never_writes_into_its_reference(minimax_ref, tmp_path, capsys):
    for what, argv, fragment, kept in _layer_test_cases(minimax_ref, tmp_path):
        before = [_files(k) for k in kept]
        code, _, err = run_cli(capsys, "test", MODEL, *argv)
        assert_one_line_error(code, err, fragment)
        assert [_files(k) for k in kept] == before, what
    assert not (tmp_path / "o2").exists() and not (tmp_path / "t").exists()


def test_import_refuses_an_out_that_holds_its_source(tmp_path, capsys):
    """`import RUN/dump --out RUN --overwrite` would import the dump, then delete it with the old run."""
    out = tmp_path / "run"
    assert run_cli(capsys, *_extract_args(out, "--dtype", "fp32"))[0] == 0
    source = _import_source(out / "dump", seed=0, prompts=2)
    before = _files(out)
    for src, target in ((source, out), (source, source)):
        code, _, err = run_cli(capsys, "import", src, "--out", target, "--overwrite")
        assert_one_line_error(code, err, f"import source {src} lies in --out {target}")
        assert _files(out) == before
    inside = source / "imported"  # the other way round: the run among the source's tensors
    code, _, err = run_cli(capsys, "import", source, "--out", inside)
    assert_one_line_error(code, err, f"--out {inside} lies in the import source {source}")
    assert _files(out) == before and not inside.exists()
