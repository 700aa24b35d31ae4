"""The package's shape, read from its source with `ast` (nothing imported, no model): an import graph without
cycles, no module that only tests or benchmarks use, short functions, and few modules outside the subpackages."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "finetune"
#: The longest function or method body allowed, `def` line to last line.
MAX_FUNCTION_LINES = 80
#: .py files directly in finetune/ (its __init__.py included); everything else lives in a subpackage.
MAX_TOP_LEVEL_MODULES = 6


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The package module `name` is, or the nearest package module it lies in; None outside the package."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every package module that `module` imports anywhere in its file (function-local imports included)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            # `from pkg import name`: the module pkg.name when there is one, else pkg itself.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for name in names:
            target = _known(name, modules)
            if target is not None and target != module:
                found.add(target)
    return found


@cache
def _graph() -> dict[str, frozenset[str]]:
    modules = _modules()
    return {module: frozenset(_imports(module, path, modules)) for module, path in modules.items()}


def _cycles(graph: dict[str, frozenset[str]]) -> list[list[str]]:
    """One concrete cycle (first module repeated at the end) per strongly connected component of 2+ modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(start: str) -> None:  # Tarjan's algorithm, iterative (no recursion limit to think about)
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
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
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)

    for module in sorted(graph):
        if module not in index:
            visit(module)

    cycles = []
    for component in components:
        start = min(component)
        # Breadth-first inside the component, back to the start: the shortest cycle through it.
        previous: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in previous:
            following = []
            for node in frontier:
                for child in sorted(graph[node] & component):
                    if child not in previous:
                        previous[child] = node
                        following.append(child)
            frontier = following
        path = [start]
        node = previous[start]
        while node != start:
            path.append(node)
            node = previous[node]
        cycles.append([start, *reversed(path[1:]), start])
    return cycles


def _entry_points() -> set[str]:
    """finetune/cli.py, every package's __init__.py, and the modules finetune itself runs as `python -m finetune.X`."""
    modules = _modules()
    entries = {"finetune.cli"} | {module for module, path in modules.items() if path.name == "__init__.py"}
    for path in modules.values():
        entries |= set(re.findall(r"""["']-m["'],\s*["'](finetune(?:\.\w+)+)["']""", path.read_text(encoding="utf-8")))
    return entries


def test_import_graph_has_no_cycle():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles in finetune/:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_graph_reads_the_imports():
    """The checks below are only as good as the graph: the CLI reaches training, and package-relative imports
    resolve."""
    graph = _graph()
    assert "finetune.run.flow" in graph["finetune.cli"]
    assert graph["finetune.methods"], "finetune/methods/__init__.py imports its methods"


def test_every_module_is_used_by_the_package():
    graph, entries = _graph(), _entry_points()
    imported = {target for targets in graph.values() for target in targets}
    unused = sorted(set(graph) - imported - entries)
    assert not unused, ("modules of finetune/ that no other module imports (only tests or benchmarks would use them; "
                        "move them out or wire them in): " + ", ".join(unused))


def test_no_function_is_longer_than_the_limit():
    long = []
    for path in _modules().values():
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_few_modules_outside_the_subpackages():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, (
        f"{len(top)} modules directly in finetune/ (at most {MAX_TOP_LEVEL_MODULES}; the rest belong in a "
        f"subpackage): {', '.join(top)}")
