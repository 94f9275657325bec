"""The package's shape, read from the ``ast`` of every module: no import cycle, at most 8 modules
directly in ``cai_cli/``, and imports that go one way (commands -> stages -> engines, reports and
the run directory's plumbing -> the config and the foundation), as docs/development.md says."""

from __future__ import annotations

import ast

from helpers import ROOT

PACKAGE = ROOT / "cai_cli"

# A module may import a module of a lower rank, or of its own folder; never one above it.
RANK = {"errors": 0, "ui": 0, "reading": 0, "validation": 0, "__init__": 0,
        "config": 1, "run": 2, "data": 3, "constitution": 4, "engines": 5, "reports": 5,
        "stages": 6, "commands": 7, "cli": 8, "__main__": 9}
# The one arrow upwards: the config names its run directory's paths. run/layout.py is names of
# paths only and imports nothing of cai_cli (checked below), so it cannot close a cycle.
ALLOWED_UP = {("cai_cli.config", "cai_cli.run.layout")}


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.with_suffix("").relative_to(ROOT).parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(encoding="utf-8"))
    return found


def imports(found: dict[str, ast.Module]) -> dict[str, set[str]]:
    """Each module's imports of other cai_cli modules, at module level or inside functions: the
    module named, or for ``from package import module`` the module."""
    graph: dict[str, set[str]] = {name: set() for name in found}
    for name, tree in found.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in found
                           else node.module for alias in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in found and t != name}
    return graph


def folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_import_cycle():
    graph = imports(modules())
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            assert state.get(target) != 1, "import cycle: " + " -> ".join(
                path[path.index(target):] + [target] if target in path else path + [target])
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_imports_go_one_way():
    graph = imports(modules())
    assert set(map(folder, graph)) == set(RANK), "a new folder needs its rank here"
    upward = sorted((a, b) for a, targets in graph.items() for b in targets
                    if folder(a) != folder(b) and RANK[folder(b)] >= RANK[folder(a)]
                    and RANK[folder(b)] > 0 and (a, b) not in ALLOWED_UP)
    assert upward == []
    assert graph["cai_cli.run.layout"] == set()


def test_few_modules_at_the_top():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 8, top
