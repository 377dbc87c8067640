"""The types of the command line's flags: a value that cannot mean anything (a negative
tolerance, zero tokens, NaN, a cosine above 1, an empty text) is refused by argparse with what to
give instead."""

from __future__ import annotations

import argparse


def _parse_number(text: str, kind: type):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
    if value != value:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (NaN)")
    return value


def count(text: str) -> int:
    """A whole number >= 1 (tokens, prompts per batch, k)."""
    value = _parse_number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is too small: give a whole number of at least 1")
    return value


def limit(text: str) -> float:
    """A non-negative number (a tolerance, a margin, a factor); inf means no limit."""
    value = _parse_number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative: give a number >= 0")
    return value


def amount(text: str) -> float:
    """A finite number > 0 (a size)."""
    value = _parse_number(text, float)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number above 0")
    return value


def cosine(text: str) -> float:
    """A cosine similarity limit: -1 to 1."""
    value = _parse_number(text, float)
    if not -1 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a cosine: give a number from -1 to 1")
    return value


def text(value: str) -> str:
    """Any flag's text unless it has a type of its own (`Parser` makes it the default): an empty
    value would silently mean the default (`--points ""`), so it is refused."""
    if not value.strip():
        raise argparse.ArgumentTypeError(f"{value!r} is empty: give a value (a flag left out takes its default)")
    return value


# The longest wait a timeout flag takes: a week (torch's stores count milliseconds in 64 bits, and
# datetime.timedelta overflows near 1e14 s; a longer wait is a hang by another name).
MAX_WAIT_S = 7 * 24 * 3600


def wait_seconds(text: str) -> float:
    """A timeout in seconds: above 0, at most a week."""
    value = amount(text)
    if value > MAX_WAIT_S:
        raise argparse.ArgumentTypeError(f"{text} s is more than a week ({MAX_WAIT_S} s): give a shorter wait")
    return value
