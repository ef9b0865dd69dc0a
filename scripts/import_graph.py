"""Count the project's modules, import edges and import circles (tests and bench aside).

Every ``import`` statement counts, at module level or inside a function, ``TYPE_CHECKING`` blocks
included: a lazy import still ties two modules together. An import of a package's name points at
its ``__init__``; the implicit import of a parent package does not count. A circle is a strongly
connected group of two or more modules. Prints one JSON line; ``--list`` also prints the circles.

Usage: ``python scripts/import_graph.py [--list]`` from the repository root.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

PACKAGES = ("engine", "flows", "blocks", "deployments", "irefine")


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path) -> dict[str, Path]:
    return {
        module_name(root, path): path
        for package in PACKAGES
        for path in sorted((root / package).rglob("*.py"))
    }


def imported(tree: ast.AST, name: str, is_package: bool) -> set[str]:
    """The absolute names a module's import statements mention (``from a import b`` gives a, a.b)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = project_modules(root)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for target in imported(ast.parse(path.read_text()), name, path.name == "__init__.py"):
            # `from a import b` mentions a and a.b; a.b counts only where b is a module.
            if target in modules and target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of two or more modules (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(groups)


def main(argv: list[str]) -> None:
    root = Path(__file__).resolve().parent.parent
    graph = import_graph(root)
    found = circles(graph)
    print(
        json.dumps(
            {
                "modules": len(graph),
                "edges": sum(len(t) for t in graph.values()),
                "circles": len(found),
                "modules_in_circles": sum(len(c) for c in found),
            }
        )
    )
    if "--list" in argv:
        for group in found:
            print(" <-> ".join(group))


if __name__ == "__main__":
    main(sys.argv[1:])
