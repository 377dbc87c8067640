"""Who computes what under torchrun (sharding.py, pure), torchrun's environment read
(distributed.detect), the one-rank session, and the one-line refusals that need no second
process (--tp alone, an architecture without a tensor-parallel plan)."""


import pytest

from layerwise import distributed, loading, recording
from layerwise.arguments import build_parser, fingerprint
from layerwise.distributed import Env, Session
from layerwise.errors import UserError
from layerwise.sharding import assign, deal, first_difference, rank_gpus

from helpers import assert_one_line_error, run_cli


@pytest.mark.parametrize("local_rank, ranks, gpus, per_rank, tp, want", [
    (0, 2, 0, None, False, ()),  # a CPU node: no GPU, whatever the ranks
    (1, 2, 8, None, False, (4, 5, 6, 7)),  # 8 GPUs over 2 ranks: a 4-GPU replica each
    (3, 8, 8, None, False, (3,)),
    (1, 3, 8, 2, False, (2, 3)),  # --gpus-per-rank 2: 6 of 8 GPUs used
    (2, 4, 4, None, True, (2,)),  # tensor parallel: GPU LOCAL_RANK
])
def test_rank_gpus(local_rank, ranks, gpus, per_rank, tp, want):
    assert rank_gpus(local_rank, ranks, gpus, per_rank, tp) == want


@pytest.mark.parametrize("ranks, gpus, per_rank, tp, fragment", [
    (3, 8, None, False, "3 ranks per node do not divide this node's 8 GPUs: start 1, 2, 4, 8 ranks per node"),
    (4, 2, None, False, "4 ranks per node do not divide this node's 2 GPUs"),
    (3, 8, 3, False, "--gpus-per-rank 3 x 3 ranks per node needs 9 GPUs, this node has 8"),
    (4, 2, None, True, "--tp: 4 ranks per node need 4 GPUs, this node has 2"),
])
def test_rank_gpus_refuses_a_layout_that_does_not_divide(ranks, gpus, per_rank, tp, fragment):
    with pytest.raises(UserError, match=fragment.replace("+", r"\+")):
        rank_gpus(0, ranks, gpus, per_rank, tp)


def test_assign_balances_whole_batches_and_keeps_their_order():
    weights = [64, 64, 40, 30, 8]  # tokens per batch, longest first (prompts.make_batches)
    shares = assign(weights, 2)
    assert sorted(i for s in shares for i in s) == [0, 1, 2, 3, 4]  # each batch once
    assert shares == [[0, 2], [1, 3, 4]]  # loads 104 and 102
    assert all(s == sorted(s) for s in shares)
    assert assign(weights, 2) == shares  # every rank computes the same
    assert assign([5, 5], 4) == [[0], [1], [], []]  # more ranks than batches: some idle


def test_layers_are_dealt_round_robin():
    assert deal(4, 3) == [[0, 3], [1], [2]]
    assert deal(62, 8)[0] == [0, 8, 16, 24, 32, 40, 48, 56] and deal(62, 8)[7] == [7, 15, 23, 31, 39, 47, 55]
    assert deal(2, 4) == [[0], [1], [], []]  # more ranks than layers: some idle
    assert sorted(i for part in deal(62, 8) for i in part) == list(range(62))


def test_first_difference_names_the_key():
    assert first_difference({"--out": "/a", "--batch-size": 2}, {"--out": "/a", "--batch-size": 1}) == "--batch-size 2 vs 1"


def test_detect_reads_torchrun_variables():
    assert distributed.detect({}) is None
    assert distributed.detect({"WORLD_SIZE": "1", "RANK": "0"}) is None  # torchrun --nproc-per-node 1: one process
    env = distributed.detect({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                              "GROUP_RANK": "1", "GROUP_WORLD_SIZE": "2", "MASTER_ADDR": "n0", "MASTER_PORT": "29500"})
    assert env == Env(3, 4, 1, 2, 1, 2, "n0:29500")
    assert env.where() == "rank 3 (node 1)" and Env(1, 2).where() == "rank 1"
    with pytest.raises(UserError, match="torchrun's environment is incomplete"):
        distributed.detect({"WORLD_SIZE": "2"})


def test_one_rank_session_is_the_identity():
    ranks = distributed.session()
    assert ranks.world == 1 and ranks.is_main
    assert ranks.broadcast(3) == 3 and ranks.all_gather("x") == ["x"] and ranks.gather(1) == [1]
    assert ranks.share([3, 2, 1]) == [0, 1, 2]
    assert ranks.main_first(lambda first: first) is True
    ranks.agree("anything", {"a": 1})
    ranks.settle(None)
    with pytest.raises(UserError, match="bad"):
        ranks.settle("bad")


def test_fingerprint_makes_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["extract", "builtin:minimax-m2-tiny", "--out", "run", "--prompts", "p.txt",
                                      "--batch-size", "2"])
    got = fingerprint(args)
    assert got["--out"] == str(tmp_path / "run") and got["--prompts"] == [str(tmp_path / "p.txt")]
    assert got["model"] == "builtin:minimax-m2-tiny" and got["--batch-size"] == 2 and got["command"] == "extract"


def test_model_identity_tells_models_apart(tiny_minimax, tiny_llama):
    a = recording.model_identity("builtin:minimax-m2-tiny")
    assert a == recording.model_identity(str(tiny_minimax.path))  # where its files are does not matter
    assert a != recording.model_identity("builtin:llama-tiny")
    assert a["weights"] and all(size > 0 for size in a["weights"].values())


