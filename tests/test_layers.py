"""The package's dependencies point down: each module imports only from its own layer or below
(counting imports inside functions and under ``TYPE_CHECKING``), and no modules import each
other in a circle. Read from the sources with ``ast``, so the rule holds whatever runs."""

from __future__ import annotations

import ast
from pathlib import Path

import asgi_leasttime

PACKAGE = Path(asgi_leasttime.__file__).parent

LAYERS: list[set[str]] = [
    # Leaves: types, options, and helpers that know nothing of the rest.
    {"types", "options", "errors", "_sweeper", "_tasks", "_logging", "_paths", "_serving",
     "_private_store", "dashboard", "_extras", "records"},
    # What an upstream is and how it is reached, as options.
    {"upstream", "tls", "_headers", "retry", "access_log", "load_reports"},
    # The balancing core: sans-IO.
    {"balancer", "lease", "status", "sticky"},
    # Health, state and transport: each knows the core, none knows the proxy.
    {"health", "state", "redis_state", "workers_state", "client", "_lean", "_httpx",
     "_websocket", "tracing"},
    # The one owner of a proxy's upstreams, and what keeps DNS names' addresses in it.
    {"upstreams"},
    {"discovery"},
    # One exchange with an upstream.
    {"_forwarding"},
    # The ASGI apps.
    {"proxy"},
    {"middleware", "admin", "metrics", "demo"},
    # The command line, and the package's names.
    {"config", "reload", "cli", "__init__"},
]  # fmt: skip


def imports_of(module: str) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its source."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            if name == "asgi_leasttime":
                found.add("__init__")
            elif name.startswith("asgi_leasttime."):
                found.add(name.split(".")[1])
    return found - {module}


def layer_of(module: str) -> int:
    for index, layer in enumerate(LAYERS):
        if module in layer:
            return index
    raise AssertionError(f"asgi_leasttime.{module} has no layer in tests/test_layers.py")


def test_every_module_has_a_layer() -> None:
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    assert modules == set().union(*LAYERS)


def test_dependencies_point_down() -> None:
    upward = [
        f"{module} (layer {layer_of(module)}) imports {dependency} (layer {layer_of(dependency)})"
        for layer in LAYERS
        for module in sorted(layer)
        for dependency in sorted(imports_of(module))
        if layer_of(dependency) > layer_of(module)
    ]
    assert not upward, "\n".join(upward)


def test_nothing_below_the_proxy_imports_it() -> None:
    below = [m for layer in LAYERS[: layer_of("proxy")] for m in layer]
    assert [m for m in below if "proxy" in imports_of(m)] == []


def test_no_modules_import_each_other_in_a_circle() -> None:
    graph = {module: imports_of(module) for module in set().union(*LAYERS)}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("a circle: " + " -> ".join([*path[path.index(module) :], module]))
        if module in done:
            return
        for dependency in sorted(graph[module]):
            visit(dependency, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
