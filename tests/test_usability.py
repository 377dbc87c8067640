"""What a newcomer reads (issue 13's usability items): the plot draws what is judged, growth has
nothing to show where no error comes in, one meaning per flag name, logits summarised, output
within 100 columns, counts in good grammar."""

import re

import pytest
import torch
from helpers import run_cli
from synthetic_runs import toy_run

from layerwise import plot
from layerwise.compare import CompareOptions, compare_runs
from layerwise.tolerances import build_tolerances

WIDTH = 100


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return toy_run(tmp_path_factory.mktemp("ref") / "ref")


def test_the_plot_draws_what_is_judged(ref, tmp_path):
    """Tokens diverted by a near-tie flip are excused: the output line is the judged rel_l2 (the
    legend says so), the error over every token is drawn beside it."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    options = CompareOptions(tolerances=build_tolerances(max_rel_l2=5e-2))
    report = compare_runs(ref, toy_run(tmp_path / "tie", fault=("tie", 1)), options)
    assert report.passed
    fig, ax = plt.subplots()
    plot._draw_errors(ax, report, plot._zero_level(report))
    lines = {line.get_label(): line for line in ax.get_lines()}
    judged = next(label for label in lines if label.startswith("output rel_l2 as judged"))
    assert "without tokens diverted by routing flips" in judged
    outputs = [r for r in report.rows if r.layer is not None and r.role == "output" and r.module.count(".") == 2]
    drawn = list(lines[judged].get_ydata())
    assert max(drawn) <= 5e-2, "every drawn output point is within the tolerance the run passed by"
    assert drawn == [max(r.judged_rel_l2 if r.excused else r.rel_l2, plot._zero_level(report)) for r in outputs]
    assert "output rel_l2 over every token" in lines
    plt.close(fig)
    assert plot.plot_png(report)[:4] == b"\x89PNG"


def test_growth_shows_nothing_where_no_error_comes_in(ref, tmp_path, capsys):
    fault = toy_run(tmp_path / "fault", fault=("scale", 0, 1.001)).path
    code, out, _ = run_cli(capsys, "compare", ref.path, fault)
    row = next(line for line in out.splitlines() if line.split()[:2] == [">>", "0"])
    assert row.split()[5] == "-" and "inf" not in row


def test_logits_are_summarised_unless_asked(tmp_path, capsys):
    prompts = [[1, 2, 3, 4], [5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]
    a = toy_run(tmp_path / "a", prompts=prompts).path
    b = toy_run(tmp_path / "b", prompts=prompts, dtype=torch.bfloat16).path
    _, out, _ = run_cli(capsys, "compare", a, b)
    assert not re.search(r"^  prompt \d+: top-1", out, re.M)
    assert "4 prompts: lowest top-1" in out and "each: --per-prompt" in out
    _, out, _ = run_cli(capsys, "compare", a, b, "--per-prompt")
    assert len(re.findall(r"^  prompt \d+: top-1", out, re.M)) == 4


def test_prompts_means_a_file_and_prompt_index_selects(ref, capsys):
    code, out, _ = run_cli(capsys, "compare", ref.path, ref.path, "--prompt-index", "1")
    assert code == 0 and "x 1 prompt:" in out


@pytest.mark.parametrize("argv", [
    ["check", "--cpu", "builtin:minimax-m2-tiny-fp8"],
    ["check", "--cpu", "builtin:minimax-m2-tiny"],
    ["plan", "builtin:minimax-m2-fp8", "--gpus", "4x80GB"],
    ["plan", "builtin:minimax-m2", "--gpus", "2x80GB", "--device-map", "balanced"],
    ["plan", "builtin:minimax-m2-tiny"],
], ids=lambda a: " ".join(a))
def test_check_and_plan_lines_fit_100_columns(capsys, argv):
    _, out, _ = run_cli(capsys, *argv)
    long = [line for line in out.splitlines() if len(line) > WIDTH]
    assert out and not long, long


def test_extract_lines_fit_100_columns_and_count_in_words(tmp_path, capsys):
    out_dir = tmp_path / "run"  # "wrote run PATH: ..." passes 100 columns unwrapped
    code, out, err = run_cli(capsys, "extract", "builtin:minimax-m2-tiny", "--out", out_dir, "--prompt", "Hi")
    assert code == 0, err
    assert "1 prompt," in out and "1 prompts" not in out
    assert all(len(line) <= WIDTH for line in out.splitlines()), out
    code, out, _ = run_cli(capsys, "extract", "builtin:minimax-m2-tiny", "--out", out_dir, "--prompt", "Hi")
    assert "1 batch already on disk" in out


def test_grammar_of_counts():
    from layerwise.formatting import plural

    assert [plural(n, "prompt") for n in (0, 1, 2)] == ["0 prompts", "1 prompt", "2 prompts"]
    assert plural(1, "batch", "batches") == "1 batch" and plural(3, "batch", "batches") == "3 batches"
