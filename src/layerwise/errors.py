"""The exceptions a user is meant to see, and where a user's own code failed.

`UserError` says what is wrong and what to do about it, in one line. The CLI prints it to
stderr and exits 2. `CandidateError` is a user's `--candidate` layer failing while it runs: one
line too, but exit 1 (the candidate is what is being tested). `LostProcess`: a process layerwise
started for its own work (the run writer's) ended under it (killed, out of memory): one line, exit
1, the run left to resume. Every other exception is a bug in
layerwise and keeps its traceback. `origin` names the line of the user's code an exception came from.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback


class UserError(Exception):
    """Bad input the user can fix: the message names the problem and the fix."""

    exit_code = 2


class CandidateError(UserError):
    """A user's candidate layer raised while running: the test fails (exit 1), in one line."""

    exit_code = 1


class LostProcess(UserError):
    """A process layerwise started (the run writer's) ended under it: one line, exit 1."""

    exit_code = 1


def _libraries() -> tuple[str, ...]:
    """The directories of layerwise and the libraries it calls into: frames there are not the user's."""
    dirs = [os.path.dirname(os.path.abspath(__file__))]
    for name in ("torch", "transformers", "accelerate", "safetensors", "numpy"):
        module = sys.modules.get(name)
        if getattr(module, "__file__", None):
            dirs.append(os.path.dirname(os.path.abspath(module.__file__)))
    return tuple(d + os.sep for d in dirs)


def origin(err: BaseException) -> str:
    """`file.py:12 in forward`: the innermost frame of `err`'s traceback outside layerwise and
    the libraries (the user's code), else the innermost frame; "" without a traceback."""
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return ""
    libraries, stdlib = _libraries(), os.path.dirname(os.path.abspath(os.__file__)) + os.sep

    def users(path: str) -> bool:
        path = os.path.abspath(path)
        installed = "site-packages" in path or "dist-packages" in path
        return not path.startswith(libraries) and (installed or not path.startswith(stdlib))

    mine = [f for f in frames if not f.filename.startswith("<") and users(f.filename)]
    frame = (mine or frames)[-1]
    return f"{frame.filename}:{frame.lineno} in {frame.name}"


def one_line(err: BaseException) -> str:
    """`TypeError: bad thing` from an exception: its type and the first line of its text."""
    text = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


@contextlib.contextmanager
def user_code(what: str, error: type[UserError] = UserError):
    """Run a user's code (a --candidate factory or forward): an exception it raises becomes one
    line, `what: TypeError: ... (at their_file.py:12 in forward)`, as `error` (exit 2, or exit 1
    for a CandidateError). A UserError passes as it is; KeyboardInterrupt is not caught."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        where = origin(err)
        raise error(f"{what}: {one_line(err)}" + (f" (at {where})" if where else "")) from None
