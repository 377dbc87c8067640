"""extract --engine llama.cpp: llama.cpp itself runs the real SmolLM2 GGUF (llama-cpp-python, the
llamacpp extra that `make test` builds) and the run compares with transformers' extract of
the same file: per-layer cosine > 0.999 (mean over tokens), top-1 agreement >= 0.95."""

import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from layerwise import models, placement, runs
from layerwise.anatomy import find_anatomy
from layerwise.compare import CompareOptions, compare_runs
from layerwise.engines import llamacpp

from helpers import assert_one_line_error, run_cli

# Long enough for the last layers' per-token noise to average out; llama.cpp multiplies Q4_1
# weights with Q8_1-quantized activations, transformers with fp32 dequantized weights.
PROMPTS = [
    "The capital of France is",
    "Paris is the capital and largest city of France. With an estimated population of two million "
    "residents, it is the centre of the Ile-de-France region. The city is known for the Louvre, the "
    "largest art museum in the world, and for the Eiffel Tower, built for the 1889 World's Fair. The "
    "Seine runs through the city, dividing it into the Left Bank and the Right Bank.",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)  # the naive recursion",
    "Question: what is 12 times 7? Answer:",
]
POINTS = "embed,residual,attn,mlp,norm,logits"


@pytest.fixture(scope="module")
def anatomy():
    config = models.load_config(models.resolve_model("builtin:llama-tiny")).config
    return find_anatomy(placement.meta_model(config, torch.float32))


def test_plan_names(anatomy):
    plan = llamacpp.plan_names(anatomy, ("embed", "residual", "attn", "mlp", "norm", "logits"), (0, 3))
    assert plan["embd"] == ["model.embed_tokens:output", "model.layers.0:input"]
    assert plan["l_out-2"] == ["model.layers.3:input"] and plan["l_out-3"] == ["model.layers.3:output"]
    assert plan["attn_out-3"] == ["model.layers.3.self_attn:output"]
    assert plan["ffn_out-0"] == plan["ffn_moe_out-0"] == ["model.layers.0.mlp:output"]
    assert plan["result_norm"] == ["model.norm:output"] and plan["result_output"] == ["lm_head:output"]
    assert set(llamacpp.plan_names(anatomy, ("output",), (1,))) == {"l_out-1"}


def test_node_array_reads_ggml_layouts():
    x = np.arange(24, dtype=np.float32).reshape(6, 4)  # [tokens, hidden]: ne = (4, 6, 1, 1)
    got = llamacpp.node_array(x.view(np.uint8).reshape(-1), 0, [4, 6, 1, 1], [4, 16, 96, 96])
    assert np.array_equal(got, x)
    half = x.astype(np.float16)
    assert np.array_equal(llamacpp.node_array(half.view(np.uint8).reshape(-1), 1, [4, 6, 1, 1], [2, 8, 48, 48]), x)
    bf16 = (x.view(np.uint32) >> 16).astype(np.uint16)  # exact: small integers
    assert np.array_equal(llamacpp.node_array(bf16.view(np.uint8).reshape(-1), 30, [4, 6, 1, 1], [2, 8, 48, 48]), x)
    # a permuted view: ne0 walks with stride 24 bytes (rows of a [4, 6] array)
    t = np.ascontiguousarray(x.T)
    got = llamacpp.node_array(t.view(np.uint8).reshape(-1), 0, [4, 6, 1, 1], [24, 4, 96, 96])
    assert np.array_equal(got, x)
    with pytest.raises(ValueError, match="ggml type 2"):
        llamacpp.node_array(t.view(np.uint8).reshape(-1), 2, [4, 6, 1, 1], [24, 4, 96, 96])


def test_tensors_of_prefers_ffn_out():
    plan = {"ffn_out-0": ["m.layers.0.mlp:output"], "ffn_moe_out-0": ["m.layers.0.mlp:output"],
            "attn_out-0": ["m.layers.0.self_attn:output"]}
    a, b = np.ones((2, 3), np.float32), np.zeros((2, 3), np.float32)
    got, missing = llamacpp.tensors_of({"ffn_moe_out-0": b, "ffn_out-0": a}, plan)
    assert torch.equal(got["m.layers.0.mlp:output"], torch.ones(2, 3)) and missing == ["m.layers.0.self_attn:output"]


def test_refusals(tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(capsys, "extract", "builtin:llama-tiny", "--engine", "llama.cpp", "--out", tmp_path / "a",
                           "--prompt", "hi")
    assert_one_line_error(code, err, "runs .gguf files")
    code, _, err = run_cli(capsys, "extract", "builtin:smollm2", "--engine", "llama.cpp", "--out", tmp_path / "b",
                           "--prompt", "hi", "--modules", "lm_head")
    assert_one_line_error(code, err, "--modules names transformers modules")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if the extra were not installed
    code, _, err = run_cli(capsys, "extract", "builtin:smollm2", "--engine", "llama.cpp", "--out", tmp_path / "c",
                           "--prompt", "hi")
    assert_one_line_error(code, err, "llama-cpp-python is not installed: CMAKE_ARGS=\"-DGGML_NATIVE=OFF")


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def doc_commands() -> list[str]:
    """The llama.cpp worked example of docs/FORMAT.md, continuation lines joined."""
    text = (Path(__file__).parents[1] / "docs" / "FORMAT.md").read_text()
    block = re.search(r"### llama.cpp\n.*?```bash\n(.*?)```", text, flags=re.S).group(1)
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_smollm2_llamacpp_against_transformers(tmp_path, capsys, monkeypatch):
    """docs/FORMAT.md's two commands (and the reference's): llama.cpp on the real SmolLM2 GGUF against
    transformers on the same file: every layer's mean cosine over tokens > 0.999, top-1 >= 0.95."""
    assert llamacpp.library_version(), "llama-cpp-python is missing: `make llamacpp` (or `make test`) builds it"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    commands = doc_commands()
    assert [c.split()[:2] for c in commands] == [["layerwise", "extract"]] * 2 + [["layerwise", "compare"]]
    for command in commands:
        code, out, err = run_cli(capsys, *shlex.split(command)[1:])
        assert code == 0, f"{command}: exit {code}\n{out}{err}"
    hf, lcp = runs.open_run(tmp_path / "runs/ref"), runs.open_run(tmp_path / "runs/llamacpp")
    assert lcp.manifest["settings"]["engine"] == "llama.cpp" and lcp.manifest["model"]["num_layers"] == 30
    assert [p["token_ids"] for p in lcp.prompts] == [p["token_ids"] for p in hf.prompts]  # both tokenizers agree
    names = [n for n in hf.names if not n.endswith(":input_padding")]  # extract batches 8 prompts, padded
    assert sorted(lcp.names) == sorted(names) and len(names) == 123
    worst, per_prompt = {}, {}  # the mean over every token of every prompt; the worst prompt's mean
    for name in names:
        cos = [_cosines(hf.tensor(name, p), lcp.tensor(name, p)) for p in range(len(PROMPTS))]
        worst[name] = torch.cat(cos).mean().item()
        per_prompt[name] = min(c.mean().item() for c in cos)
    layers = {n: c for n, c in worst.items() if n.endswith(":output") and n.count(".") == 2}
    assert len(layers) == 30 and min(layers.values()) > 0.999, sorted(layers.items(), key=lambda x: x[1])[:3]
    assert worst["model.norm:output"] > 0.999 and worst["lm_head:output"] > 0.99
    assert worst["model.embed_tokens:output"] == 1.0  # the same dequantized rows
    assert min(c for n, c in worst.items() if "self_attn" in n or ".mlp" in n) > 0.99
    report = compare_runs(hf, lcp, CompareOptions())
    assert report.logits.overall.top1 >= 0.95, report.logits.overall
    print(f"llama.cpp vs transformers, SmolLM2 Q4_1, {sum(len(p['token_ids']) for p in hf.prompts)} tokens: "
          f"worst layer mean cosine {min(layers.values()):.5f} (worst prompt's mean "
          f"{min(per_prompt[n] for n in layers):.5f}), norm {worst['model.norm:output']:.5f}, "
          f"logits {worst['lm_head:output']:.5f}, top-1 {report.logits.overall.top1:.3f}")
