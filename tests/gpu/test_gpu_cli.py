"""Every command that touches the GPU, as a user runs it: a fresh process on a GPU machine (CUDA
not yet initialised), exit code as documented, never a traceback. (The same commands' bad-input
paths are tested on the CPU; each fresh process costs seconds of start-up here.)"""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.gpu
TINY, FP8 = "builtin:minimax-m2-tiny", "builtin:minimax-m2-tiny-fp8"


def lw(*argv, codes=(0,), cwd=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, "-m", "layerwise", *map(str, argv)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode in codes, f"exit {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout


@pytest.mark.timeout(450)  # thirteen fresh processes, each importing torch and initialising CUDA
def test_every_command_in_a_fresh_process(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\nHi\na b c d e f g h i j k l m n o p q r s t\n")
    out = lw("check", TINY)
    assert "PASS  gpus" in out
    lw("plan", "builtin:minimax-m2", "--gpus", "8x80GB")
    assert "cuda:0" in lw("load", TINY, "--device-map", "cuda:0")
    lw("extract", TINY, "--out", tmp_path / "ref", "--prompts", prompts, "--points", "residual,attn,mlp,router,logits",
       "--device-map", "cuda:0")
    out = lw("extract", TINY, "--out", tmp_path / "stream", "--prompts", prompts,
             "--points", "residual,attn,mlp,router,logits", "--stream")
    assert "peak device memory" in " ".join(out.split())  # the line wraps at the terminal's width
    lw("compare", tmp_path / "ref", tmp_path / "stream", "--max-rel-l2", "0")
    lw("test", TINY, "--reference", tmp_path / "ref", "--layer", "all", "--out", tmp_path / "t1", "--max-rel-l2", "0")
    lw("test", TINY, "--reference", tmp_path / "ref", "--test-type", "full", "--stream", "--out", tmp_path / "t4",
       "--max-rel-l2", "0")
    # FP8: the reference dequantized, the candidate in W8A8 (scaled_mm cannot take the tiny 16x16 blocks: emulation)
    lw("check", FP8)
    lw("extract", FP8, "--out", tmp_path / "fp8ref", "--prompts", prompts, "--points", "residual,router", "--stream")
    # 0 or 1 are both right for the FP8 candidate (its error against the bf16 tolerances); 2 or a crash are not
    out = lw("test", FP8, "--reference", tmp_path / "fp8ref", "--layer", "all", "--quant", "fp8", "--out", tmp_path / "t6",
             codes=(0, 1))
    assert "propagated" in out
