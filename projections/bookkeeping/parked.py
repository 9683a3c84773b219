"""Parked orders and events: what an operator set aside, kept until retried or discarded.

Each function runs in the caller's transaction, on its raw asyncpg connection.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from projections.bookkeeping.arrays import versions_matching
from projections.projection import Applied, Target, pg_text


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
    source, condition, arrays = versions_matching("p", targets)
    # Usually no order of these versions is parked: one cheap look spares sending every id.
    any_parked = await connection.fetchval(
        f"SELECT EXISTS (SELECT FROM parked_orders p JOIN {source} ON {condition})", *arrays
    )
    wanted = list({pg_text(order_id) for order_id in order_ids}) if any_parked else []
    if not wanted:
        return set()
    rows = await connection.fetch(
        f"SELECT p.projection, p.order_id FROM parked_orders p JOIN {source} ON {condition} "
        f"WHERE p.order_id = ANY(${len(arrays) + 1}::text[]) FOR SHARE OF p",
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
