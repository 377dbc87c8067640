"""Flags that would change nothing beside the others given: one line naming the flag and why,
exit 2, before any model or run is opened; and the combinations where each takes effect go on."""

import pytest
from helpers import assert_one_line_error, run_cli

from layerwise import arguments, combinations

MODEL = "builtin:minimax-m2-tiny"
FP8 = "builtin:minimax-m2-tiny-fp8"
TEST = ["test", MODEL, "--reference", "no-such-run"]  # refused before the reference is opened
EXTRACT = ["extract", MODEL, "--out", "no-such-dir", "--prompt", "hi"]

IDLE = [
    (TEST + ["--test-type", "single", "--points", "nonsense"], "--points is for --test-type extract-all and "
                                                               "--record-reference; single runs the reference's own"),
    (TEST + ["--layers", "0-1"], "--layers is for --test-type multi, full and extract-all; single tests --layer"),
    (TEST + ["--prompt", "hi"], "--prompt is for --test-type extract-all and --record-reference"),
    (TEST + ["--batch-size", "2"], "--batch-size is for --test-type extract-all"),
    (TEST + ["--test-type", "full", "--points", "residual"], "full runs the reference's own prompts and capture"),
    (TEST + ["--test-type", "multi", "--layer", "1"], "--layer picks --test-type single's layer; multi takes --layers"),
    (TEST + ["--stream"], "--stream is for --test-type full and extract-all; single always loads one layer"),
    (TEST + ["--test-type", "full", "--deterministic"], "--deterministic is for --test-type single and multi"),
    (TEST + ["--test-type", "extract-all", "--candidate", "x.py:f"], "--candidate replaces one decoder layer"),
    (TEST + ["--test-type", "full", "--device", "cuda:3"], "--device is where single, multi and --stream run; full "
                                                          "loads the whole model where --device-map puts it"),
    (TEST + ["--test-type", "full", "--stream", "--device-map", "auto"], "--device-map places a whole model over "
                                                                          "the GPUs, and --stream runs one layer"),
    (TEST + ["--max-memory", "1GB"], "--max-memory places a whole model over the GPUs, and single runs one layer"),
    (TEST + ["--device", "cpu", "--device-map", "cuda:1"], "--device-map places a whole model"),
    (TEST + ["--quant", "dequantize", "--fp8-backend", "emulate"], "--fp8-backend is the arithmetic of --quant fp8, "
                                                                   "and --quant dequantize is given"),
    (TEST + ["--test-type", "full", "--record-reference", "--device", "cpu"], "--record-reference is for"),
    (EXTRACT + ["--device", "cuda:3"], "--device is where --stream (or --engine llama.cpp) runs"),
    (EXTRACT + ["--stream", "--device-map", "cpu"], "--device-map places a whole model over the GPUs, and --stream"),
    (EXTRACT + ["--stream", "--tokens", "64"], "--tokens places a whole model"),
    (EXTRACT + ["--engine", "llama.cpp", "--no-spill"], "--no-spill places a whole model over the GPUs, and "
                                                         "--engine llama.cpp"),
    (EXTRACT + ["--fp8-backend", "scaled_mm"], "--fp8-backend is the arithmetic of --quant fp8, which this extract "
                                               "does not compute"),
    (["compare", "a", "b", "--noise-factor", "3"], "--noise-factor scales the noise floor that --baseline RUN2 "
                                                   "measures, and no --baseline is given"),
]


@pytest.mark.parametrize("argv, fragment", IDLE, ids=lambda x: " ".join(x[1:]) if isinstance(x, list) else None)
def test_a_flag_that_would_do_nothing_is_one_line(capsys, tmp_path, monkeypatch, argv, fragment):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, fragment)
    assert out == "" and not list(tmp_path.iterdir()), "refused before any work"