def test_tp_without_torchrun_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(capsys, "extract", "builtin:minimax-m2-tiny", "--out", tmp_path / "r", "--prompt", "hi", "--tp")
    assert_one_line_error(code, err, "--tp splits the model over the ranks of a torchrun job")
    assert not (tmp_path / "r").exists()


def test_tp_of_an_architecture_transformers_cannot_split_is_one_line(monkeypatch, tiny_llama):
    from layerwise import models

    monkeypatch.setattr(distributed, "session", lambda: Session(Env(0, 2)))
    config = models.load_config(tiny_llama).config
    assert loading.check_tensor_parallel(config, None) == 2
    config.base_model_tp_plan = None
    with pytest.raises(UserError, match=r"transformers 5\.\d+ has no tensor-parallel plan for llama models: "
                                        "--tp cannot split them"):
        loading.check_tensor_parallel(config, None)
    monkeypatch.setattr(distributed, "session", lambda: Session(Env(0, 3)))
    config = models.load_config(tiny_llama).config
    with pytest.raises(UserError, match=r"--tp over 3 ranks: the attention heads \(4 query, 2 key/value\)"):
        loading.check_tensor_parallel(config, None)


def test_a_job_whose_other_ranks_never_come_fails_in_one_line(monkeypatch, capsys, tmp_path):
    """Rank 0 of a two-rank job alone: it waits --dist-timeout to be joined, then exit 1, one line."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    code, _, err = run_cli(capsys, "extract", "builtin:minimax-m2-tiny", "--out", tmp_path / "r", "--prompt", "hi",
                           "--dist-timeout", "2")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("layerwise: error: rank 0 could not join the other ranks at 127.0.0.1:") and "2 s" in err
    assert not (tmp_path / "r").exists()


_EXIT_PROBE = """
import atexit, concurrent.futures, sys, threading, time
from layerwise import distributed

out = sys.argv[1]
distributed._joined = sys.argv[2] == "joined"
concurrent.futures.ThreadPoolExecutor(1).submit(lambda: None).result()  # an idle worker, as the readers leave
threading.Thread(target=lambda: (time.sleep(0.3), open(out + "/thread", "w").write("done"))).start()
atexit.register(lambda: open(out + "/atexit", "w").write("ran"))


class Teardown:
    def __del__(self, open=open, path=out + "/teardown"):  # the builtins may be gone by then
        open(path, "w").write("ran")


mark = Teardown()  # freed only by the interpreter's teardown
sys.stdout.write("buffered")  # no newline: still in the pipe's buffer
if sys.argv[2] != "program":
    sys.argv[0] = "layerwise"  # the console script: a layerwise command (_boot.is_command)
if sys.argv[2] == "profiled":
    sys.setprofile(lambda *args: None)  # as cProfile does: it writes its data in the interpreter's exit
distributed.exit_process(3)
"""


@pytest.mark.parametrize("how", ["joined", "command", "program", "profiled"])
def test_exit_process_skips_only_the_interpreters_teardown(tmp_path, how):
    """A layerwise command (or rank) ends as the interpreter's exit would (its threads joined, idle
    executors included, the atexit functions run, the output flushed, the code kept), but without
    the teardown that costs every command time and in which a process group's thread can abort a
    rank; a program that calls layerwise, or a command under a profiler, exits as usual (the
    profiler writes what it measured then; a test runner calling it in-process lives on)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _EXIT_PROBE, str(tmp_path), how],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (3, "buffered"), done.stderr
    assert (tmp_path / "thread").read_text() == "done" and (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "teardown").exists() is (how in ("program", "profiled"))


def test_a_command_unpins_its_host_buffers_when_its_work_ended_whatever_the_verdict(monkeypatch, capsys, tmp_path):
    """A layerwise command (not a program calling it) makes its page-locked buffers pageable once
    its work ended, passed (0) or failed its verdict (1); never after an error (exit 2 here: a
    copy may still be in flight then)."""
    from layerwise import cli, shmbuffers

    unpinned = []
    monkeypatch.setattr(shmbuffers, "unpin_all", lambda: unpinned.append(1) or 0)
    assert cli.main(["plan", "builtin:minimax-m2-tiny", "--gpus", "1x80GB"]) == 0 and unpinned == []  # a program
    monkeypatch.setattr(cli._boot, "is_command", lambda: True)
    assert cli.main(["plan", "builtin:minimax-m2-tiny", "--gpus", "1x80GB"]) == 0 and unpinned == [1]
    assert cli.main(["plan", "builtin:minimax-m2", "--gpus", "1x1GB"]) == 1 and unpinned == [1, 1]  # does not fit
    assert cli.main(["plan", str(tmp_path / "nothing")]) == 2 and unpinned == [1, 1]
    monkeypatch.setattr(shmbuffers, "unpin_all", lambda: (_ for _ in ()).throw(RuntimeError("CUDA error: sticky")))
    assert cli.main(["plan", "builtin:minimax-m2-tiny", "--gpus", "1x80GB"]) == 0  # the teardown frees them then
    capsys.readouterr()


def test_exit_process_in_a_program_raises_system_exit():
    """Called in-process (a program, this test runner), the exit is Python's: catchable."""
    with pytest.raises(SystemExit) as exit_info:
        distributed.exit_process(4)
    assert exit_info.value.code == 4
