"""No import cycles in allatt_dist/: the graph of which module imports which, read from the source.

Every `import` counts as an edge, at module level and inside functions alike (a function-local import
is hoisted: it still ties the two modules together, it only hides the cycle until the call), except
those under `if TYPE_CHECKING:` (annotations only, never executed). Importing a package's module does
not count as importing the package's `__init__`.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "allatt_dist"


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        name = ".".join(p.relative_to(PKG.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(tree: ast.AST, package: str) -> list[str]:
    """What each import statement in `tree` names (relative ones resolved), TYPE_CHECKING skipped; the
    caller keeps the longest prefix that is one of our modules."""
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names.extend(f"{base}.{a.name}" for a in node.names)  # a module, or a name in module `base`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for target in _imported(ast.parse(path.read_text()), package):
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 60 and "allatt_dist.config" in graph  # the whole package was read
    found = cycles(graph)
    shown = "; ".join(" <-> ".join(c) for c in found)
    assert not found, f"import cycles (function-local imports included): {shown}"


def test_config_imports_no_model_code():
    graph = import_graph()
    assert not [m for m in graph["allatt_dist.config"] if m.startswith("allatt_dist.model")]


def test_the_checker_finds_a_cycle_hidden_in_a_function():
    graph = {
        "a": set(),
        "b": set(),
    }
    tree = ast.parse("import b\n\ndef f():\n    from a import thing\n")
    assert _imported(tree, "") == ["b", "a.thing"]
    graph["a"] = {"b"}
    graph["b"] = {"a"}  # what hoisting `from a import thing` inside b.f gives
    assert cycles(graph) == [["a", "b"]]
    skipped = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\n")
    assert _imported(skipped, "") == ["typing.TYPE_CHECKING"]
