"""Parking poison events (invariant 7): set aside, retried after a fix, skipped only on request.

A projection halts a partition at an event it cannot apply. ``park`` moves that event to
``parked_events`` and marks its order parked, in the transaction that moves the checkpoint
past it; the runner then goes on, and sets every later event of that order aside too, so the
order's read model never shows a state that skipped an event. ``retry`` applies an order's
parked events in order, in one transaction, and un-parks it; ``skip`` deletes one parked
event, and only when asked.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from aiokafka import TopicPartition
from sqlalchemy.ext.asyncio import AsyncEngine

from projections.models import catalog
from projections.projection import Applied, Db, begin, pg_text, store
from projections.versions import Target, versions
from service.infra.eventlog import committed_reader
from service.kernel import envelope
from service.kernel.errors import OperatorRefusal


class ParkingRefused(OperatorRefusal):
    """The operation cannot be done as asked; the message says why and what to do."""


@dataclass(frozen=True)
class ParkedEvent:
    projection: str
    version: int
    partition: int
    offset: int
    order_id: str
    reason: str
    parked_at: datetime


async def _target(connection: asyncpg.Connection, name: str, version: int | None) -> Target:
    projection = catalog.select([name])[0]
    known = (await versions(connection, [name]))[name]
    if version is None:
        live = [v for v, state in known.items() if state == "live"]
        if not live:
            raise ParkingRefused(f"{name} has no live version: run `orders migrate`")
        version = live[0]
    elif known.get(version) not in {"live", "building"}:
        raise ParkingRefused(f"{name} has no live or building version {version}")
    return Target(projection, version)


async def record_at(
    bootstrap: str, topic: str, partition: int, offset: int, *, timeout_s: float = 15.0
) -> tuple[bytes | None, bytes]:
    """(key, value) of the committed record at ``partition``/``offset``."""
    consumer = committed_reader(bootstrap)
    await consumer.start()
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        if offset >= end:
            raise ParkingRefused(f"partition {partition} of {topic} has no event at {offset}")
        consumer.seek(tp, offset)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            fetched = await consumer.getmany(tp, timeout_ms=500, max_records=1)
            for record in fetched.get(tp, []):
                if record.offset != offset:
                    break
                return record.key, record.value
            if fetched or await consumer.position(tp) > offset:
                break
    finally:
        await consumer.stop()
    raise ParkingRefused(
        f"offset {offset} of partition {partition} holds no event (a transaction marker?)"
    )


async def park(
    engine: AsyncEngine,
    bootstrap: str,
    topic: str,
    name: str,
    partition: int,
    offset: int,
    *,
    version: int | None = None,
) -> ParkedEvent:
    """Set aside the event ``name`` is halted at, with its order; the partition goes on."""
    key, value = await record_at(bootstrap, topic, partition, offset)
    if not key:
        raise ParkingRefused(
            f"the event at {partition}/{offset} has no key, so no order to park it with"
        )
    order_id = pg_text(key.decode(errors="replace"))
    async with begin(engine) as connection:
        target = await _target(connection, name, version)
        halt = await connection.fetchrow(
            'SELECT "offset", reason FROM projection_halts WHERE projection = $1 AND version = $2 '
            "AND topic = $3 AND partition = $4 FOR UPDATE",
            target.name,
            target.version,
            topic,
            partition,
        )
        if halt is None or halt["offset"] != offset:
            where = "is not halted" if halt is None else f"is halted at {halt['offset']}"
            raise ParkingRefused(
                f"{target} {where} in partition {partition}, not at {offset}: only the event "
                "a projection is halted at can be parked (see orders projections status)"
            )
        moved = await connection.fetchval(
            "UPDATE projection_checkpoints SET next_offset = $5, updated_at = now() "
            "WHERE projection = $1 AND version = $2 AND topic = $3 AND partition = $4 "
            "AND next_offset = $6 RETURNING partition",
            target.name,
            target.version,
            topic,
            partition,
            offset + 1,
            offset,
        )
        if moved is None:
            raise ParkingRefused(f"the checkpoint of {target} moved meanwhile; check the status")
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
            halt["reason"],
        )
        await connection.execute(
            "DELETE FROM projection_halts WHERE projection = $1 AND version = $2 AND topic = $3 "
            "AND partition = $4",
            target.name,
            target.version,
            topic,
            partition,
        )
    return ParkedEvent(
        target.name, target.version, partition, offset, order_id, halt["reason"], parked_at
    )


async def parked(
    engine: AsyncEngine, topic: str, names: Sequence[str] | None = None
) -> list[ParkedEvent]:
    """The parked events, by projection and position."""
    wanted = [p.name for p in catalog.select(list(names) if names else None)]
    async with begin(engine) as connection:
        rows = await connection.fetch(
            'SELECT projection, version, partition, "offset", order_id, reason, parked_at '
            "FROM parked_events WHERE topic = $1 AND projection = ANY($2::text[]) "
            'ORDER BY projection, version, partition, "offset"',
            topic,
            wanted,
        )
    return [ParkedEvent(**dict(row)) for row in rows]


async def retry(
    engine: AsyncEngine,
    topic: str,
    name: str,
    *,
    order_id: str | None = None,
    version: int | None = None,
) -> list[ParkedEvent]:
    """Apply the parked events (of one order, or all) in order, in ONE transaction; un-park.

    If any still fails, nothing changes and ``ParkingRefused`` says which event and why.
    """
    async with begin(engine) as connection:
        target = await _target(connection, name, version)
        orders = await connection.fetch(
            "SELECT order_id FROM parked_orders WHERE projection = $1 AND version = $2 "
            "AND ($3::text IS NULL OR order_id = $3) ORDER BY order_id FOR UPDATE",
            target.name,
            target.version,
            None if order_id is None else pg_text(order_id),
        )
        order_ids = [row["order_id"] for row in orders]
        if not order_ids:
            raise ParkingRefused(
                f"{target} has no parked order{f' {order_id}' if order_id else ''}"
            )
        rows = await connection.fetch(
            'SELECT partition, "offset", order_id, value, reason, parked_at FROM parked_events '
            "WHERE projection = $1 AND version = $2 AND topic = $3 "
            'AND order_id = ANY($4::text[]) ORDER BY partition, "offset"',
            target.name,
            target.version,
            topic,
            order_ids,
        )
        events = []
        for row in rows:
            try:
                sealed, event = envelope.decode(row["value"])
            except envelope.UndecodableEvent as error:
                raise ParkingRefused(
                    f"{row['partition']}/{row['offset']} still cannot be decoded: {error}"
                ) from None
            events.append(Applied(sealed, event, row["partition"], row["offset"]))
        db = Db(connection, target.schema)
        state = await target.projection.load(db, events)
        for applied in events:
            try:
                target.projection.fold(state, applied)
            except Exception as error:  # the fold's refusal is the operator's answer
                raise ParkingRefused(
                    f"{applied.partition}/{applied.offset} still fails: "
                    f"{type(error).__name__}: {error}"
                ) from None
        await store(db, state)
        await connection.execute(
            "DELETE FROM parked_events WHERE projection = $1 AND version = $2 AND topic = $3 "
            "AND order_id = ANY($4::text[])",
            target.name,
            target.version,
            topic,
            order_ids,
        )
        await connection.execute(
            "DELETE FROM parked_orders WHERE projection = $1 AND version = $2 "
            "AND order_id = ANY($3::text[])",
            target.name,
            target.version,
            order_ids,
        )
    return [
        ParkedEvent(
            target.name,
            target.version,
            row["partition"],
            row["offset"],
            row["order_id"],
            row["reason"],
            row["parked_at"],
        )
        for row in rows
    ]


async def skip(
    engine: AsyncEngine,
    topic: str,
    name: str,
    partition: int,
    offset: int,
    *,
    version: int | None = None,
) -> ParkedEvent:
    """Discard one parked event, for good. Its order stays parked until ``retry``."""
    async with begin(engine) as connection:
        target = await _target(connection, name, version)
        row = await connection.fetchrow(
            "DELETE FROM parked_events WHERE projection = $1 AND version = $2 AND topic = $3 "
            'AND partition = $4 AND "offset" = $5 RETURNING order_id, reason, parked_at',
            target.name,
            target.version,
            topic,
            partition,
            offset,
        )
        if row is None:
            raise ParkingRefused(
                f"{target} has no parked event at {partition}/{offset} (orders projections parked)"
            )
    return ParkedEvent(
        target.name,
        target.version,
        partition,
        offset,
        row["order_id"],
        row["reason"],
        row["parked_at"],
    )
