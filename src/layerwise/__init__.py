"""layerwise: layer-by-layer numerical testing of very large language models.

The public API: the names a program needs to do what the command line does (load, extract,
compare, test layers, check the machine), each re-exported from the module that defines it.
Everything else is reached through its module (`layerwise.placement.plan_placement`,
`layerwise.loading.input_device`, ...). No name here is also a module's name: `layerwise.extract`
is the module, `layerwise.extract_model` the function. docs/ARCHITECTURE.md maps the modules.
"""

__version__ = "0.1.0"

from ._boot import cache_bytecode
from ._fastplan import answer as answer_plan
from ._prefetch import prefetch_command

cache_bytecode()  # a command only, and before torch is imported (_boot.py)
prefetch_command()  # a command's first layer read from disk while it imports (_prefetch.py)
answer_plan()  # `layerwise plan` of a model planned before: printed, and the process ends (_fastplan.py)


from .compare import CompareOptions, Report, compare_paths, compare_runs
from .errors import UserError
from .extract import ExtractOptions, extract_model
from .layer_test import TestOptions, compare_layer_test, run_layer_test
from .loading import LoadedModel, LoadOptions, load_model
from .metrics import logits_metrics, tensor_metrics
from .readiness import CheckOptions, check_machine
from .recording import ExtractResult
from .replay import ReplayOptions
from .report import report_json, report_text
from .routing import routing_metrics
from .runs import Run, open_run
from .streaming import StreamOptions, stream_extract
from .tolerances import build_tolerances

__all__ = [
    "UserError",
    # loading and extracting
    "LoadOptions", "LoadedModel", "load_model", "ExtractOptions", "ExtractResult", "extract_model",
    "StreamOptions", "stream_extract", "Run", "open_run",
    # comparing
    "CompareOptions", "Report", "build_tolerances", "compare_paths", "compare_runs", "report_json", "report_text",
    "logits_metrics", "routing_metrics", "tensor_metrics",
    # layer tests and the machine
    "ReplayOptions", "TestOptions", "compare_layer_test", "run_layer_test", "CheckOptions", "check_machine",
]
