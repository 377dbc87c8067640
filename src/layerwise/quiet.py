"""Quiet transformers: layerwise reports what it loads and where, so the libraries' own reports
(load summaries, progress bars, accelerate's per-device warnings) are silenced while it works,
and their failures to read a model's files become one line (`loading_errors`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import traceback

from .errors import UserError, one_line

# Code that reads a model's files: an exception raised from inside it is about the files.
_READERS = (f"{os.sep}transformers{os.sep}", f"{os.sep}gguf{os.sep}", f"{os.sep}safetensors{os.sep}")


@contextlib.contextmanager
def quiet_transformers(progress: bool = False):
    """Silence transformers' load reports, progress bars (unless `progress`) and accelerate's
    per-device warnings (simulated GPUs are 'not available' by design); layerwise reports for itself."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    accel = logging.getLogger("accelerate.utils.modeling")
    accel_level = accel.level
    hf_logging.set_verbosity_error()
    if progress:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    accel.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        accel.setLevel(accel_level)
        (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()


@contextlib.contextmanager
def loading_errors(what: str, hint: str | None = None):
    """transformers (or the gguf reader) failing on a model's files, a config that does not fit
    the weights, a truncated or foreign .gguf, tensors missing for a conversion, is one line
    naming `what`. Exceptions raised elsewhere (layerwise's own bugs) keep their traceback."""
    try:
        yield
    except UserError:
        raise
    except (RuntimeError, ValueError, OSError, KeyError, IndexError, TypeError, AttributeError, struct.error,
            ImportError) as err:
        frames = traceback.extract_tb(err.__traceback__)
        if not any(reader in f.filename for f in frames for reader in _READERS):
            raise
        text = one_line(err).split(". ")[0].replace(" For details look at the above report!", "")
        mismatch = "its tensor shapes do not fit its config.json; " if "mismatched_sizes" in text else ""
        if isinstance(err, ImportError):  # an optional package the model or the settings need (flash-attn...)
            hint = "install the package it names" + (", or choose another --attn-implementation"
                                                     if "attention" in text.lower() else "")
        elif "attn_implementation" in text:
            hint = "choose another --attn-implementation"
        hint = hint or f"layerwise check {what} checks its files; re-download or fix them"
        raise UserError(f"cannot load {what}: {mismatch}{text} ({hint})") from None