@pytest.mark.parametrize("argv", [
    TEST + ["--layer", "1", "--device-map", "cuda:1"],  # a one-device map says where single runs
    TEST + ["--test-type", "multi", "--layers", "0-1", "--deterministic", "--device", "cpu"],
    TEST + ["--record-reference", "--prompt", "hi", "--points", "residual", "--batch-size", "2"],
    TEST + ["--test-type", "full", "--layers", "0-1", "--device-map", "cpu", "--max-memory", "1GB"],
    TEST + ["--test-type", "full", "--stream", "--device", "cpu"],
    TEST + ["--test-type", "full", "--stream", "--device-map", "cuda:1"],  # the device --stream runs on
    TEST + ["--test-type", "extract-all", "--prompt", "hi", "--points", "residual", "--layers", "0"],
    TEST + ["--quant", "fp8", "--fp8-backend", "emulate"],
    TEST + ["--fp8-backend", "emulate"],  # the reference's --quant decides: the library checks it
    EXTRACT + ["--stream", "--device", "cpu", "--quant", "fp8", "--fp8-backend", "emulate"],
    EXTRACT + ["--device-map", "cpu", "--max-memory", "1GB", "--tokens", "64"],
    EXTRACT + ["--engine", "llama.cpp", "--device", "gpu"],
    ["compare", "a", "b", "--baseline", "c", "--noise-factor", "3"],
], ids=lambda a: " ".join(a[1:]))
def test_where_each_flag_takes_effect_it_is_accepted(argv):
    combinations.refuse_idle(arguments.build_parser().parse_args(argv))


@pytest.mark.parametrize("stream", [False, True])
def test_fp8_backend_takes_effect_in_a_whole_model_extract(capsys, tmp_path, stream, monkeypatch):
    """--quant fp8 without --stream ran the default backend whatever --fp8-backend said: scaled_mm
    on the CPU was emulated silently. It now reaches the FP8 layers, which refuse it there; on a
    machine without a GPU, before any weight is read."""
    from layerwise import quant

    how = ["--stream", "--device", "cpu"] if stream else ["--device-map", "cpu"]
    code, _, err = run_cli(capsys, "extract", FP8, "--out", tmp_path / "r", "--prompt", "hi", *how,
                           "--quant", "fp8", "--fp8-backend", "scaled_mm")
    assert_one_line_error(code, err, "--fp8-backend scaled_mm runs on a Hopper GPU and this machine has none: "
                                     "use --fp8-backend emulate (or auto)")
    assert not (tmp_path / "r").exists()
    monkeypatch.setattr(quant, "gpu_present", lambda: True)  # a GPU machine, the model placed on its CPU
    code, _, err = run_cli(capsys, "extract", FP8, "--out", tmp_path / "r", "--prompt", "hi", "--device-map", "cpu",
                           "--quant", "fp8", "--fp8-backend", "scaled_mm")
    assert_one_line_error(code, err, "--fp8-backend scaled_mm cannot run a [2, 64] x [64, 64] matmul with blocks "
                                     "(16, 16) on cpu (it needs a Hopper GPU and 128x128 blocks)")
    code, out, err = run_cli(capsys, "extract", FP8, "--out", tmp_path / "e", "--prompt", "hi", "--device-map", "cpu",
                             "--quant", "fp8", "--fp8-backend", "emulate")
    assert code == 0, err


@pytest.mark.parametrize("backend", ["emulate", "auto"])
@pytest.mark.parametrize("model, fragment", [
    (MODEL, "is the arithmetic of --quant fp8, and this checkpoint is not FP8"),
    (FP8, "is the arithmetic of --quant fp8, and the model computes with dequantized weights: add --quant fp8"),
])
def test_fp8_backend_without_fp8_where_the_reference_decides(capsys, tmp_path, model, fragment, backend):
    """test takes the reference's --quant unless told: the library refuses a backend that the
    layers it builds would not use, the default's name given too (`auto`: the library tells a
    backend given from none)."""
    ref = tmp_path / "ref"
    code, _, err = run_cli(capsys, "extract", model, "--out", ref, "--prompt", "hi", "--device-map", "cpu",
                           "--points", "residual")
    assert code == 0, err
    code, _, err = run_cli(capsys, "test", model, "--reference", ref, "--out", tmp_path / "t", "--device", "cpu",
                           "--layer", "0", "--fp8-backend", backend)
    assert_one_line_error(code, err, f"--fp8-backend {backend} {fragment}")
