"""The shape of the package, checked so that it cannot rot: every module imports, the import
graph has no cycle and runs downhill (pure core <- effects <- presentation), modules read in one
sitting and functions fit on a screen, the public API names no module, docs/ARCHITECTURE.md
names every module."""

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import layerwise

PACKAGE = Path(layerwise.__file__).parent


def _walk(path: Path, prefix: str = "") -> list[str]:
    """Every module under `path`, dotted below the package (`engines.sglang`); a sub-package is
    its `__init__` (`engines`)."""
    out = []
    for m in pkgutil.iter_modules([str(path)]):
        out.append(prefix + m.name)
        if m.ispkg:
            out += _walk(path / m.name, f"{prefix}{m.name}.")
    return out


MODULES = sorted(_walk(PACKAGE) + ["__init__"])
PACKAGES = {m for m in MODULES if (PACKAGE / m.replace(".", "/")).is_dir()}
# The floors of docs/ARCHITECTURE.md: a module imports its own floor and those below, at run time
# (type-only imports aside). Floor 1, the pure core, imports nothing of layerwise but itself.
FLOORS = {
    1: "names errors formatting sizes quant metrics routing tolerances align anatomy devicemap schema sharding "
       "flagtypes engines engines.namemap engines.packing engines.shards engines.source rawbytes filebits metricsbatch "
       "placetree planning planflags",
    2: "_boot _prefetch tensorfile atomic machine quiet paths distributed chain pinned engines.files writerchild writerproc "
       "shmbuffers",
    3: "runs runread manifest readahead weights checkpoint placement fp8 models zoo prompts engines.sglang engines.vllm",
    4: "recording collector hostcopy capture module_points loading layer_loading timings",
    5: "layer_test replay rebatch pipeline streaming joint extract importer compare tokenmap readiness engines.llamacpp "
       "engines.vllm_hook measuring",
    6: "cli arguments combinations plot report _fastplan __main__ __init__",
}
FLOOR = {module: floor for floor, names in FLOORS.items() for module in names.split()}
CORE = set(FLOORS[1].split())
PRESENTATION = set(FLOORS[6].split()) - {"__init__"}
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60


def _file(module: str) -> Path:
    path = PACKAGE / module.replace(".", "/")
    return path / "__init__.py" if module in PACKAGES else path.with_suffix(".py")


def _tree(module: str) -> ast.Module:
    return ast.parse(_file(module).read_text())


def _targets(module: str, node: ast.ImportFrom) -> list[str]:
    """The dotted modules a relative import names: `from ..names import x` in engines.sglang is
    names; `from .engines import sglang` is engines and engines.sglang."""
    base = module.split(".") if module in PACKAGES else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    if not node.module:
        return [".".join(base + [a.name]) for a in node.names]
    prefix = base + node.module.split(".")
    return [".".join(prefix)] + [".".join(prefix + [a.name]) for a in node.names]


def _imports(module: str, runtime_only: bool = False) -> set[str]:
    """The layerwise modules `module` imports (at any level, in functions too)."""
    tree = _tree(module)
    skip: set[int] = set()
    if runtime_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skip.update(id(n) for n in ast.walk(node))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level >= 1 and id(node) not in skip:
            out.update(_targets(module, node))
    return out & set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports(module):
    if module not in ("__init__", "__main__"):  # the package itself is imported above; __main__ runs the CLI
        importlib.import_module(f"layerwise.{module}")


def test_import_graph_has_no_cycle():
    graph = {m: _imports(m) for m in MODULES}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        for dep in sorted(graph[module]):
            visit(dep, path + [module])
        done.add(module)

    for module in MODULES:
        visit(module, [])


def test_every_module_has_a_floor_and_imports_downhill():
    assert set(MODULES) == set(FLOOR), f"modules without a floor: {set(MODULES) - set(FLOOR)}"
    uphill = {m: sorted(d for d in _imports(m, runtime_only=True) if FLOOR[d] > FLOOR[m]) for m in MODULES}
    assert not any(uphill.values()), {m: d for m, d in uphill.items() if d}


def test_the_core_imports_only_the_core():
    strays = {m: _imports(m, runtime_only=True) - CORE for m in CORE}
    assert not any(strays.values()), {m: s for m, s in strays.items() if s}


def test_only_presentation_imports_presentation():
    strays = {m: _imports(m) & PRESENTATION for m in set(MODULES) - PRESENTATION - {"__init__"}}
    assert not any(strays.values()), {m: s for m, s in strays.items() if s}


@pytest.mark.parametrize("module", MODULES)
def test_modules_and_functions_are_short(module):
    text = _file(module).read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{module} has {len(text.splitlines())} lines"
    functions = [n for n in ast.walk(_tree(module)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in functions
            if n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{module}.py: {', '.join(long)} over {MAX_FUNCTION_LINES} lines"


def test_public_api_is_small_and_names_no_module():
    assert len(layerwise.__all__) <= 30 and len(set(layerwise.__all__)) == len(layerwise.__all__)
    assert all(hasattr(layerwise, name) for name in layerwise.__all__)
    assert not set(layerwise.__all__) & {m.split(".")[0] for m in MODULES}, "a public name shadows a module"
    import layerwise.extract as module  # the benchmark that broke on `layerwise.extract` being a function

    assert type(module).__name__ == "module"


def test_architecture_doc_names_every_module():
    doc = (PACKAGE.parents[1] / "docs" / "ARCHITECTURE.md").read_text()
    named = {m: f"{m.replace('.', '/')}{'/' if m in PACKAGES else '.py'}" for m in MODULES}
    missing = [m for m in MODULES if m not in ("__init__", "__main__") and named[m] not in doc]
    assert not missing, f"docs/ARCHITECTURE.md does not mention {missing}"
    assert len(doc.splitlines()) <= 120, "one page"
