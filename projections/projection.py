"""What a projection is: tables, a load of the rows a batch touches, and a pure fold.

A batch is applied set-based: ``load`` fetches every existing row the batch can touch in a
few queries, ``fold`` applies each event to those rows in memory (no I/O), and ``store``
writes each touched row once, as bulk upserts. Many events of one order thus coalesce into one
row write. The same ``fold``, run over every event in the topic from empty state, is the
oracle the tests compare the tables with.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from service.domain import DomainEvent
from service.envelope import Envelope

Row = dict[str, Any]
Key = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Applied:
    """One decoded event and where it sits in the topic."""

    envelope: Envelope
    event: DomainEvent
    partition: int
    offset: int


class ProjectionBug(Exception):
    """An event that the projection's fold cannot apply (e.g. an order it never saw created)."""


@dataclass
class TableState:
    """The rows of one table that a batch has loaded or written, by primary key."""

    table: sa.Table
    rows: dict[Key, Row] = field(default_factory=dict)
    dirty: set[Key] = field(default_factory=set)

    def key_of(self, row: Row) -> Key:
        return tuple(row[column.name] for column in self.table.primary_key.columns)

    def get(self, *key: Any) -> Row | None:
        return self.rows.get(key)

    def put(self, row: Row) -> None:
        key = self.key_of(row)
        self.rows[key] = row
        self.dirty.add(key)

    def remember(self, rows: Iterable[Any]) -> None:
        """Rows read from the database: known, not yet changed."""
        for row in rows:
            mapping = dict(row._mapping)
            self.rows[self.key_of(mapping)] = mapping


class State:
    """Per-table row states of one projection during one batch (or of the whole oracle fold)."""

    def __init__(self, tables: Sequence[sa.Table]) -> None:
        self.tables = {table.name: TableState(table) for table in tables}

    def __getitem__(self, name: str) -> TableState:
        return self.tables[name]

    def snapshot(self) -> dict[str, list[Row]]:
        """Every row, sorted by key: what the tables must hold after a full fold."""
        return {
            name: [state.rows[key] for key in sorted(state.rows)]
            for name, state in self.tables.items()
        }


class Projection(Protocol):
    """A read model that can be rebuilt from the log alone."""

    name: str
    tables: tuple[sa.Table, ...]

    async def load(self, connection: AsyncConnection, batch: Sequence[Applied]) -> State:
        """Read every existing row that folding ``batch`` may touch."""
        ...

    def fold(self, state: State, applied: Applied) -> None:
        """Apply one event to ``state``. Pure: no I/O, no clock."""
        ...


def merge_rule(table: sa.Table, column: str) -> str | None:
    """How an upsert combines a stored value with a batch's: None (replace), add, max, ..."""
    rule: str | None = table.info.get("merge", {}).get(column)
    return rule


def _merged(table: sa.Table, excluded: Any, column: str) -> Any:
    match merge_rule(table, column):
        case None:
            return excluded[column]
        case "add":
            return table.c[column] + excluded[column]
        case "max":
            return sa.func.greatest(table.c[column], excluded[column])
        case "add_per_key":
            return sa.func.jsonb_add_per_key(table.c[column], excluded[column])
        case other:
            raise ValueError(f"unknown merge rule {other!r} on {table.name}.{column}")


async def store(connection: AsyncConnection, state: State) -> int:
    """Upsert every dirty row, one bulk statement per table. Returns the number of rows.

    Rows go in primary-key order, so concurrent batches lock shared rows in the same order
    and cannot deadlock.
    """
    written = 0
    for table_state in state.tables.values():
        if not table_state.dirty:
            continue
        table = table_state.table
        rows = [table_state.rows[key] for key in sorted(table_state.dirty)]
        statement = insert(table)
        keys = [column.name for column in table.primary_key.columns]
        others = [column.name for column in table.columns if column.name not in keys]
        if others:
            statement = statement.on_conflict_do_update(
                index_elements=keys,
                set_={name: _merged(table, statement.excluded, name) for name in others},
            )
        else:
            statement = statement.on_conflict_do_nothing(index_elements=keys)
        await connection.execute(statement, rows)
        written += len(rows)
    return written


async def select_in(
    connection: AsyncConnection, table: sa.Table, column: str, values: Iterable[Any]
) -> Sequence[sa.Row[Any]]:
    """``SELECT * FROM table WHERE column = ANY(values)`` in one round trip."""
    wanted = list(set(values))
    if not wanted:
        return []
    result = await connection.execute(sa.select(table).where(table.c[column].in_(wanted)))
    return result.all()
