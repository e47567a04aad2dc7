"""The package's layering: no import cycles, and the core never imports ``analysis``."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("sims_lens", "analysis")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """(module-level imports, imports anywhere) of one file, restricted to the project's modules.

    Imports under ``if TYPE_CHECKING:`` never run (they name types for annotations), so they are no edges.
    """
    tree = ast.parse(path.read_text())
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for stmt in node.body
        for inner in ast.walk(stmt)
    }
    top, anywhere = set(), set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found = {name for name in names if name in known}
        anywhere |= found
        if node in tree.body:
            top |= found
    return top, anywhere


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    known = set(files)
    top, anywhere = {}, {}
    for name, path in files.items():
        top[name], anywhere[name] = _imports(path, known)
    return top, anywhere


COMMAND_LINE = {"sims_lens.cli_run", "sims_lens.cli_sweep"}
"""The command-line modules: the only ones in sims_lens that may import analysis."""


def test_the_core_never_imports_analysis_except_the_command_line():
    _, anywhere = _graph()
    offenders = {
        module: sorted(i for i in imports if i.split(".")[0] == "analysis")
        for module, imports in anywhere.items()
        if module.startswith("sims_lens") and module not in COMMAND_LINE
    }
    assert {m: i for m, i in offenders.items() if i} == {}


def test_no_import_cycles_between_modules():
    """Imports inside functions count too: a deferred import that closes a cycle is still a cycle."""
    _, anywhere = _graph()

    def parents(module: str) -> set[str]:
        parts = module.split(".")
        return {".".join(parts[:i]) for i in range(1, len(parts))}

    # a package's __init__ re-exporting its submodules is not a cycle; edges into a package count once
    edges = {m: {i for i in imports if i not in parents(m) and m not in parents(i)} for m, imports in anywhere.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []
