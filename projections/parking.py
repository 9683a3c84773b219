"""Parking poison events (invariant 7): set aside, retried after a fix, skipped only on request.

A projection halts a partition at an event it cannot apply. ``park`` moves that event to
``parked_events`` and marks its order parked, in the transaction that moves the checkpoint
past it; the runner then goes on, and sets every later event of that order aside too, so the
order's read model never shows a state that skipped an event. ``retry`` applies an order's
parked events in order, in one transaction, and un-parks it; ``skip`` deletes one parked
event, and only when asked.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import asyncpg
import msgspec
from aiokafka import TopicPartition
from sqlalchemy.ext.asyncio import AsyncEngine

from projections.batches import Group
from projections.bookkeeping.checkpoints import StaleCheckpoint, advance_checkpoints
from projections.bookkeeping.halts import clear_halts, locked_halt
from projections.bookkeeping.parked import (
    ParkedEvent,
    discard_parked_event,
    events_of_parked_orders,
    lock_parked_orders,
    park_event,
    parked_events,
    unpark,
)
from projections.bookkeeping.registry import version_states
from projections.models import catalog
from projections.projection import Applied, Db, Target, begin, pg_text, store
from service.infra.eventlog import committed_reader
from service.infra.kafka_clients import KafkaTarget
from service.kernel import envelope
from service.kernel.errors import OperatorRefusal

_log = logging.getLogger(__name__)


class _Correlated(msgspec.Struct):
    """The one envelope field a log line about an event that may not decode wants."""

    correlation_id: str | None = None


_correlated = msgspec.json.Decoder(_Correlated)


def _correlation_id(value: bytes | None) -> str | None:
    """The correlation id of a record, if it is JSON with one (a poison event may not be)."""
    try:
        return _correlated.decode(value or b"").correlation_id
    except msgspec.DecodeError:
        return None


class ParkingRefused(OperatorRefusal):
    """The operation cannot be done as asked; the message says why and what to do."""


async def _target(connection: asyncpg.Connection, name: str, version: int | None) -> Target:
    projection = catalog.select([name])[0]
    known = (await version_states(connection, [name]))[name]
    if version is None:
        live = [v for v, state in known.items() if state == "live"]
        if not live:
            raise ParkingRefused(f"{name} has no live version: run `orders migrate`")
        version = live[0]
    elif known.get(version) not in {"live", "building"}:
        raise ParkingRefused(f"{name} has no live or building version {version}")
    return Target(projection, version)


async def record_at(
    bootstrap: KafkaTarget, topic: str, partition: int, offset: int, *, timeout_s: float = 15.0
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
    bootstrap: KafkaTarget,
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
        halt = await locked_halt(connection, target, topic, partition)
        if halt is None or halt.offset != offset:
            where = "is not halted" if halt is None else f"is halted at {halt.offset}"
            raise ParkingRefused(
                f"{target} {where} in partition {partition}, not at {offset}: only the event "
                "a projection is halted at can be parked (see orders projections status)"
            )
        try:
            await advance_checkpoints(
                connection, topic, [Group(target, partition, offset, offset + 1)]
            )
        except StaleCheckpoint:
            raise ParkingRefused(
                f"the checkpoint of {target} moved meanwhile; check the status"
            ) from None
        parked_event = await park_event(
            connection, target, topic, partition, offset, order_id, value, halt.reason
        )
        await clear_halts(connection, topic, [(target, partition)])
    _log.info(
        "%s: parked %d/%d with order %s (%s)",
        target,
        partition,
        offset,
        order_id,
        halt.reason,
        extra={
            "projection": target.name,
            "partition": partition,
            "offset": offset,
            "order_id": order_id,
            "correlation_id": _correlation_id(value),
        },
    )
    return parked_event


async def parked(
    engine: AsyncEngine, topic: str, names: Sequence[str] | None = None
) -> list[ParkedEvent]:
    """The parked events, by projection and position."""
    wanted = [p.name for p in catalog.select(list(names) if names else None)]
    async with begin(engine) as connection:
        return await parked_events(connection, topic, wanted)


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
        order_ids = await lock_parked_orders(connection, target, order_id)
        if not order_ids:
            raise ParkingRefused(
                f"{target} has no parked order{f' {order_id}' if order_id else ''}"
            )
        parked_now = await events_of_parked_orders(connection, target, topic, order_ids)
        events = []
        for parked_event, value in parked_now:
            try:
                sealed, event = envelope.decode(value)
            except envelope.UndecodableEvent as error:
                raise ParkingRefused(
                    f"{parked_event.partition}/{parked_event.offset} still cannot be decoded: "
                    f"{error}"
                ) from None
            events.append(Applied(sealed, event, parked_event.partition, parked_event.offset))
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
        await unpark(connection, target, topic, order_ids)
    for applied in events:
        _log.info(
            "%s: applied parked event %d/%d of order %s",
            target,
            applied.partition,
            applied.offset,
            applied.envelope.order_id,
            extra={
                "projection": target.name,
                "partition": applied.partition,
                "offset": applied.offset,
                "order_id": applied.envelope.order_id,
                "correlation_id": applied.envelope.correlation_id,
            },
        )
    return [parked_event for parked_event, _ in parked_now]


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
        discarded = await discard_parked_event(connection, target, topic, partition, offset)
        if discarded is None:
            raise ParkingRefused(
                f"{target} has no parked event at {partition}/{offset} (orders projections parked)"
            )
    return discarded
