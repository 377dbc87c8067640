"""layerwise: layer-by-layer numerical testing of very large language models.

The public API; everything here is re-exported from the modules that define it.
"""

__version__ = "0.1.0"

from .anatomy import Anatomy, find_anatomy
from .checkpoint import inspect_checkpoint
from .compare import CompareOptions, LogitsReport, PromptResult, Report, Row, compare_paths, compare_runs
from .errors import UserError
from .extract import ExtractOptions, extract, extract_model
from .recording import ExtractResult
from .importer import import_run
from .layer_loading import LayerOptions, LayerSource, open_layers
from .layer_test import TestOptions, TestResult, compare_layer_test, run_layer_test
from .loading import LoadedModel, LoadOptions, input_device, load_model, placement_rows
from .metrics import LogitsMetrics, TensorMetrics, logits_metrics, tensor_metrics
from .routing import RoutingMetrics, routing_metrics
from .models import ModelRef, load_config, resolve_model
from .placement import Plan, plan_placement
from .readiness import CheckOptions, Readiness, check_machine
from .plot import report_html, write_html, write_plot
from .report import report_json, report_text
from .replay import ReplayOptions, ReplayResult, load_candidate
from .runs import Run, RunWriter, open_run
from .streaming import StreamOptions, stream_extract
from .tolerances import Tolerance, Tolerances, build_tolerances, load_tolerance_file, parse_rule

__all__ = [
    "Anatomy", "CheckOptions", "LoadOptions", "LoadedModel", "ModelRef", "Plan", "Readiness", "Run", "RunWriter", "UserError",
    "check_machine", "find_anatomy", "input_device", "inspect_checkpoint", "load_config", "load_model",
    "open_run", "placement_rows", "plan_placement", "resolve_model",
    # compare
    "CompareOptions", "LogitsMetrics", "LogitsReport", "PromptResult", "Report", "RoutingMetrics", "Row", "TensorMetrics",
    "Tolerance", "Tolerances", "build_tolerances", "compare_paths", "compare_runs", "load_tolerance_file", "logits_metrics",
    "parse_rule", "report_html", "report_json", "report_text", "routing_metrics", "tensor_metrics", "write_html",
    "write_plot",
    # extract, import, layer tests, streaming
    "ExtractOptions", "ExtractResult", "LayerOptions", "LayerSource", "ReplayOptions", "ReplayResult", "StreamOptions",
    "TestOptions", "TestResult", "compare_layer_test", "extract", "extract_model", "import_run", "load_candidate",
    "open_layers", "run_layer_test", "stream_extract",
]
