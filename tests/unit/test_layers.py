"""The layout is the architecture: each floor imports only the floors below it.

    floor 0  service/kernel       domain, envelope, errors, settings: no I/O library at all
    floor 1  service/infra        Kafka and Postgres plumbing both sides share
    floor 2  service/write        the write side        projections/   the read side
    floor 3  service/edge         HTTP, CLI and the composition root

The two sides of floor 2 never import each other, and no module hides a project import inside
a function (the usual way to dodge an import cycle that the floors should have prevented).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("service", "projections")
FLOORS = {
    "service.kernel": 0,
    "service.infra": 1,
    "service.write": 2,
    "projections": 2,
    "service.edge": 3,
}
# What the kernel may import besides the standard library: it decides and encodes, no I/O.
KERNEL_THIRD_PARTY = {"msgspec"}


def _modules() -> list[tuple[str, Path]]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if parts == ("service",):
                continue  # the namespace of the floors, not a floor
            found.append((".".join(parts), path))
    return found


def _room(module: str) -> str:
    rooms = [room for room in FLOORS if module == room or module.startswith(room + ".")]
    assert rooms, f"{module} lies on no floor: put it in one of {sorted(FLOORS)}"
    return max(rooms, key=len)


def _imports(tree: ast.Module) -> list[tuple[str, ast.stmt, bool]]:
    """(module imported, statement, whether it sits inside a function)."""
    found: list[tuple[str, ast.stmt, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend((alias.name, child, nested) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.module, child, nested))
                found.extend(
                    (f"{child.module}.{alias.name}", child, nested) for alias in child.names
                )
            visit(child, nested)

    visit(tree, False)
    return found


MODULES = _modules()


@pytest.mark.parametrize(("module", "path"), MODULES, ids=[name for name, _ in MODULES])
def test_a_module_imports_only_from_its_own_floor_or_below(module: str, path: Path) -> None:
    own = _room(module)
    tree = ast.parse(path.read_text(), filename=str(path))
    project = {name for name, _ in MODULES}
    for imported, statement, in_function in _imports(tree):
        top = imported.split(".")[0]
        where = f"{path.relative_to(ROOT)}:{statement.lineno}"
        if top not in PACKAGES or imported not in project:
            continue
        assert not in_function, f"{where}: {imported} imported inside a function"
        theirs = _room(imported)
        assert FLOORS[theirs] <= FLOORS[own], f"{where}: {own} imports {imported}, a floor up"
        if FLOORS[theirs] == FLOORS[own] == 2:
            assert theirs == own, f"{where}: the {own} side imports the other side's {imported}"


def test_the_kernel_needs_nothing_but_the_standard_library_and_msgspec() -> None:
    for module, path in MODULES:
        if _room(module) != "service.kernel":
            continue
        for imported, statement, _ in _imports(ast.parse(path.read_text())):
            top = imported.split(".")[0]
            allowed = top in sys.stdlib_module_names or top in KERNEL_THIRD_PARTY
            assert allowed or top == "service", f"{module}:{statement.lineno} imports {imported}"
