"""The folder tree is the architecture: the runtime never reaches into the tools, and nothing imports in a
circle, including the imports hidden inside functions (grimp reads every import statement of a module)."""

from __future__ import annotations

import grimp
import pytest

TOOLS_ONLY_LIBRARIES = ("scipy", "pandas", "sklearn", "jsonschema", "pytest", "matplotlib")


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("agent", "pdm_tools", include_external_packages=True, exclude_type_checking_imports=True)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan), each a cycle to break."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def _ours(graph: grimp.ImportGraph) -> list[str]:
    return sorted(m for m in graph.modules if m.split(".")[0] in ("agent", "pdm_tools"))


def test_the_runtime_never_imports_the_tools(graph: grimp.ImportGraph) -> None:
    chains = graph.find_shortest_chains(importer="agent", imported="pdm_tools", as_packages=True)
    assert not chains, f"agent reaches pdm_tools through {sorted(chains)}"


@pytest.mark.parametrize("library", TOOLS_ONLY_LIBRARIES)
def test_the_runtime_does_not_import_tools_only_libraries(graph: grimp.ImportGraph, library: str) -> None:
    if library not in graph.modules:  # nothing of ours imports it at all
        return
    importers = sorted(
        m for m in graph.find_modules_that_directly_import(library) if m == "agent" or m.startswith("agent.")
    )
    assert not importers, f"{library} is not a runtime dependency, but {importers} import it"


def test_no_module_imports_in_a_circle(graph: grimp.ImportGraph) -> None:
    modules = _ours(graph)
    edges = {m: {n for n in graph.find_modules_directly_imported_by(m) if n in modules} for m in modules}
    assert _cycles(edges) == []


def test_no_stage_imports_in_a_circle(graph: grimp.ImportGraph) -> None:
    """Stages (``agent.decode``, ``agent.spool``, ``pdm_tools.training`` ...) form a directed acyclic graph."""

    def stage(module: str) -> str:
        return ".".join(module.split(".")[:2])

    edges: dict[str, set[str]] = {}
    for module in _ours(graph):
        for imported in graph.find_modules_directly_imported_by(module):
            if imported.split(".")[0] in ("agent", "pdm_tools") and stage(imported) != stage(module):
                edges.setdefault(stage(module), set()).add(stage(imported))
    # The package roots hold only the version; an edge to them is no dependency on a stage.
    for targets in edges.values():
        targets.discard("agent")
        targets.discard("pdm_tools")
    assert _cycles(edges) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
