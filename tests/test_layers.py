"""The package's layers and the one-way flow between them (docs/architecture.md): every import of a compressor
module, at module level or inside a function, goes to its own layer or one below, and no modules import each
other in a circle. Read from the source with `ast`, so lazy imports count as much as top-level ones."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "compressor"

# Lowest first. A module may import modules of its own layer and of the layers below, never above.
LAYERS: list[tuple[str, list[str]]] = [
    ("foundations", ["compressor.errors", "compressor.log", "compressor.cpu", "compressor.yamlpos",
                     "compressor.bitpack", "compressor.memory", "compressor.process", "compressor.safetensors_io", "compressor.budget", "compressor.encodings", "compressor.encoding_base", "compressor.intgroup", "compressor.model", "compressor.zoo", "compressor.tinylm",
                     "compressor.usercode", "compressor.ort", "compressor.decoding", "compressor.manifest",
                     "compressor.report_format", "compressor.version", "compressor.schema",
                     "compressor.bundle_runner", "compressor.bundle_generate"]),
    ("data", ["compressor.data"]),
    ("sources", ["compressor.sources"]),
    ("recipe", ["compressor.recipe", "compressor.passes.base"]),
    ("passes", ["compressor.passes"]),
    ("export", ["compressor.export"]),
    ("artifact", ["compressor.loading", "compressor.verify", "compressor.inspect", "compressor.staging"]),
    ("evaluate", ["compressor.evaluate"]),
    ("release", ["compressor.pack", "compressor.pack_lm", "compressor.pipeline", "compressor.stream", "compressor.docs"]),
    ("entry points", ["compressor.cli", "compressor.__main__", "compressor"]),
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def layer_of(module: str) -> int:
    """The layer of ``module``: the longest matching prefix in LAYERS."""
    best, index = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, index = len(prefix), i
    assert index is not None, f"{module} is in no layer: add it to LAYERS"
    return index


def imports(modules: dict[str, Path], unresolved: list[str] | None = None) -> dict[str, set[str]]:
    """{module: the compressor modules it imports}, resolved to modules that exist; imports of compressor modules
    that do not exist are appended to ``unresolved``."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                if (node.level or origin.startswith("compressor")) and origin not in modules \
                        and unresolved is not None:
                    unresolved.append(f"{name}: from {'.' * node.level}{node.module or ''} import ...")
                for alias in node.names:
                    full = f"{origin}.{alias.name}"
                    targets.add(full if full in modules else origin)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_every_import_of_a_compressor_module_names_one_that_exists():
    unresolved: list[str] = []
    imports(_modules(), unresolved)
    assert unresolved == [], "imports of modules that do not exist (moved?):\n  " + "\n  ".join(unresolved)


def test_every_module_is_in_a_layer_and_imports_only_its_own_or_lower_layers():
    modules = _modules()
    graph = imports(modules)
    upward = [f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
              for a, targets in sorted(graph.items()) for b in sorted(targets) if layer_of(b) > layer_of(a)]
    assert upward == [], "imports that run up a layer:\n  " + "\n  ".join(upward)


def test_no_modules_import_each_other_in_a_circle():
    graph = imports(_modules())
    # A package's __init__ that re-exports its own submodules is not a circle of dependencies.
    graph = {a: {b for b in targets if not a.startswith(b + ".")} for a, targets in graph.items()}
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == [], "import cycles:\n  " + "\n  ".join(cycles)


def test_every_module_imports():
    # Most modules are imported lazily (`compress run` imports the evaluator after the artifact is written): a
    # module that does not import would otherwise show up only then, as an "unexpected failure".
    import importlib

    for name in sorted(_modules()):
        if name != "compressor.__main__":  # runs the CLI
            importlib.import_module(name)


FILE_LIMIT, FUNCTION_LIMIT = 450, 80


def test_files_and_functions_stay_small():
    long_files, long_functions = [], set()
    for name, path in _modules().items():
        lines = path.read_text().count("\n")
        if lines > FILE_LIMIT:
            long_files.append(f"{name} ({lines} lines)")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                    node.end_lineno - node.lineno + 1 > FUNCTION_LIMIT:
                long_functions.add(f"{name}:{node.name}")
    assert long_files == [], f"files over {FILE_LIMIT} lines: {long_files}"
    assert long_functions == set(), f"functions over {FUNCTION_LIMIT} lines, split them: {sorted(long_functions)}"


def test_modules_that_travel_into_bundles_import_nothing_of_compressor():
    """run.py, generate.py and decoding.py are copied into bundles, where compressor is not installed."""
    graph = imports(_modules())
    for name in ("compressor.bundle_runner", "compressor.bundle_generate", "compressor.decoding"):
        assert graph[name] == set(), f"{name} imports {sorted(graph[name])}"
