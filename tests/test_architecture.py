"""The house keeps its shape: the package's import graph has no circle (imports deferred into
functions count; type-only imports do not), and data flows one way between its packages."""

from __future__ import annotations

import ast
from pathlib import Path

import cifar4

ROOT = Path(cifar4.__file__).parent


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _type_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def import_graph() -> dict[str, set[str]]:
    """module -> the cifar4 modules it imports anywhere in its body (functions included)."""
    modules = {_module(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text())
        parents = {c: n for n in ast.walk(tree) for c in ast.iter_child_nodes(n)}
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom | ast.Import) or _type_only(node, parents):
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = package
                for _ in range(node.level - 1):
                    base = base.rsplit(".", 1)[0]
                base = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                if t in modules and t != mod:
                    graph[mod].add(t)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None
    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    assert "cifar4.models.registry" in graph["cifar4.models.seed"]  # the graph sees relative imports
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_a_circle_would_be_found():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_data_flows_one_way_between_packages():
    # dataset -> models -> training -> interpret -> lab / serving: no step imports a later one
    order = ["cifar4.data", "cifar4.models", "cifar4.training", "cifar4.interpret", "cifar4.lab", "cifar4.serving"]
    rank = {p: i for i, p in enumerate(order)}

    def package(m: str) -> str | None:
        return next((p for p in order if m == p or m.startswith(p + ".")), None)
    for mod, deps in import_graph().items():
        for d in deps:
            a, b = package(mod), package(d)
            if a and b and a != b:
                assert rank[b] < rank[a] or {a, b} == {"cifar4.lab", "cifar4.serving"}, f"{mod} imports {d}"
