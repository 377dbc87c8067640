"""docs/FP8.md is true: its commands run as written (in a scratch directory) and print what it shows."""

import re
import shutil
from pathlib import Path

from layerwise.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "FP8.md").read_text()


def commands() -> list[list[str]]:
    block = re.search(r"```bash\n(.*?)```", DOC, re.S).group(1)
    joined = block.replace("\\\n", " ")
    return [line.split("#")[0].split()[1:] for line in joined.splitlines() if line.startswith("layerwise ")]


def _verdicts(line: str) -> str:
    """A table line without what a CPU's bfloat16 arithmetic moves (the digits, the count of
    flipped tokens, `ok*` against `ok`): the layer, the columns and the verdicts stay."""
    first, _, rest = line.strip().partition(" ")
    rest = re.sub(r"(?<![\w.])\d+f\b", "", rest)  # flipped tokens
    rest = re.sub(r"\d+(\.\d+)?(e[+-]\d+)?%?", "#", rest).replace("ok*", "ok")
    return " ".join([first] + rest.split())


def test_verdicts_ignore_only_the_digits():
    assert _verdicts("2              7.8e-02            1.8e-01  ok 5f     FAIL 20f") == \
        _verdicts("2              7.0e-02            1.8e-01  ok 4f     FAIL 20f") == "2 # # ok FAIL"
    assert _verdicts("  3      1.6e-02  1.3e-04  1.2e-01       -      100%  ok") == \
        _verdicts("  3      5.6e-02  1.6e-03  1.3e+00       -  99.2% 1f  ok*")
    assert _verdicts("1 5.7e-02 1.3e-01 ok 2f FAIL 10f") != _verdicts("1 5.7e-02 1.3e-01 ok 2f ok 10f")
    assert _verdicts("1 5.7e-02 1.3e-01 ok FAIL") != _verdicts("2 5.7e-02 1.3e-01 ok FAIL")


def test_walk_through_prints_what_the_doc_shows(tmp_path, monkeypatch, capsys):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    outputs = []
    for argv in commands():
        code = main(argv)
        out = capsys.readouterr().out
        assert code == 0, (argv, out)
        outputs.append(out)
    check, _, test = outputs
    shown = re.findall(r"^(?:(?:PASS|WARN)  quant|PASS  router-precision).*(?:\n {24}.*)*", DOC, re.M)
    assert len(shown) == 4
    for block in shown:  # each check's line with its continuation lines, within 100 columns
        assert block in check, block
    # the tables: every line, its digits as this CPU's bfloat16 arithmetic gives them (FP8.md says so)
    printed = {_verdicts(line) for line in test.splitlines()}
    shown = re.search(r"layer  isolated rel_l2.*?\n(.*?)every layer[^\n]*", DOC, re.S).group(0).splitlines()
    table = re.search(r"  layer   rel_l2.*?\n(.*?)\.\.\.", DOC, re.S).group(0).splitlines()[:-1]
    for line in shown + table:
        assert _verdicts(line) in printed, f"{line!r} not printed (its verdicts)"
    assert shown[-1] in test, "the conclusion word for word"
    assert (tmp_path / "runs" / "fp8-ref" / "manifest.json").is_file()


def test_plans_shown_are_what_plan_prints(capsys):
    for argv, code in ((["plan", "builtin:minimax-m2-fp8", "--gpus", "4x80GB", "--quant", "fp8"], 0),
                       (["plan", "builtin:minimax-m2-fp8", "--gpus", "4x80GB"], 1)):
        assert main(argv) == code
        out = capsys.readouterr().out
        verdict = [line for line in out.splitlines() if line.startswith("verdict:")][0]
        assert verdict in DOC, verdict
        if code == 0:  # the FP8 placement is shown whole (the other spills by this machine's RAM)
            for line in out.splitlines()[2:]:
                if line.startswith("cuda:"):
                    assert line in DOC, line
