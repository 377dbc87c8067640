"""layerwise under torchrun, with real processes (gloo on the CPU): data-parallel extract and
layer tests equal to one process, tensor for tensor; 2 "nodes" on localhost; the tensor-parallel
candidate; `check`; and the bad input: a layout that does not divide the GPUs, ranks given
different commands, a rank that dies or hangs (one line on rank 0, never a hang, nothing that
looks complete, a rerun resumes).

One process is compared at one thread: torch's CPU kernels give other bits with other thread
counts, and torchrun starts each rank with OMP_NUM_THREADS=1."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from layerwise.cli import main
from layerwise.runs import open_run

from helpers import PROMPTS, assert_runs_equal

MODEL = "builtin:minimax-m2-tiny"
HOOKS = Path(__file__).resolve().parent / "torchrun_hooks"
TIMEOUT = "60"  # --dist-timeout: the tests that wait for it pass their own, shorter one
EXTRACT = ["--batch-size", "2", "--dtype", "fp32"]


def torchrun(cwd: Path, *args, nproc: int = 2, env: dict | None = None, timeout: int = 300):
    """`python -m torch.distributed.run --standalone --nproc-per-node N -m layerwise ARGS`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "layerwise", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=_env(env), capture_output=True, text=True, timeout=timeout)


def two_nodes(cwd: Path, args0, args1, timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """Two torchrun "nodes" of one rank each on localhost (static rendezvous over loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
                               "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}",
                               "-m", "layerwise", *map(str, args)], cwd=cwd, env=_env(None), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for node, args in enumerate((args0, args1))]
    done = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def _env(extra: dict | None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join([str(HOOKS), *filter(None, [env.get("PYTHONPATH")])])
    return env


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("layerwise: error")]


def one_thread(argv: list) -> int:
    """`layerwise ARGV` in this process at one thread, as each torchrun rank computes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main([str(a) for a in argv])
    finally:
        torch.set_num_threads(threads)


def sha256s(run: Path) -> dict:
    return {(e.name, e.prompt): e.digests for e in open_run(run).entries()}


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_minimax):
    """Prompts of uneven lengths (5 prompts, batches of 2: 3 batches) and one process's runs."""
    work = tmp_path_factory.mktemp("torchrun")
    (work / "prompts.txt").write_text("\n".join(PROMPTS + ["x y"]) + "\n")
    assert one_thread(["extract", MODEL, "--out", work / "ref", "--prompts", work / "prompts.txt", *EXTRACT]) == 0
    assert one_thread(["test", MODEL, "--reference", work / "ref", "--test-type", "single", "--layer", "all",
                       "--dtype", "bf16", "--out", work / "test1", "--json", work / "test1.json"]) in (0, 1)
    return work


def test_data_parallel_extract_equals_one_process(work, tmp_path):
    """2 ranks write the one-process run, tensor for tensor, and each leaves the job for real: no
    gloo thread is left as its process exits (the model's imports, after the process group
    started, once kept the group alive, and a rank sometimes aborted in the interpreter's teardown
    after a complete run)."""
    threads = tmp_path / "threads"
    threads.mkdir()
    done = torchrun(tmp_path, "extract", MODEL, "--out", "dp", "--prompts", work / "prompts.txt", *EXTRACT,
                    "--dist-timeout", TIMEOUT, env={"LAYERWISE_TEST_THREADS_AT_EXIT": str(threads)})
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        names = (threads / f"rank{rank}.txt").read_text().split()
        assert names and not [n for n in names if "gloo" in n], names
    assert done.stdout.count("wrote run dp: 5 prompts") == 1 and "2 ranks" in done.stdout  # rank 0 alone reports
    assert sha256s(tmp_path / "dp") == sha256s(work / "ref")
    assert_runs_equal(open_run(work / "ref"), open_run(tmp_path / "dp"))
    ranks = open_run(tmp_path / "dp").manifest["stats"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["files"] > 0 for r in ranks)  # both computed batches
    for r in ranks:  # each rank's start-up, stage by stage
        assert [s for s, _ in r["startup"]["stages"]] == ["imported", "joined", "agreed", "model loaded",
                                                         "run started", "forward done", "capture closed",
                                                         "files written"], r["startup"]


