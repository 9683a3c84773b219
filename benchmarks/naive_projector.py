"""The peer: an ``orders`` projector written the way common tutorials write one.

A consumer in a group (read_committed, no auto-commit) takes one record at a time; for each
event it opens ONE Postgres transaction that reads the order's row, applies the event and
upserts the row (single-row statements on asyncpg), commits, and then commits that
record's offset to Kafka. Exactly-once it is not (a crash between the two commits applies an
event twice; the version check below hides that for this table only), and it maintains one
read model where the service's projector maintains four. It is here to be measured against.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import msgspec
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from projections.schema import orders
from service.kernel import envelope
from service.kernel.events import (
    DomainEvent,
    ItemAdded,
    ItemQuantityChanged,
    ItemRemoved,
    OrderCancelled,
    OrderCreated,
    OrderDelivered,
    OrderPaid,
    OrderPlaced,
    OrderShipped,
    ShippingAddressSet,
)

_COLUMNS = [column.name for column in orders.columns]
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM orders WHERE order_id = $1 FOR UPDATE"
_UPSERT = (
    f"INSERT INTO orders ({', '.join(_COLUMNS)}) "
    f"VALUES ({', '.join(f'${i}' for i in range(1, len(_COLUMNS) + 1))}) "
    f"ON CONFLICT (order_id) DO UPDATE SET "
    + ", ".join(f"{name} = EXCLUDED.{name}" for name in _COLUMNS if name != "order_id")
)
_JSON_COLUMNS = ("items", "shipping_address")
_SAMPLE_EVERY_S = 0.5


@dataclass
class NaiveRun:
    events: int = 0
    seconds: float = 0.0  # from the first record received to the last event committed
    join_seconds: float = 0.0
    samples: list[tuple[float, int]] = field(default_factory=list)

    @property
    def per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


def _new_order(order_id: str, event: OrderCreated, at: datetime, version: int) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(_COLUMNS)
    row.update(
        order_id=order_id,
        customer_id=event.customer_id,
        status="draft",
        currency=event.currency,
        total=0,
        item_count=0,
        items=[],
        version=version,
        paid_amount=0,
        refunded_amount=0,
        created_at=at,
        updated_at=at,
        shipping_address=_address(event.shipping_address),
    )
    return row


def _address(address: object) -> Any:
    return None if address is None else msgspec.to_builtins(address)


def apply(
    row: dict[str, Any] | None, sealed: envelope.Envelope, event: DomainEvent
) -> dict[str, Any]:
    """The order's row after ``event`` (a new row for ``OrderCreated``)."""
    at = sealed.occurred_at
    if isinstance(event, OrderCreated):
        return _new_order(sealed.order_id, event, at, sealed.version)
    if row is None:
        raise ValueError(f"{sealed.type} for unknown order {sealed.order_id}")
    row = {**row, "version": sealed.version, "updated_at": at}
    items: list[dict[str, Any]] = row["items"]
    if isinstance(event, ItemAdded):
        items = [
            *items,
            {
                "sku": event.sku,
                "name": event.name,
                "quantity": event.quantity,
                "unit_price": event.unit_price,
            },
        ]
    elif isinstance(event, ItemQuantityChanged):
        items = [{**i, "quantity": event.quantity} if i["sku"] == event.sku else i for i in items]
    elif isinstance(event, ItemRemoved):
        items = [i for i in items if i["sku"] != event.sku]
    elif isinstance(event, OrderPlaced):
        row.update(status="placed", placed_at=at, total=event.total)
    elif isinstance(event, OrderPaid):
        row.update(
            status="paid",
            paid_at=at,
            paid_amount=event.amount,
            payment_reference=event.payment_reference,
        )
    elif isinstance(event, OrderShipped):
        row.update(
            status="shipped",
            shipped_at=at,
            carrier=event.carrier,
            tracking_number=event.tracking_number,
        )
        if event.shipping_address is not None:
            row["shipping_address"] = _address(event.shipping_address)
    elif isinstance(event, ShippingAddressSet):
        row["shipping_address"] = _address(event.shipping_address)
    elif isinstance(event, OrderDelivered):
        row.update(status="delivered", delivered_at=at)
    elif isinstance(event, OrderCancelled):
        row.update(
            status="cancelled",
            cancelled_at=at,
            cancel_reason=event.reason,
            refunded_amount=event.refunded_amount,
        )
    row["items"] = items
    row["item_count"] = len(items)
    if row["status"] == "draft":
        row["total"] = sum(i["quantity"] * i["unit_price"] for i in items)
    return row


