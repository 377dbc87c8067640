"""Quiet transformers: layerwise reports what it loads and where, so the libraries' own reports
(load summaries, progress bars, accelerate's per-device warnings) are silenced while it works.
"""

from __future__ import annotations

import contextlib
import logging


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