def test_streamed_extract_on_four_ranks_one_idle(work, tmp_path):
    """3 batches over 4 ranks: one rank computes nothing and still joins the run; --stream on
    every rank gives the very tensors of a whole-model extract."""
    done = torchrun(tmp_path, "extract", MODEL, "--out", "dp", "--prompts", work / "prompts.txt", *EXTRACT,
                    "--stream", "--device", "cpu", "--dist-timeout", TIMEOUT, nproc=4)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sha256s(tmp_path / "dp") == sha256s(work / "ref")
    files = [r["files"] for r in open_run(tmp_path / "dp").manifest["stats"]["ranks"]]
    assert sorted(files)[0] == 0 and sum(files) == len({e["file"] for e in open_run(work / "ref").manifest["tensors"]})


def test_overwrite_under_torchrun_keeps_the_old_run_until_the_new_one_is_whole(work, tmp_path):
    """--overwrite of a different run by 2 ranks: both write beside the old run (rank 0 prepared
    the place and told rank 1), rank 0 swaps it in after the manifest; the result is the one-process
    run, and nothing is left beside it."""
    old = tmp_path / "dp"
    assert one_thread(["extract", MODEL, "--out", old, "--prompt", "something else", *EXTRACT]) == 0
    done = torchrun(tmp_path, "extract", MODEL, "--out", "dp", "--prompts", work / "prompts.txt", *EXTRACT,
                    "--overwrite", "--dist-timeout", TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sha256s(old) == sha256s(work / "ref")
    assert all(r["files"] > 0 for r in open_run(old).manifest["stats"]["ranks"])  # both ranks wrote into it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dp"]  # no staging directory left


def test_nan_from_every_rank_reaches_the_manifest(tiny_minimax, tmp_path):
    """A model that produces NaN, one prompt per rank: the manifest lists the NaN of both ranks'
    prompts, and rank 0 alone says so, once (rank 1 prints nothing)."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_minimax.path, ckpt)
    name = "model.layers.2.self_attn.o_proj.weight"
    shard = ckpt / json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(shard)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    done = torchrun(tmp_path, "extract", ckpt, "--out", "dp", "--prompt", "hello there", "--prompt", "Hi",
                    "--batch-size", "1", "--dtype", "fp32", "--dist-timeout", TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    found = open_run(tmp_path / "dp").manifest["nonfinite"]
    assert {e["prompt"] for e in found} == {0, 1} and found[0]["name"].startswith("model.layers.2.")
    warnings = [line for line in done.stderr.splitlines() if "NaN/Inf" in line]
    assert len(warnings) == 1 and f"first at {found[0]['name']} (layer 2), prompt 0" in warnings[0], done.stderr


def _isolation(path: Path) -> list:
    return json.loads(path.read_text())["isolation"]


def _reports(path: Path) -> dict:
    """A layer test's --json without what differs by where and how fast it ran: the runs' paths,
    the seconds, and the bytes read (the same bytes, counted per rank)."""
    data = json.loads(path.read_text())
    for report in data["reports"].values():
        assert report["stats"]["bytes_read"] > 0 and report["rows"]
        del report["stats"], report["reference"], report["candidate"]
    del data["reference"], data["runs"]
    return data


def test_data_parallel_layer_tests_equal_one_process(work, tmp_path):
    """4 layers dealt over 3 ranks (0 and 3 to rank 0, 1 to rank 1, 2 to rank 2): the chain
    crosses a rank boundary at every layer and comes back to rank 0. bf16 candidates, so the
    errors compared are not all zero. Rank 0 posts its first layer's outputs late, so rank 1 runs
    isolated batches of its layer before its chain, and still every tensor is the same."""
    done = torchrun(tmp_path, "test", MODEL, "--reference", work / "ref", "--test-type", "single", "--layer", "all",
                    "--dtype", "bf16", "--out", "dp", "--json", "dp.json",
                    "--dist-timeout", TIMEOUT, nproc=3, env={"LAYERWISE_TEST_LATE_POST": "0:2"})
    assert done.returncode in (0, 1), done.stderr[-3000:]
    for kind in ("isolated", "chained"):
        assert sha256s(tmp_path / "dp" / kind) == sha256s(work / "test1" / kind), kind
    assert _isolation(tmp_path / "dp.json") == _isolation(work / "test1.json")
    assert any(row["isolated_rel_l2"] for row in _isolation(work / "test1.json"))
    # every rank compared its share of the prompts; rank 0's report is one process's, row for row
    assert _reports(tmp_path / "dp.json") == _reports(work / "test1.json")
    one = json.loads((work / "test1.json").read_text())["reports"]["isolated"]["stats"]["bytes_read"]
    assert json.loads((tmp_path / "dp.json").read_text())["reports"]["isolated"]["stats"]["bytes_read"] == one
    ranks = json.loads((tmp_path / "dp" / "isolated" / "manifest.json").read_text())["stats"]["ranks"]
    assert all(r["build_seconds"] > 0 and r["compute_seconds"] > 0 and "read_wait_seconds" in r for r in ranks), ranks
    assert all("chain_wait_seconds" in r for r in ranks[1:]), ranks  # ranks 1 and 2 receive the chain
    dealt = [{layer for phase, layer, _, _ in r["timeline"] if phase == "build"} for r in ranks]
    assert dealt == [{0, 3}, {1}, {2}], dealt  # each rank's timeline names its own layers
    for r in ranks:  # each rank's start-up, stage by stage, all of it before its replay
        stages = r["startup"]["stages"]
        assert [s for s, _ in stages] == ["imported", "joined", "agreed", "reference opened", "layers opened",
                                          "reference checked", "runs started", "layers computed", "capture closed",
                                          "files written"], stages
        replay_began = r["timeline_origin_unix"] - r["startup"]["process_start_unix"]
        assert stages[-4][1] <= replay_began + 0.02 < stages[-3][1], r  # the start-up before the replay, its end after
    # on one clock (the ranks' unix origins), the chain runs layer after layer across the ranks
    chain = sorted((r["timeline_origin_unix"] + start, r["timeline_origin_unix"] + end, layer)
                   for r in ranks for phase, layer, start, end in r["timeline"] if phase == "chain")
    assert [layer for _, _, layer in chain] == [0, 1, 2, 3], chain
    assert all(later[0] > earlier[1] - 0.01 for earlier, later in zip(chain, chain[1:])), chain
    one = {(phase, layer): start for phase, layer, start, _ in ranks[1]["timeline"][::-1]}  # the first of each
    assert one[("compute", 1)] < one[("chain", 1)], ranks[1]["timeline"]  # isolated work while the chain was late
    assert [p for p, layer, _, _ in ranks[0]["timeline"] if layer == 0 and p in ("chain", "determinism")] == \
        ["chain", "determinism"]  # rank 0 checks determinism after sending the chain on
    assert all(any(p == "connect" for p, _, _, _ in r["timeline"]) for r in ranks)
    assert done.stdout.count("isolated: each layer fed the reference's recorded input") == 1


def test_one_read_test_shares_the_batches_over_the_ranks(work, tmp_path):
    """`test --record-reference` on 2 ranks: each streams every layer over its share of the 3
    batches and records into the same reference and test runs, which equal one process's (one
    thread) tensor for tensor; rank 0 alone reports."""
    args = ["test", MODEL, "--record-reference", "--reference", "ref", "--prompts", work / "prompts.txt",
            "--batch-size", "2", "--layer", "all", "--dtype", "fp32", "--device", "cpu", "--out", "t",
            "--json", "t.json"]
    one = tmp_path / "one"
    one.mkdir()
    cwd = os.getcwd()
    os.chdir(one)
    try:
        assert one_thread(args) == 0
    finally:
        os.chdir(cwd)
    done = torchrun(tmp_path, *args, "--dist-timeout", TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    for run in ("ref", "t/isolated", "t/chained"):
        assert sha256s(tmp_path / run) == sha256s(one / run), run
    ranks = open_run(tmp_path / "t" / "isolated").manifest["stats"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["files"] > 0 for r in ranks)  # both computed batches
    assert done.stdout.count("recorded in the same read of the checkpoint") == 1
    assert _isolation(tmp_path / "t.json") == _isolation(one / "t.json")
    assert _reports(tmp_path / "t.json") == _reports(one / "t.json")


def test_two_nodes_on_localhost(work, tmp_path):
    """`--nnodes 2 --node-rank 0/1` over loopback, one rank each, one shared run directory: the
    layer tests (each node every other layer, the chain crossing nodes at every layer) equal one process."""
    args = ["test", MODEL, "--reference", work / "ref", "--test-type", "single", "--layer", "all", "--dtype", "bf16",
            "--out", tmp_path / "dp", "--json", tmp_path / "dp.json", "--dist-timeout", TIMEOUT]
    node0, node1 = two_nodes(tmp_path, args, args)
    assert node0.returncode in (0, 1) and node1.returncode == 0, node0.stderr[-2000:] + node1.stderr[-2000:]
    for kind in ("isolated", "chained"):
        assert sha256s(tmp_path / "dp" / kind) == sha256s(work / "test1" / kind), kind
    assert _isolation(tmp_path / "dp.json") == _isolation(work / "test1.json")
    assert node1.stdout == ""  # rank 0 reports


def test_tensor_parallel_candidate(work, tmp_path):
    """--tp: the ranks share one model (transformers' tp_plan="auto", gloo); rank 0 writes a run
    that compares with the one-process run like any candidate: other reduction orders, so close
    (fp32), not equal."""
    done = torchrun(tmp_path, "extract", MODEL, "--out", "tp", "--prompts", work / "prompts.txt", *EXTRACT, "--tp",
                    "--dist-timeout", TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 ranks, tensor parallel" in done.stdout
    run = open_run(tmp_path / "tp")
    assert run.manifest["settings"]["tensor_parallel"] == 2
    assert set(sha256s(tmp_path / "tp")) == set(sha256s(work / "ref"))
    code = main(["compare", str(work / "ref"), str(tmp_path / "tp"), "--max-rel-l2", "1e-5", "--json",
                 str(tmp_path / "c.json")])
    report = json.loads((tmp_path / "c.json").read_text())
    assert code == 0 and all(r["flips"] == 0 for r in report["routing"] if "flips" in r), report["routing"][:2]


def test_check_reports_the_job(tmp_path):
    done = torchrun(tmp_path, "check", "--cpu", "--dist-timeout", TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if "distributed" in line)
    assert "PASS" in line and "2 ranks on 1 node(s)" in line and "backend gloo" in line
    assert done.stdout.count("distributed") == 1


def test_a_layout_that_does_not_divide_the_gpus(tmp_path):
    """2 ranks on a node that shows 3 GPUs: exit 2 on every rank, one line on rank 0, nothing written."""
    done = torchrun(tmp_path, "extract", MODEL, "--out", "r", "--prompt", "hi", "--dist-timeout", TIMEOUT,
                    env={"LAYERWISE_TEST_GPUS": "3"})
    assert done.returncode != 0
    assert error_lines(done.stderr) == ["layerwise: error: 2 ranks per node do not divide this node's 3 GPUs: "
                                        "start 1, 3 ranks per node (torchrun --nproc-per-node), or give each rank "
                                        "--gpus-per-rank K GPUs with 2 x K <= 3"]
    assert "exitcode  : 2" in done.stderr and not (tmp_path / "r").exists()


def test_ranks_given_different_commands(work, tmp_path):
    args = ["extract", MODEL, "--out", tmp_path / "r", "--prompts", work / "prompts.txt", "--dist-timeout", TIMEOUT]
    node0, node1 = two_nodes(tmp_path, [*args, "--batch-size", "1"], [*args, "--batch-size", "2"])
    assert node0.returncode != 0 and node1.returncode != 0
    assert error_lines(node0.stderr) == ["layerwise: error: ranks disagree on the command: rank 1 (node 1) has "
                                         "--batch-size 2 vs 1 (rank 0's last): start every rank with the same "
                                         "command, model and files"]
    assert error_lines(node1.stderr) == [] and not (tmp_path / "r").exists()


def test_a_rank_that_dies_leaves_nothing_complete_and_a_rerun_resumes(work, tmp_path):
    args = ["extract", MODEL, "--out", "dp", "--prompts", work / "prompts.txt", *EXTRACT, "--dist-timeout", TIMEOUT]
    done = torchrun(tmp_path, *args, env={"LAYERWISE_TEST_FAULT": "die", "LAYERWISE_TEST_RANK": "1"})
    assert done.returncode != 0
    lines = error_lines(done.stderr)
    assert len(lines) == 1, done.stderr[-3000:]
    assert not (tmp_path / "dp" / "manifest.json").exists() and (tmp_path / "dp" / "intent.json").exists()
    again = torchrun(tmp_path, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already on disk" in again.stdout
    assert sha256s(tmp_path / "dp") == sha256s(work / "ref")


def test_a_rank_that_dies_in_the_chain_of_a_layer_test(work, tmp_path):
    """Rank 1 is killed as it hands layer 1 on; rank 0, waiting for that layer's outputs (or
    polling for them between isolated batches), ends in one line, exit 1, no hang, no manifest."""
    done = torchrun(tmp_path, "test", MODEL, "--reference", work / "ref", "--test-type", "single", "--layer", "all",
                    "--out", "dp", "--dist-timeout", TIMEOUT, timeout=150,
                    env={"LAYERWISE_TEST_FAULT": "die", "LAYERWISE_TEST_RANK": "1", "LAYERWISE_TEST_FAULT_AT": "chain"})
    assert done.returncode != 0
    lines = error_lines(done.stderr)
    # rank 0 names rank 1, or (when torchrun's SIGTERM comes first) says so, and torchrun's own report
    # names rank 1 as the root cause
    assert len(lines) == 1 and ("rank 1" in lines[0] or "stopped by SIGTERM" in lines[0]), done.stderr[-3000:]
    assert "rank      : 1" in done.stderr or "rank 1" in lines[0]
    assert not any((tmp_path / "dp" / kind / "manifest.json").exists() for kind in ("isolated", "chained"))


def test_a_rank_that_fails_is_reported_by_rank_0(work, tmp_path):
    done = torchrun(tmp_path, "extract", MODEL, "--out", "dp", "--prompts", work / "prompts.txt", *EXTRACT,
                    "--dist-timeout", TIMEOUT, env={"LAYERWISE_TEST_FAULT": "fail", "LAYERWISE_TEST_RANK": "1"})
    assert done.returncode != 0
    assert error_lines(done.stderr) == ["layerwise: error: rank 1 failed: cannot write tensors/p00001: No space left "
                                        "on device (test); a run being written keeps no manifest: rerun the same "
                                        "command to resume"], done.stderr[-3000:]
    assert not (tmp_path / "dp" / "manifest.json").exists()


def test_a_rank_that_hangs_is_given_up_after_the_timeout(work, tmp_path):
    done = torchrun(tmp_path, "extract", MODEL, "--out", "dp", "--prompts", work / "prompts.txt", *EXTRACT,
                    "--dist-timeout", "5", env={"LAYERWISE_TEST_FAULT": "hang", "LAYERWISE_TEST_RANK": "1"},
                    timeout=120)
    assert done.returncode != 0
    lines = error_lines(done.stderr)
    assert len(lines) == 1 and "another rank died, hangs or cannot be reached" in lines[0], done.stderr[-3000:]
    assert "--dist-timeout 5 s" in lines[0]
    assert not (tmp_path / "dp" / "manifest.json").exists()


def test_a_candidate_that_raises_is_one_line_on_rank_0(work, tmp_path):
    """A --candidate whose forward raises on rank 1's layer 1 (rank 0's layer 0 runs, then waits
    for it): exit 1, one line on rank 0 naming the candidate's own error and where it came from, no
    layerwise traceback (torchrun's traceback of its own ChildFailedError comes after)."""
    factory = tmp_path / "broken.py"
    factory.write_text("from torch import nn\n\n\nclass Same(nn.Module):\n    def forward(self, hidden_states, **kw):\n"
                       "        return hidden_states\n\n\nclass Broken(nn.Module):\n"
                       "    def forward(self, hidden_states, **kw):\n        raise RuntimeError('my forward is broken')\n\n\n"
                       "def build(config, index, weights):\n    return Broken() if index == 1 else Same()\n")
    done = torchrun(tmp_path, "test", MODEL, "--reference", work / "ref", "--test-type", "single", "--layer", "all",
                    "--out", "dp", "--candidate", f"{factory}:build", "--dist-timeout", TIMEOUT)
    assert done.returncode == 1, done.stderr[-3000:]
    lines = error_lines(done.stderr)
    assert len(lines) == 1 and "layer 1 raised: RuntimeError: my forward is broken (at " in lines[0], done.stderr[-3000:]
    assert not re.search(r'File "[^"]*layerwise/[\w/]+\.py"', done.stderr), done.stderr[-3000:]
    assert not (tmp_path / "dp" / "isolated" / "manifest.json").exists()
