"""The read side's bookkeeping SQL, all of it: checkpoints, halts, parked orders and events, and
the version registry (the tables in ``schema.BOOKKEEPING``).

Each function runs in the caller's transaction, on its raw asyncpg connection. Many keys at a
time travel as one array per column, taken apart by ``unnest`` (``_unnest``): one statement
whatever their number.

Checkpoint moves are compare-and-set (design.md, invariant 6): ``advance_checkpoints`` moves
a checkpoint only from the offset its caller expects, and raises ``StaleCheckpoint`` when any
was elsewhere, so the caller's whole transaction rolls back.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from projections.batches import Group, Halt
from projections.projection import Applied, Target, pg_text
from service.kernel.errors import Conflict

# The bookkeeping rows that belong to one version (besides its registry row).
_OF_A_VERSION = ("projection_checkpoints", "projection_halts", "parked_orders", "parked_events")


class StaleCheckpoint(Conflict):
    """A stored checkpoint is not where this instance expected: another instance moved it."""


def _unnest(
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


_VERSION = (("projection", "text"), ("version", "int"))
_PARTITION = (*_VERSION, ("partition", "int"))


def _versions(alias: str, targets: Iterable[Target]) -> tuple[str, str, list[list[Any]]]:
    return _unnest(alias, _VERSION, ((t.name, t.version) for t in targets), 2)


def _partitions(alias: str, keys: Iterable[tuple[Target, int]]) -> tuple[str, str, list[list[Any]]]:
    return _unnest(alias, _PARTITION, ((t.name, t.version, p) for t, p in keys), 3)


# -- checkpoints ---------------------------------------------------------------------------------


async def read_checkpoints(
    connection: asyncpg.Connection,
    targets: Sequence[Target],
    topic: str,
    partitions: Sequence[int] | None = None,
) -> dict[tuple[str, int], int]:
    """(projection, partition) -> stored next offset, in ``partitions`` (with offset-0 rows
    made for those never seen), or in every partition stored (``None``)."""
    if partitions is None:
        source, condition, arrays = _versions("c", targets)
    else:
        source, condition, arrays = _partitions("c", [(t, p) for t in targets for p in partitions])
        await connection.execute(
            "INSERT INTO projection_checkpoints (projection, version, topic, partition, "
            f'next_offset) SELECT u."projection", u."version", ${len(arrays) + 1}, '
            f'u."partition", 0 FROM {source} ON CONFLICT DO NOTHING',
            *arrays,
            topic,
        )
    rows = await connection.fetch(
        "SELECT c.projection, c.partition, c.next_offset FROM projection_checkpoints c "
        f"JOIN {source} ON {condition} WHERE c.topic = ${len(arrays) + 1}",
        *arrays,
        topic,
    )
    return {(row["projection"], row["partition"]): row["next_offset"] for row in rows}


async def advance_checkpoints(
    connection: asyncpg.Connection, topic: str, moves: Sequence[Group]
) -> None:
    """Compare-and-set each checkpoint from ``expected`` to ``new``, in one statement.

    Raises ``StaleCheckpoint`` unless every checkpoint was at the expected offset.
    """
    columns = (*_PARTITION, ("expected", "int8"), ("new", "int8"), ("at", "timestamptz"))
    rows = (
        (m.target.name, m.target.version, m.partition, m.expected, m.new, m.last_event_at)
        for m in moves
    )
    source, condition, arrays = _unnest("c", columns, rows, 3)
    moved = await connection.fetch(
        'UPDATE projection_checkpoints AS c SET next_offset = u."new", '
        'last_event_at = COALESCE(u."at", c.last_event_at), updated_at = now() '
        f'FROM {source} WHERE {condition} AND c.topic = $7 AND c.next_offset = u."expected" '
        "RETURNING c.projection, c.partition",
        *arrays,
        topic,
    )
    if len(moved) != len(moves):
        done = {(row["projection"], row["partition"]) for row in moved}
        missed = sorted((m.target.name, m.partition) for m in moves)
        raise StaleCheckpoint(
            f"checkpoints {[m for m in missed if m not in done]} were moved by another instance"
        )


async def behind(
    connection: asyncpg.Connection, live: Target, new: Target, topic: str
) -> dict[int, tuple[int, int]]:
    """Partitions where ``new`` has applied less than ``live``: partition -> (new, live)."""
    rows = await connection.fetch(
        "SELECT l.partition, l.next_offset AS live, COALESCE(n.next_offset, 0) AS new "
        "FROM projection_checkpoints l LEFT JOIN projection_checkpoints n "
        "  ON n.projection = l.projection AND n.version = $3 AND n.topic = l.topic "
        "  AND n.partition = l.partition "
        "WHERE l.projection = $1 AND l.version = $2 AND l.topic = $4",
        live.name,
        live.version,
        new.version,
        topic,
    )
    return {row["partition"]: (row["new"], row["live"]) for row in rows if row["new"] < row["live"]}


async def reset_checkpoints(connection: asyncpg.Connection, target: Target) -> None:
    """Put every checkpoint of ``target`` back to 0, and forget its halts and parked orders."""
    await connection.execute(
        "UPDATE projection_checkpoints SET next_offset = 0, last_event_at = NULL, "
        "updated_at = now() WHERE projection = $1 AND version = $2",
        target.name,
        target.version,
    )
    await _delete_of_version(connection, target, _OF_A_VERSION[1:])


async def forget_version(connection: asyncpg.Connection, target: Target) -> None:
    """Delete the checkpoints, halts, parked orders and parked events of ``target``."""
    await _delete_of_version(connection, target, _OF_A_VERSION)


async def _delete_of_version(
    connection: asyncpg.Connection, target: Target, tables: Sequence[str]
) -> None:
    for table in tables:
        await connection.execute(
            f"DELETE FROM {table} WHERE projection = $1 AND version = $2",
            target.name,
            target.version,
        )


@dataclass(frozen=True)
class StoredCheckpoint:
    next_offset: int
    last_event_at: datetime | None


async def topic_checkpoints(
    connection: asyncpg.Connection, topic: str
) -> dict[tuple[str, int, int], StoredCheckpoint]:
    """(projection, version, partition) -> checkpoint, for every version on ``topic``."""
    rows = await connection.fetch(
        "SELECT projection, version, partition, next_offset, last_event_at "
        "FROM projection_checkpoints WHERE topic = $1",
        topic,
    )
    return {
        (r["projection"], r["version"], r["partition"]): StoredCheckpoint(
            r["next_offset"], r["last_event_at"]
        )
        for r in rows
    }


# -- halts ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredHalt:
    offset: int
    order_id: str | None
    reason: str


async def stored_halts(
    connection: asyncpg.Connection,
    targets: Sequence[Target],
    topic: str,
    partitions: Sequence[int] | None = None,
) -> dict[tuple[str, int], int]:
    """(projection, partition) -> the offset it is halted at, in ``partitions`` (default: all)."""
    source, condition, arrays = _versions("h", targets)
    rows = await connection.fetch(
        'SELECT h.projection, h.partition, h."offset" FROM projection_halts h '
        f"JOIN {source} ON {condition} WHERE h.topic = $3 "
        "AND ($4::int[] IS NULL OR h.partition = ANY($4::int[]))",
        *arrays,
        topic,
        None if partitions is None else list(partitions),
    )
    return {(row["projection"], row["partition"]): row["offset"] for row in rows}


async def store_halt(
    connection: asyncpg.Connection, target: Target, topic: str, halt: Halt
) -> None:
    """Store a halt for the status and ``park``; its order id and reason come from the log,
    so they may hold what Postgres text cannot (``pg_text``)."""
    await connection.execute(
        'INSERT INTO projection_halts (projection, version, topic, partition, "offset", '
        "order_id, reason) VALUES ($1, $2, $3, $4, $5, $6, $7) "
        "ON CONFLICT (projection, version, topic, partition) DO UPDATE SET "
        '"offset" = EXCLUDED."offset", order_id = EXCLUDED.order_id, '
        "reason = EXCLUDED.reason, halted_at = now()",
        target.name,
        target.version,
        topic,
        halt.partition,
        halt.offset,
        None if halt.order_id is None else pg_text(halt.order_id),
        pg_text(halt.reason),
    )


async def clear_halts(
    connection: asyncpg.Connection, topic: str, keys: Sequence[tuple[Target, int]]
) -> None:
    """Delete the stored halts of these (version, partition)s."""
    source, condition, arrays = _partitions("h", keys)
    await connection.execute(
        f"DELETE FROM projection_halts h USING {source} WHERE {condition} AND h.topic = $4",
        *arrays,
        topic,
    )


async def locked_halt(
    connection: asyncpg.Connection, target: Target, topic: str, partition: int
) -> StoredHalt | None:
    """The halt of ``target`` in ``partition``, locked FOR UPDATE; None when not halted."""
    row = await connection.fetchrow(
        'SELECT "offset", order_id, reason FROM projection_halts WHERE projection = $1 '
        "AND version = $2 AND topic = $3 AND partition = $4 FOR UPDATE",
        target.name,
        target.version,
        topic,
        partition,
    )
    return None if row is None else StoredHalt(row["offset"], row["order_id"], row["reason"])


async def topic_halts(
    connection: asyncpg.Connection, topic: str
) -> dict[tuple[str, int, int], StoredHalt]:
    """(projection, version, partition) -> its halt, for every version on ``topic``."""
    rows = await connection.fetch(
        'SELECT projection, version, partition, "offset", order_id, reason '
        "FROM projection_halts WHERE topic = $1",
        topic,
    )
    return {
        (r["projection"], r["version"], r["partition"]): StoredHalt(
            r["offset"], r["order_id"], r["reason"]
        )
        for r in rows
    }


# -- parked orders and events --------------------------------------------------------------------


@dataclass(frozen=True)
class ParkedEvent:
    projection: str
    version: int
    partition: int
    offset: int
    order_id: str
    reason: str
    parked_at: datetime


async def parked_orders(
    connection: asyncpg.Connection, targets: Sequence[Target], order_ids: Iterable[str]
) -> set[tuple[str, str]]:
    """(projection, order id) of the given orders that an operator parked; locked FOR SHARE.

    Order ids as stored (``pg_text``)."""
    source, condition, arrays = _versions("p", targets)
    # Usually no order of these versions is parked: one cheap look spares sending every id.
    any_parked = await connection.fetchval(
        f"SELECT EXISTS (SELECT FROM parked_orders p JOIN {source} ON {condition})", *arrays
    )
    wanted = list({pg_text(order_id) for order_id in order_ids}) if any_parked else []
    if not wanted:
        return set()
    rows = await connection.fetch(
        f"SELECT p.projection, p.order_id FROM parked_orders p JOIN {source} ON {condition} "
        "WHERE p.order_id = ANY($3::text[]) FOR SHARE OF p",
        *arrays,
        wanted,
    )
    return {(row["projection"], row["order_id"]) for row in rows}


async def set_aside(
    connection: asyncpg.Connection,
    topic: str,
    events: Sequence[tuple[Target, Applied]],
    raw: dict[tuple[int, int], bytes],
) -> None:
    """Park later events of parked orders with their order (invariant 7)."""
    await connection.executemany(
        'INSERT INTO parked_events (projection, version, topic, partition, "offset", order_id, '
        "value, reason) VALUES ($1, $2, $3, $4, $5, $6, $7, 'its order is parked') "
        "ON CONFLICT DO NOTHING",
        [
            (
                target.name,
                target.version,
                topic,
                applied.partition,
                applied.offset,
                pg_text(applied.envelope.order_id),
                raw[(applied.partition, applied.offset)],
            )
            for target, applied in events
        ],
    )


async def park_event(
    connection: asyncpg.Connection,
    target: Target,
    topic: str,
    partition: int,
    offset: int,
    order_id: str,
    value: bytes,
    reason: str,
) -> ParkedEvent:
    """Park ``order_id`` and store the event at ``partition``/``offset`` as its first."""
    await connection.execute(
        "INSERT INTO parked_orders (projection, version, order_id) VALUES ($1, $2, $3) "
        "ON CONFLICT DO NOTHING",
        target.name,
        target.version,
        order_id,
    )
    parked_at = await connection.fetchval(
        'INSERT INTO parked_events (projection, version, topic, partition, "offset", '
        "order_id, value, reason) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) "
        "RETURNING parked_at",
        target.name,
        target.version,
        topic,
        partition,
        offset,
        order_id,
        value,
        reason,
    )
    return ParkedEvent(target.name, target.version, partition, offset, order_id, reason, parked_at)


_PARKED_EVENT = 'partition, "offset", order_id, reason, parked_at'


def _parked_event(target: Target, row: asyncpg.Record) -> ParkedEvent:
    return ParkedEvent(
        target.name,
        target.version,
        row["partition"],
        row["offset"],
        row["order_id"],
        row["reason"],
        row["parked_at"],
    )


async def parked_events(
    connection: asyncpg.Connection, topic: str, names: Sequence[str]
) -> list[ParkedEvent]:
    """The parked events of the named projections, by projection and position."""
    rows = await connection.fetch(
        f"SELECT projection, version, {_PARKED_EVENT} FROM parked_events "
        "WHERE topic = $1 AND projection = ANY($2::text[]) "
        'ORDER BY projection, version, partition, "offset"',
        topic,
        list(names),
    )
    return [ParkedEvent(**dict(row)) for row in rows]


async def lock_parked_orders(
    connection: asyncpg.Connection, target: Target, order_id: str | None
) -> list[str]:
    """The parked orders of ``target`` (or just ``order_id``), as stored; locked FOR UPDATE."""
    rows = await connection.fetch(
        "SELECT order_id FROM parked_orders WHERE projection = $1 AND version = $2 "
        "AND ($3::text IS NULL OR order_id = $3) ORDER BY order_id FOR UPDATE",
        target.name,
        target.version,
        None if order_id is None else pg_text(order_id),
    )
    return [row["order_id"] for row in rows]


async def events_of_parked_orders(
    connection: asyncpg.Connection, target: Target, topic: str, order_ids: Sequence[str]
) -> list[tuple[ParkedEvent, bytes]]:
    """The parked events of these orders, in log order, each with its value."""
    rows = await connection.fetch(
        f"SELECT {_PARKED_EVENT}, value FROM parked_events "
        "WHERE projection = $1 AND version = $2 AND topic = $3 "
        'AND order_id = ANY($4::text[]) ORDER BY partition, "offset"',
        target.name,
        target.version,
        topic,
        list(order_ids),
    )
    return [(_parked_event(target, row), row["value"]) for row in rows]


async def unpark(
    connection: asyncpg.Connection, target: Target, topic: str, order_ids: Sequence[str]
) -> None:
    """Delete these orders' parked events and un-park them."""
    await connection.execute(
        "DELETE FROM parked_events WHERE projection = $1 AND version = $2 AND topic = $3 "
        "AND order_id = ANY($4::text[])",
        target.name,
        target.version,
        topic,
        list(order_ids),
    )
    await connection.execute(
        "DELETE FROM parked_orders WHERE projection = $1 AND version = $2 "
        "AND order_id = ANY($3::text[])",
        target.name,
        target.version,
        list(order_ids),
    )


