"""What a projection is: tables, a load of the rows a batch touches, and a pure fold.

A batch is applied set-based: ``load`` fetches every existing row the batch can touch in a
few queries, ``fold`` applies each event to those rows in memory (no I/O), and ``store``
writes each touched row once: one ``INSERT ... SELECT ... ON CONFLICT`` per table (a plain
INSERT for append-only tables), all of the table's rows in one JSON array; replaying the log,
append-only tables get a binary COPY. Many events of one order thus coalesce into one row
write. The same ``fold``, run over every event in the topic from empty state, is the oracle
the tests compare the tables with.

The SQL is asyncpg's own, built once per table from the SQLAlchemy definition: SQLAlchemy
compiling thousands of bound rows per batch was the projector's main cost, and asyncpg
encoding each value of each row (unnest arrays, COPY) the next one.
"""

from __future__ import annotations

import contextlib
import functools
import operator
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, assert_never

import asyncpg
import msgspec
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncEngine

from projections.schema import Merge, is_append_only, merge_rule, schema_for
from service.infra.database import EncodingRefused, driver_of
from service.kernel.envelope import Envelope
from service.kernel.errors import BadEvent
from service.kernel.events import DomainEvent

Row = dict[str, Any]
Key = tuple[Any, ...]


class Applied(msgspec.Struct, frozen=True, gc=False):
    """One decoded event and where it sits in the topic (never in a reference cycle)."""

    envelope: Envelope
    event: DomainEvent
    partition: int
    offset: int


class ProjectionBug(BadEvent):
    """An event that the projection's fold cannot apply (e.g. an order it never saw created)."""


