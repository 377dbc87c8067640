"""compare's per-token view: the data behind the heat map is right for a hand-made pair of runs, it
stays readable for 4096 tokens, and the HTML report carries it."""

import html
import json
import math
import re

import pytest
import torch

from layerwise import plot, tokenmap
from layerwise.compare import CompareOptions, compare_runs

from helpers import run_cli
from synthetic_runs import write_toy_run

HIDDEN, LAYERS = 8, 6


def stream(tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"model.embed_tokens:output": torch.randn(tokens, HIDDEN, generator=g)}
    for k in range(LAYERS):
        out[f"model.layers.{k}.self_attn:output"] = torch.randn(tokens, HIDDEN, generator=g)
        out[f"model.layers.{k}:output"] = torch.randn(tokens, HIDDEN, generator=g) + 1.0
    return out


def pair(tmp_path, tokens: int, faults: dict[tuple[str, int], float], prompts: int = 1):
    """REF and CAND runs identical but for `faults`: {(tensor, token): relative error of that token}."""
    ref = {p: stream(tokens, p) for p in range(prompts)}
    cand = {p: {k: v.clone() for k, v in t.items()} for p, t in ref.items()}
    for (name, token), rel in faults.items():
        row = cand[prompts - 1][name][token]
        cand[prompts - 1][name][token] = row + rel * row.norm() / math.sqrt(HIDDEN)  # ||delta|| = rel * ||row||
    ids = [list(range(tokens))] * prompts
    model = {"spec": "toy", "model_type": "toy", "num_layers": LAYERS, "hidden_size": HIDDEN}
    a = write_toy_run(tmp_path / "ref", ref, prompts=ids, model=model, layers=LAYERS)
    b = write_toy_run(tmp_path / "cand", cand, prompts=ids, model=model, layers=LAYERS)
    return compare_runs(a, b, CompareOptions())


@pytest.mark.parametrize("ref, cand, expected", [
    ([[3.0, 4.0], [1.0, 0.0]], [[3.0, 4.0], [1.0, 0.0]], [0.0, 0.0]),
    ([[3.0, 4.0], [0.0, 0.0]], [[0.0, 4.0], [0.0, 0.0]], [0.6, 0.0]),
    ([[0.0, 0.0]], [[0.0, 1.0]], [math.inf]),
    ([[1.0, float("nan")]], [[1.0, float("nan")]], [0.0]),
    ([[1.0, 2.0]], [[1.0, float("inf")]], [math.inf]),
])
def test_token_errors(ref, cand, expected):
    assert tokenmap.token_errors(torch.tensor(ref), torch.tensor(cand)) == pytest.approx(expected)


def test_bucket_keeps_the_largest():
    columns, values = tokenmap.bucket([0.0] * 4000 + [5.0] + [0.0] * 95, 512)
    assert len(columns) == 512 and columns[0] == (0, 8) and columns[-1] == (4088, 4096)
    assert values[500] == 5.0 and sum(values) == 5.0
    assert tokenmap.bucket([1.0, 2.0, 3.0], 512) == ([(0, 1), (1, 2), (2, 3)], [1.0, 2.0, 3.0])


def test_map_of_a_hand_made_pair(tmp_path):
    """Token 5 of layer 2's attention goes wrong (rel 1e-2), then layer 2's output at token 5 and
    layer 4's output at tokens 5 and 9: the map shows those tokens of those tensors and nothing else."""
    report = pair(tmp_path, 12, {("model.layers.2.self_attn:output", 5): 1e-2, ("model.layers.2:output", 5): 3e-3,
                                 ("model.layers.4:output", 5): 2e-2, ("model.layers.4:output", 9): 5e-2})
    assert report.first_divergence.name == "model.layers.2.self_attn:output"
    tm = tokenmap.token_map(report, worst=3)
    assert tm.prompt == 0 and tm.tokens == 12 and len(tm.columns) == 12
    assert tm.first == "model.layers.2.self_attn:output"
    values = dict(zip(tm.rows, tm.values))
    assert values["model.layers.2.self_attn:output"][5] == pytest.approx(1e-2, rel=1e-4)
    assert values["model.layers.2:output"][5] == pytest.approx(3e-3, rel=1e-4)
    assert values["model.layers.4:output"][9] == pytest.approx(5e-2, rel=1e-4)
    for name, row in values.items():
        assert sum(v > 0 for v in row) == {"model.layers.4:output": 2}.get(name, 1 if "layers.2" in name else 0), name
    assert list(tm.rows).index("model.layers.2.self_attn:output") < list(tm.rows).index("model.layers.4:output")


def test_readable_at_4096_tokens_and_in_the_html(tmp_path, capsys):
    report = pair(tmp_path, 4096, {("model.layers.3:output", 4001): 1e-3}, prompts=2)
    tm = tokenmap.token_map(report)
    assert tm.prompt == 1 and tm.tokens == 4096 and len(tm.columns) == 512
    row = tm.values[tm.rows.index("model.layers.3:output")]
    assert row[500] == pytest.approx(1e-3, rel=1e-4) and sum(v > 0 for v in row) == 1
    png = plot.heatmap_png(tm)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    code, _, err = run_cli(capsys, "compare", tmp_path / "ref", tmp_path / "cand", "--html", tmp_path / "r.html")
    assert code == 0, err  # one token of 4096 off by 1e-3 passes as a whole: the map still shows where it is
    page = (tmp_path / "r.html").read_text()
    assert "<h2>Per-token error</h2>" in page and "alt='per-token error by layer'" in page
    data = json.loads(html.unescape(re.search(r"id='layerwise-token-map'>(.*?)</pre>", page).group(1)))
    assert data["prompt"] == 1 and data["tokens"] == 4096 and len(data["columns"]) == 512
    assert data["values"][data["rows"].index("model.layers.3:output")][500] == pytest.approx(1e-3, rel=1e-4)


def test_identical_runs_still_get_a_map(tmp_path):
    report = pair(tmp_path, 5, {})
    tm = tokenmap.token_map(report)
    assert report.passed and tm is not None and all(v == 0 for row in tm.values for v in row)
    assert plot.heatmap_png(tm)[:4] == b"\x89PNG"
