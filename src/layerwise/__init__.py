"""layerwise: layer-by-layer numerical testing of very large language models.

The public API; everything here is re-exported from the modules that define it.
"""

__version__ = "0.1.0"

from .anatomy import Anatomy, find_anatomy
from .checkpoint import inspect_checkpoint
from .errors import UserError
from .loading import LoadedModel, LoadOptions, input_device, load_model, placement_report
from .models import ModelRef, load_config, resolve_model
from .placement import Plan, plan_placement
from .readiness import CheckOptions, Readiness, check_machine
from .runs import Run, RunWriter, open_run

__all__ = [
    "Anatomy", "CheckOptions", "LoadOptions", "LoadedModel", "ModelRef", "Plan", "Readiness", "Run", "RunWriter", "UserError",
    "check_machine", "find_anatomy", "input_device", "inspect_checkpoint", "load_config", "load_model",
    "open_run", "placement_report", "plan_placement", "resolve_model",
]
