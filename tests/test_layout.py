"""How the library's modules depend on each other: the core knows no method, and no two modules import each other,
when they are loaded or later from inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _library_modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the library by its import name (``plugins/x`` is ``compress.plugins.x``): (file, package)."""
    modules = {}
    for folder in ("compress", "plugins"):
        for path in (ROOT / folder).rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[0] == "plugins":
                parts = ["compress", *parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = (path, path.name == "__init__.py")
    return modules


def _imports(name: str, path: Path, package: bool, modules: dict, module_level: bool) -> set[str]:
    """The library modules ``name`` imports: at module level only (what runs when it is loaded; ``if`` blocks such
    as ``TYPE_CHECKING`` left out), or anywhere, functions included."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if module_level else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = (name if package else name.rpartition(".")[0]).split(".")
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            submodules = [f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in modules]
            found.update(submodules)
            if len(submodules) < len(node.names):
                found.add(source)
    return {module for module in found if module in modules and module != name}


def test_no_module_of_compress_imports_a_plugin():
    """Each method's code lives in its plugin; the core reaches a method only through what the plugin registered
    (peft's mappings, the hub's folder checks). ``compress/__init__`` re-exports the methods' public names and
    ``compress/_registration`` imports ``compress.plugins`` to register them: both by name, on first use."""
    modules = _library_modules()
    core = {name: entry for name, entry in modules.items() if not name.startswith("compress.plugins")}
    assert "compress.hub" in core and "compress.cli.prune" in core
    offenders = {name: sorted(m for m in _imports(name, *entry, modules, module_level=False)
                              if m.startswith("compress.plugins"))
                 for name, entry in core.items()}
    assert {name: found for name, found in offenders.items() if found} == {}


def _import_graph(module_level: bool) -> dict[str, set[str]]:
    modules = _library_modules()
    return {name: _imports(name, *entry, modules, module_level=module_level) for name, entry in modules.items()}


def _circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The groups of modules that reach each other through imports (strongly connected components of two or more
    modules), found with Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in sorted(graph[module]):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = set()
            while not group or module not in group:
                group.add(stack.pop())
            if len(group) > 1:
                found.append(group)

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_no_import_circle_counting_imports_inside_functions():
    """An import inside a function defers a dependency but does not remove it: two modules that need each other
    share their common part through a third that both import."""
    graph = _import_graph(module_level=False)
    circles = _circles(graph)
    assert [{module: sorted(graph[module] & circle) for module in sorted(circle)} for circle in circles] == []


def test_no_import_circle_at_load_time():
    graph = _import_graph(module_level=True)
    done: set[str] = set()

    def circle_from(start: str, path: list[str]) -> list[str] | None:
        for module in sorted(graph[start]):
            if module in path:
                return path[path.index(module):] + [module]
            if module not in done:
                found = circle_from(module, path + [module])
                if found:
                    return found
        done.add(start)
        return None

    for name in sorted(graph):
        circle = circle_from(name, [name])
        assert circle is None, " -> ".join(circle)
