"""The package's shape holds: no import circle anywhere in src/, the core never imports the tools, and no scorer
reaches the cache. Every import counts, module level and inside functions (an AST walk, nothing is executed)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "kvzip_cache"
# Tooling: may import anything; nothing in the core may import it (the shims keep old command and module names).
TOOLS = ("kvzip_cache.tools", "kvzip_cache.bench", "kvzip_cache.eval", "kvzip_cache.zoo")
SHIMS = ("kvzip_cache.models", "kvzip_cache.score_heads", "kvzip_cache.train_predictor")


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted((SRC / ROOT).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports, each with its parent packages (Python runs them first) unless they are
    ``name``'s own (a package's ``__init__`` importing its modules is how packages work) or the package root."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # "from package import module" imports the module; "from module import name" the module
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target:
                found.add(target)
            target = target.rpartition(".")[0]
            while target and target != ROOT and not name.startswith(target + "."):
                found.add(target)
                target = target.rpartition(".")[0]
    found.discard(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _is_tool(name: str) -> bool:
    return name in SHIMS or any(name == tool or name.startswith(tool + ".") for tool in TOOLS)


def test_no_module_imports_itself_through_others(graph):
    index, low, stack, on_stack, circles, counter = {}, {}, [], set(), [], [0]

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert circles == []


def test_the_core_never_imports_the_tools(graph):
    crossings = sorted(f"{name} -> {target}" for name, targets in graph.items() if not _is_tool(name)
                       for target in targets if _is_tool(target))
    assert crossings == []


def test_no_scorer_reaches_the_cache(graph):
    forbidden = {"kvzip_cache.cache", "kvzip_cache.eviction", "kvzip_cache.persistence", "kvzip_cache.layers"}
    for name in (n for n in graph if n.startswith("kvzip_cache.scorers")):
        seen, todo = set(), [name]
        while todo:
            current = todo.pop()
            for target in graph[current] - seen:
                seen.add(target)
                todo.append(target)
        assert not seen & forbidden, f"{name} reaches {sorted(seen & forbidden)}"


def test_the_walk_sees_the_imports_it_checks(graph):
    """Guards the test itself: relative, absolute and function-level imports are all followed."""
    assert "kvzip_cache.scorers.registry" in graph["kvzip_cache.cache"]
    assert "kvzip_cache.kernels" in graph["kvzip_cache.backends.triton_backend"]
    assert "kvzip_cache.zoo.data" in graph["kvzip_cache.tools.calibration"]  # imported inside a function
    assert "kvzip_cache.backends.reference" in graph["kvzip_cache.backends.triton_backend"]  # from . import x
    assert "kvzip_cache" not in graph["kvzip_cache.cache"]
