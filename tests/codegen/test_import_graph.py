"""The package's import graph: no cycles between modules, and the run-time side never imports the compile side.

Imports are read with ``ast`` from every module of srigl_compile, at module level and inside functions alike (an
in-function import hides a cycle from the interpreter, not from the design). ``from package import name`` counts
as an import of the submodule when ``name`` is one. No TVM needed: nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[2] / "srigl_compile"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.AST, package: str, modules: set[str]) -> set[str]:
    """The srigl_compile modules one import statement names."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in modules}
    if not isinstance(node, ast.ImportFrom):
        return set()
    if node.level:
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    found = {f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source for alias in node.names}
    return found & modules


def import_graph() -> nx.DiGraph:
    paths = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(paths)
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            graph.add_edges_from((name, target) for target in _imported(node, package, set(paths)) if target != name)
    return graph


def _cycles(graph: nx.DiGraph) -> list[list[str]]:
    return [sorted(cycle) for cycle in nx.simple_cycles(graph)]


def test_the_graph_sees_in_function_imports():
    graph = import_graph()
    assert graph.has_edge("srigl_compile.passes.lower", "srigl_compile.codegen.target"), "lower() imports it lazily"
    assert graph.has_edge("srigl_compile.nn.lowered", "srigl_compile.runtime.linear_op"), "a submodule by name"


def test_no_import_cycles_anywhere():
    assert not _cycles(import_graph())


def test_the_runtime_never_imports_the_compile_side():
    graph = import_graph()
    runtime = [m for m in graph if m.startswith("srigl_compile.runtime")]
    reached = {m for start in runtime for m in nx.descendants(graph, start)}
    assert not [m for m in reached if m.startswith("srigl_compile.codegen")]


def test_every_backend_handle_loads_from_a_manifest():
    from srigl_compile.codegen.backends import BACKENDS
    from srigl_compile.runtime.kernel_io import HANDLE_TYPES

    for backend in BACKENDS.values():
        assert backend.conv_route in ("direct", "im2col")
        for handle_type in backend.handle_types:
            assert HANDLE_TYPES[(handle_type.device_type, handle_type.kind)] is handle_type