async def discard_parked_event(
    connection: asyncpg.Connection, target: Target, topic: str, partition: int, offset: int
) -> ParkedEvent | None:
    """Delete one parked event; None when there was none there."""
    row = await connection.fetchrow(
        "DELETE FROM parked_events WHERE projection = $1 AND version = $2 AND topic = $3 "
        f'AND partition = $4 AND "offset" = $5 RETURNING {_PARKED_EVENT}',
        target.name,
        target.version,
        topic,
        partition,
        offset,
    )
    return None if row is None else _parked_event(target, row)


async def parked_counts(connection: asyncpg.Connection, topic: str) -> dict[tuple[str, int], int]:
    """(projection, version) -> how many of its events are parked."""
    rows = await connection.fetch(
        "SELECT projection, version, count(*) AS events FROM parked_events "
        "WHERE topic = $1 GROUP BY projection, version",
        topic,
    )
    return {(r["projection"], r["version"]): r["events"] for r in rows}


# -- the version registry ------------------------------------------------------------------------


async def version_states(
    connection: asyncpg.Connection, names: Sequence[str], *, states: Sequence[str] | None = None
) -> dict[str, dict[int, str]]:
    """projection -> {version: state}, for the named projections (only ``states``, if given)."""
    rows = await connection.fetch(
        "SELECT projection, version, state FROM projection_versions "
        "WHERE projection = ANY($1::text[]) AND ($2::text[] IS NULL OR state = ANY($2::text[])) "
        "ORDER BY projection, version",
        list(names),
        None if states is None else list(states),
    )
    found: dict[str, dict[int, str]] = {name: {} for name in names}
    for row in rows:
        found[row["projection"]][row["version"]] = row["state"]
    return found


