"""The package's layout: the three verbs are packages over a shared core, with no import cycles and no module
importing another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import locedit

PACKAGE = Path(locedit.__file__).parent


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imports(mods: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """Module -> the locedit modules it imports (at any depth of the file), and every private name imported."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    private = []
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "locedit":
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    graph[name].add(sub if sub in mods else node.module)
                    if alias.name.startswith("_") and sub not in mods:
                        private.append(f"{name} imports {node.module}.{alias.name}")
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name.split(".")[0] == "locedit")
    return {m: {t for t in ts if t in mods and t != m} for m, ts in graph.items()}, private


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph, _ = _imports(_modules())
    assert _cycles(graph) == []


def test_no_private_imports_across_modules():
    _, private = _imports(_modules())
    assert private == []


def test_the_three_verbs_are_packages_over_a_shared_core():
    for package in ("core", "localization", "editing", "verification", "cli"):
        assert (PACKAGE / package / "__init__.py").exists(), package
    assert {locedit.locate.__module__, locedit.edit.__module__, locedit.verify.__module__} <= {
        m for m in _modules() if m.split(".")[1:2] in (["localization"], ["editing"], ["verification"])}
