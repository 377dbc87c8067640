"""Numbers and tables as text, for every renderer (report.py, plot.py). Pure.

A value that is absent prints as "-"; errors print in scientific notation with one decimal
(`1.2e-03`), an exact zero as "0"; JSON gets the strings "inf", "-inf", "nan" for what it cannot
hold.
"""

from __future__ import annotations

import math
import textwrap

WIDTH = 100  # terminal output lines are at most this long


def wrap(line: str, indent: int | str = 2, width: int = WIDTH) -> list[str]:
    """One logical line as lines of at most `width` columns; continuation lines indented by
    `indent` spaces (or the string given). Words longer than a line (paths) are not broken."""
    pad = indent if isinstance(indent, str) else " " * indent
    return textwrap.wrap(line, width, subsequent_indent=pad, break_long_words=False, break_on_hyphens=False) or [""]


def plural(count: int, word: str, words: str | None = None) -> str:
    """`1 prompt`, `2 prompts`, `0 prompts` (`words`: an irregular plural)."""
    return f"{count} {word if count == 1 else (words or word + 's')}"


def sci(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if math.isinf(value) or math.isnan(value):
        return str(value)
    return f"{value:.1e}"


def error_cells(rel_l2: float | None, cosine: float | None, nonfinite_mismatch: int | None) -> tuple[str, str]:
    """rel_l2 and cosine as shown: "nan" where NaN/Inf sit in one run only (the sums leave those
    positions out, so the numbers would describe only what is left)."""
    if nonfinite_mismatch:
        return "nan", "nan"
    return sci(rel_l2), "-" if cosine is None else f"{cosine:.6f}"


def growth(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isinf(value) or math.isnan(value):
        return str(value)
    return f"{value:.2f}" if value < 1000 else f"{value:.0e}"


def times(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}x" if math.isfinite(value) else str(value)


def table(head: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> list[str]:
    """A plain aligned table as lines: header, rule, rows; columns in `right` are right-aligned."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]


def _json_number(value):
    """JSON has no Inf or NaN: they become the strings "inf", "-inf", "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def json_safe(data):
    if isinstance(data, dict):
        return {k: json_safe(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_safe(v) for v in data]
    return _json_number(data)