async def _project(connection: Any, record: ConsumerRecord[Any, Any]) -> None:
    """One event, one transaction: read the row, apply, upsert (asyncpg caches the plans)."""
    sealed, event = envelope.decode(record.value)
    async with connection.transaction():
        found = await connection.fetchrow(_SELECT, sealed.order_id)
        row = None
        if found is not None:
            row = dict(found)
            row["items"] = json.loads(row["items"])
            if row["shipping_address"] is not None:
                row["shipping_address"] = json.loads(row["shipping_address"])
            if sealed.version <= row["version"]:
                return  # seen before (redelivered after a crash)
        new = apply(row, sealed, event)
        values = [
            json.dumps(new[c]) if c in _JSON_COLUMNS and new[c] is not None else new[c]
            for c in _COLUMNS
        ]
        await connection.execute(_UPSERT, *values)


async def run(
    bootstrap: str, dsn: str, topic: str, *, max_events: int, max_seconds: float
) -> NaiveRun:
    """Project ``topic`` from its start until ``max_events`` or ``max_seconds``, whichever first.

    The clock starts at the first record, so joining the group is not counted against it.
    """
    result = NaiveRun()
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"bench-naive-{uuid.uuid4().hex[:8]}",
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    connection = await asyncpg.connect(dsn, timeout=30)
    joining = time.perf_counter()
    try:
        await consumer.start()
        record = await asyncio.wait_for(consumer.getone(), 60)
        started = time.perf_counter()
        result.join_seconds = started - joining
        next_sample = started + _SAMPLE_EVERY_S
        while True:
            await _project(connection, record)
            await consumer.commit(
                {TopicPartition(record.topic, record.partition): record.offset + 1}
            )
            result.events += 1
            now = time.perf_counter()
            if now >= next_sample:
                result.samples.append((now - started, result.events))
                next_sample += _SAMPLE_EVERY_S
            remaining = max_seconds - (now - started)
            if result.events >= max_events or remaining <= 0:
                break
            try:
                record = await asyncio.wait_for(consumer.getone(), remaining)
            except TimeoutError:
                break
        result.seconds = time.perf_counter() - started
        result.samples.append((result.seconds, result.events))
    finally:
        await consumer.stop()
        await connection.close(timeout=10)
    return result


async def compare_with(dsn: str, reference_dsn: str) -> tuple[int, int]:
    """(orders equal, orders different) between the peer's rows and a reference ``orders``.

    Only orders the peer brought to the reference's version count (it stopped early).
    """
    peer = await asyncpg.connect(dsn, timeout=30)
    reference = await asyncpg.connect(reference_dsn, timeout=30)
    try:
        columns = ", ".join(_COLUMNS)
        ours = {row["order_id"]: row for row in await peer.fetch(f"SELECT {columns} FROM orders")}
        theirs = await reference.fetch(
            f"SELECT {columns} FROM orders WHERE order_id = ANY($1::text[])", list(ours)
        )
    finally:
        await peer.close(timeout=10)
        await reference.close(timeout=10)
    equal = different = 0
    for row in theirs:
        mine = ours[row["order_id"]]
        if mine["version"] != row["version"]:
            continue
        same = all(
            json.loads(mine[c]) == json.loads(row[c]) if c == "items" else mine[c] == row[c]
            for c in _COLUMNS
        )
        equal += same
        different += not same
    return equal, different
