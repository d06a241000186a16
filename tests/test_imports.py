"""Every module of the package imports, and the package's import graph has no cycle.

The graph is read from the source with ``ast``: one node per module, one edge per
``import rayembed...`` / ``from rayembed... import ...`` (relative imports resolved). Imports
inside functions count: a lazy import only postpones a cycle to call time, and two modules that
import each other, at any depth, cannot be understood or moved apart. Imports under
``if TYPE_CHECKING:`` do not count (they never run). Importing ``a.b.c`` is an edge to ``a.b.c``
only, not to the packages above it.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import rayembed

PACKAGE_DIR = Path(rayembed.__file__).resolve().parent

# Cycles that are known and left to the work that owns those modules: each entry is the set of
# modules one cycle may span; a cycle anywhere else, or reaching outside its set, fails. None today;
# an entry is for a cycle that must wait for a planned move, never for a new one.
KNOWN_CYCLES: list[frozenset[str]] = []


def _module_files() -> dict[str, tuple[Path, bool]]:
    """``{module name: (file, is_package)}`` for every .py file under the package."""
    out: dict[str, tuple[Path, bool]] = {}
    for f in PACKAGE_DIR.rglob("*.py"):
        parts = ["rayembed", *f.relative_to(PACKAGE_DIR).with_suffix("").parts]
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (f, is_pkg)
    return out


def _imports(name: str, file: Path, is_pkg: bool, modules: set[str]) -> set[str]:
    """The package modules ``name`` imports anywhere in its file (TYPE_CHECKING blocks excepted)."""
    found: set[str] = set()
    package = name.split(".") if is_pkg else name.split(".")[:-1]

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name in modules)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package[: len(package) - (child.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    if sub in modules:
                        found.add(sub)  # from pkg import submodule
                    elif base in modules:
                        found.add(base)
            visit(child)

    visit(ast.parse(file.read_text(), filename=str(file)))
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = _module_files()
    names = set(files)
    return {name: _imports(name, f, is_pkg, names) for name, (f, is_pkg) in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def _path(graph: dict[str, set[str]], members: list[str]) -> str:
    """One concrete loop through a cycle's modules, for the failure message."""
    inside = set(members)
    start = members[0]
    trail, seen, node = [start], {start}, start
    while True:
        nxt = sorted(m for m in graph[node] if m in inside)
        back = [m for m in nxt if m == start]
        if back and len(trail) > 1:
            return " -> ".join([*trail, start])
        fresh = [m for m in nxt if m not in seen]
        if not fresh:
            return " -> ".join([*trail, *back[:1]])
        node = fresh[0]
        trail.append(node)
        seen.add(node)


def test_every_module_imports():
    walked = {"rayembed"} | {m.name for m in pkgutil.walk_packages(rayembed.__path__, "rayembed.")}
    assert walked == set(_module_files()), "a folder under platform/rayembed lacks __init__.py"
    for name in sorted(walked):
        importlib.import_module(name)


def test_cycle_finder_sees_a_function_level_cycle(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    pkg = tmp_path / "m.py"
    pkg.write_text("def f():\n    from rayembed.x import y\n")
    assert _imports("rayembed.m", pkg, False, {"rayembed.x", "rayembed.m"}) == {"rayembed.x"}
    pkg.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import rayembed.x\n")
    assert _imports("rayembed.m", pkg, False, {"rayembed.x", "rayembed.m"}) == set()


def test_no_import_cycle():
    graph = import_graph()
    new = [c for c in cycles(graph) if not any(set(c) <= known for known in KNOWN_CYCLES)]
    assert not new, "import cycles in platform/rayembed:\n" + "\n".join(_path(graph, c) for c in new)