@dataclass
class TableState:
    """The rows of one table that a batch has loaded or written, by primary key."""

    table: sa.Table
    rows: dict[Key, Row] = field(default_factory=dict)
    # In the order first put (a dict, not a set): see ``store``.
    dirty: dict[Key, None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.keys = _key_names(self.table)
        getter = operator.itemgetter(*self.keys)
        self.key_of: Callable[[Row], Key] = (
            (lambda row: (getter(row),)) if len(self.keys) == 1 else getter
        )

    def get(self, *key: Any) -> Row | None:
        return self.rows.get(key)

    def put(self, row: Row) -> None:
        key = self.key_of(row)
        self.rows[key] = row
        self.dirty[key] = None

    def remember(self, rows: Iterable[Row]) -> None:
        """Rows read from the database: known, not yet changed."""
        key_of = self.key_of
        self.rows.update((key_of(row), row) for row in rows)


@functools.cache
def _key_names(table: sa.Table) -> tuple[str, ...]:
    return tuple(str(column.name) for column in table.primary_key.columns)


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


class Db:
    """One transaction's connection, aimed at the schema of one projection version."""

    def __init__(self, connection: asyncpg.Connection, schema: str) -> None:
        self.connection = connection
        self.schema = schema

    def name(self, table: sa.Table) -> str:
        return f'"{self.schema}"."{table.name}"'

    async def select_in(self, table: sa.Table, column: str, values: Iterable[Any]) -> list[Row]:
        """``SELECT * FROM table WHERE column = ANY(values)`` in one round trip."""
        wanted = list(set(values))
        if not wanted:
            return []
        array_type = _pg_type(table.c[column])
        records = await self.connection.fetch(
            f'SELECT * FROM {self.name(table)} WHERE "{column}" = ANY($1::{array_type}[])', wanted
        )
        return [dict(record) for record in records]  # jsonb decoded: see ``begin``


def pg_text(value: str) -> str:
    """``value`` as Postgres text can hold it: U+0000, which text refuses, as ``\\x00``.

    For what tells an operator which order and why (halts, parked orders): an event from the
    log may carry anything. Never for read-model rows: an event whose row cannot be stored
    halts instead.
    """
    return value.replace("\x00", "\\x00")


class Projection(Protocol):
    """A read model that can be rebuilt from the log alone."""

    name: str
    tables: tuple[sa.Table, ...]

    async def load(self, db: Db, batch: Sequence[Applied]) -> State:
        """Read every existing row that folding ``batch`` may touch."""
        ...

    def fold(self, state: State, applied: Applied) -> None:
        """Apply one event to ``state``. Pure: no I/O, no clock."""
        ...


@dataclass(frozen=True)
class Target:
    """One version of one projection: what a runner applies events to."""

    projection: Projection
    version: int

    @property
    def name(self) -> str:
        return self.projection.name

    @property
    def schema(self) -> str:
        return schema_for(self.name, self.version)

    def __str__(self) -> str:
        return f"{self.name} v{self.version}"


def oracle(projection: Projection, events: Sequence[Applied]) -> State:
    """The read model a pure fold of ``events`` gives, from empty: what the tables must hold."""
    state = State(projection.tables)
    for applied in events:
        projection.fold(state, applied)
    return state


_POSTGRES = postgresql.dialect()  # type: ignore[no-untyped-call]


@functools.cache
def _pg_type(column: sa.Column[Any]) -> str:
    """The column's Postgres type name, for casts (jsonb columns are never cast: see callers)."""
    return str(column.type.compile(dialect=_POSTGRES))


def _merged(table: sa.Table, column: str) -> str:
    rule = merge_rule(table, column)
    match rule:
        case Merge.REPLACE:
            return f'EXCLUDED."{column}"'
        case Merge.ADD:
            return f't."{column}" + EXCLUDED."{column}"'
        case Merge.MAX:
            return f'GREATEST(t."{column}", EXCLUDED."{column}")'
        case Merge.ADD_PER_KEY:
            return f'jsonb_add_per_key(t."{column}", EXCLUDED."{column}")'
        case _:
            assert_never(rule)


@functools.cache
def _write_sql(schema: str, table: sa.Table) -> str:
    """One statement that writes a batch's rows of ``table``, sent as ONE JSON array ($1).

    Each row is an array of its column values. Postgres parses the whole batch as jsonb once
    and takes each value out by position (jsonb columns as they are, the others as text cast
    to their type). Upserts keep the array's order (rows sorted by key: see ``store``).
    Append-only tables only insert, so a second copy of a row is refused by the primary key;
    the others upsert, combining stored and new values by their merge rules.
    """
    name = f'"{schema}"."{table.name}"'
    columns = [column.name for column in table.columns]
    keys = [column.name for column in table.primary_key.columns]
    names = ", ".join(f'"{column}"' for column in columns)
    values = ", ".join(
        f"u.e->{i}"
        if isinstance(column.type, postgresql.JSONB)
        else f"(u.e->>{i})::{_pg_type(column)}"
        for i, column in enumerate(table.columns)
    )
    rows = "jsonb_array_elements($1::text::jsonb)"
    if is_append_only(table):
        return f"INSERT INTO {name} ({names}) SELECT {values} FROM {rows} AS u(e)"
    insert = (
        f"INSERT INTO {name} AS t ({names}) SELECT {values} "
        f"FROM {rows} WITH ORDINALITY AS u(e, n) ORDER BY u.n"
    )
    others = [column for column in columns if column not in keys]
    conflict = ", ".join(f'"{key}"' for key in keys)
    if not others:
        return f"{insert} ON CONFLICT ({conflict}) DO NOTHING"
    updates = ", ".join(f'"{column}" = {_merged(table, column)}' for column in others)
    return f"{insert} ON CONFLICT ({conflict}) DO UPDATE SET {updates}"


@functools.cache
def _as_array(table: sa.Table) -> Callable[[Row], tuple[Any, ...]]:
    """A row's values in column order (a tuple, which msgspec writes as a JSON array)."""
    # Plain str: a column's name is a str subclass (quoted_name), whose dict lookups skip
    # CPython's fast path and made this getter several times slower, per row of every batch.
    getter = operator.itemgetter(*(str(column.name) for column in table.columns))
    if len(table.columns) == 1:
        return lambda row: (getter(row),)
    return getter


_rows_encoder = msgspec.json.Encoder()


@functools.cache
def _copy_columns(table: sa.Table) -> tuple[list[str], Callable[[Row], tuple[Any, ...]]]:
    """Column names for a binary COPY of ``table``, and a row's values in that order.

    jsonb columns come last, as their JSON text, which the pool's jsonb codec sends as it is
    (a ``msgspec.Raw`` stays unparsed)."""
    plain = [str(c.name) for c in table.columns if not isinstance(c.type, postgresql.JSONB)]
    json = [str(c.name) for c in table.columns if isinstance(c.type, postgresql.JSONB)]
    if not json:
        return plain, _as_array(table)
    values = operator.itemgetter(*plain)
    json_values = operator.itemgetter(*json) if len(json) > 1 else lambda row: (row[json[0]],)
    encode = _rows_encoder.encode

    def as_record(row: Row) -> tuple[Any, ...]:
        return (*values(row), *[encode(value).decode() for value in json_values(row)])

    return plain + json, as_record


async def store(db: Db, state: State, *, copy: bool = False) -> int:
    """Write every dirty row, one statement per table. Returns the number of rows.

    Rows travel as one JSON array per table: msgspec encodes it in C, and Postgres (on another
    core) takes it apart, which costs this process far less than encoding each value for
    asyncpg. Upserted rows go in primary-key order, so concurrent batches lock shared rows in
    the same order and cannot deadlock; inserts alone lock no stored row.

    Append-only rows go in the order they were put, which is also their order in memory: taken
    in a set's hash order, the history rows of a batch took 2.7 us each to gather and 1.4 us to
    encode, in order 0.9 and 0.4 (every access a cache miss, on this machine).

    ``copy``: append-only tables get a binary COPY instead. Per row it costs this process about
    3 us more and Postgres about 8 us less (no array to parse, no casts): a loss when this
    process is the bottleneck (one live projector), a gain when every core is busy (a rebuild
    with its builders). A second copy of a row is refused by the primary key either way.
    """
    written = 0
    for table_state in state.tables.values():
        if not table_state.dirty:
            continue
        table = table_state.table
        if copy and is_append_only(table):
            columns, as_record = _copy_columns(table)
            records = [as_record(table_state.rows[key]) for key in table_state.dirty]
            try:
                await db.connection.copy_records_to_table(
                    table.name, schema_name=db.schema, columns=columns, records=records
                )
            except (OverflowError, TypeError, ValueError) as error:
                # A statement's argument that asyncpg cannot encode raises its DataError; a
                # COPY's value lets the encoder's bare error out (int4 beyond range:
                # OverflowError). Raised alike, it halts the event like any refused value.
                if isinstance(error, EncodingRefused):
                    raise
                raise EncodingRefused(f"invalid input for COPY to {table.name}: {error}") from error
            written += len(records)
            continue
        keys: Iterable[Key] = table_state.dirty
        if not is_append_only(table):
            keys = sorted(keys)
        as_array = _as_array(table)
        rows = [as_array(table_state.rows[key]) for key in keys]
        payload = _rows_encoder.encode(rows).decode()
        await db.connection.execute(_write_sql(db.schema, table), payload)
        written += len(rows)
    return written


@contextlib.asynccontextmanager
async def begin(engine: AsyncEngine) -> AsyncIterator[asyncpg.Connection]:
    """A transaction on a raw asyncpg connection from ``engine``'s pool: commits unless raising.

    The pool's connections carry SQLAlchemy's jsonb codec: jsonb values arrive as Python
    objects, never as text."""
    async with engine.connect() as connection:
        driver = await driver_of(connection)
        transaction = driver.transaction()
        try:
            await transaction.start()
        except Exception:
            # E.g. asyncpg's "another operation is in progress": a statement this connection
            # sent before the server went away never finished. Never hand it out again.
            await connection.invalidate()
            raise
        try:
            yield driver
        except BaseException:
            try:
                await transaction.rollback()
            except Exception:
                # The connection broke mid-statement (the server went away): the rollback
                # fails too, and its error (e.g. asyncpg's "another operation is in progress")
                # would hide the one that says why, which callers retry. Never reuse it.
                await connection.invalidate()
            raise
        await transaction.commit()
