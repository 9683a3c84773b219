"""Many keys in one statement: one array per column, taken apart by ``unnest``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from projections.projection import Target


def unnest(
    alias: str, columns: Sequence[tuple[str, str]], rows: Iterable[tuple[Any, ...]], matched: int
) -> tuple[str, str, list[list[Any]]]:
    """Rows sent as one array per column: ``unnest($1::type[], ...) AS u(column, ...)``, the
    condition matching the first ``matched`` of them to ``alias``'s columns of the same names,
    and the arrays (parameters $1, $2, ... in order)."""
    arrays: list[list[Any]] = [[] for _ in columns]
    for row in rows:
        for array, value in zip(arrays, row, strict=True):
            array.append(value)
    types = ", ".join(f"${i}::{kind}[]" for i, (_, kind) in enumerate(columns, start=1))
    names = ", ".join(f'"{name}"' for name, _ in columns)
    condition = " AND ".join(f'{alias}."{name}" = u."{name}"' for name, _ in columns[:matched])
    return f"unnest({types}) AS u({names})", condition, arrays


VERSION_COLUMNS = (("projection", "text"), ("version", "int"))
PARTITION_COLUMNS = (*VERSION_COLUMNS, ("partition", "int"))


def versions_matching(alias: str, targets: Iterable[Target]) -> tuple[str, str, list[list[Any]]]:
    return unnest(alias, VERSION_COLUMNS, ((t.name, t.version) for t in targets), 2)


def partitions_matching(
    alias: str, keys: Iterable[tuple[Target, int]]
) -> tuple[str, str, list[list[Any]]]:
    return unnest(alias, PARTITION_COLUMNS, ((t.name, t.version, p) for t, p in keys), 3)