async def share_version_states(
    connection: asyncpg.Connection, names: Sequence[str]
) -> dict[tuple[str, int], str]:
    """(projection, version) -> state, locked FOR SHARE: no switch until the transaction ends."""
    rows = await connection.fetch(
        "SELECT projection, version, state FROM projection_versions "
        "WHERE projection = ANY($1::text[]) FOR SHARE",
        list(names),
    )
    return {(row["projection"], row["version"]): row["state"] for row in rows}


async def lock_version_states(
    connection: asyncpg.Connection, name: str, versions: Sequence[int]
) -> dict[int, str]:
    """version -> state of these versions of ``name``, locked FOR UPDATE (in version order)."""
    rows = await connection.fetch(
        "SELECT version, state FROM projection_versions WHERE projection = $1 "
        "AND version = ANY($2::int[]) ORDER BY version FOR UPDATE",
        name,
        list(versions),
    )
    return {row["version"]: row["state"] for row in rows}


async def add_version(connection: asyncpg.Connection, target: Target, state: str) -> None:
    """Register ``target`` in ``state``."""
    await connection.execute(
        "INSERT INTO projection_versions (projection, version, state) VALUES ($1, $2, $3)",
        target.name,
        target.version,
        state,
    )


async def set_version_state(
    connection: asyncpg.Connection, target: Target, state: str, *, switched: bool = False
) -> None:
    """Put ``target`` in ``state`` (``switched``: also record the time of the switch)."""
    await connection.execute(
        "UPDATE projection_versions SET state = $3"
        f"{', switched_at = now()' if switched else ''} WHERE projection = $1 AND version = $2",
        target.name,
        target.version,
        state,
    )
