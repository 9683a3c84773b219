"""The machine's own limits, measured in the same run: raw consume, raw COPY, raw upserts.

(Raw produce is ``events.produce`` on a pre-built list of records.)
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer, TopicPartition
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import JSONB

from projections.schema import orders, schema_for
from service.kernel import envelope


@dataclass(frozen=True)
class Rate:
    count: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0


async def consume(
    bootstrap: str,
    topic: str,
    *,
    partitions: int,
    expected: int,
    timeout: float,
    stop_after: int | None = None,
) -> Rate:
    """Read the topic (read_committed, no group) with ``getmany`` and decode every record.

    All ``expected`` records, or only the first ``stop_after`` or so (a rate needs no more).
    Fetch sizes and batch size are the projection runner's, so the ratio is like for like.
    """
    wanted = expected if stop_after is None else min(stop_after, expected)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=4 * 1024 * 1024,
        fetch_max_bytes=32 * 1024 * 1024,
    )
    async with asyncio.timeout(timeout):
        await consumer.start()
        try:
            assigned = [TopicPartition(topic, p) for p in range(partitions)]
            consumer.assign(assigned)
            await consumer.seek_to_beginning(*assigned)
            ends = await consumer.end_offsets(assigned)
            count = 0
            started = time.perf_counter()
            while count < wanted:
                fetched = await consumer.getmany(timeout_ms=200, max_records=5000)
                for batch in fetched.values():
                    for record in batch:
                        envelope.decode(record.value)
                    count += len(batch)
                if not fetched:
                    positions = [await consumer.position(tp) for tp in assigned]
                    if all(p >= ends[tp] for p, tp in zip(positions, assigned, strict=True)):
                        break
            seconds = time.perf_counter() - started
        finally:
            await consumer.stop()
    if count < wanted or (stop_after is None and count != expected):
        raise RuntimeError(f"raw consume read {count} records, expected {wanted}")
    return Rate(count, seconds)


def _orders_row(rng: random.Random, index: int) -> dict[str, Any]:
    at = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=index * 7)
    items: list[dict[str, Any]] = [
        {
            "sku": f"SKU-{i}-{rng.randrange(5000):04d}",
            "name": "Article",
            "quantity": 2,
            "unit_price": rng.randrange(100, 20_000),
        }
        for i in range(rng.randint(1, 3))
    ]
    total = sum(item["quantity"] * item["unit_price"] for item in items)
    return {
        "order_id": f"{rng.getrandbits(128):032x}",
        "customer_id": f"c-{rng.randrange(30_000):07d}",
        "status": "paid",
        "currency": "EUR",
        "total": total,
        "item_count": len(items),
        "items": json.dumps(items),
        "version": len(items) + 3,
        "paid_amount": total,
        "refunded_amount": 0,
        "payment_reference": f"psp-{rng.randrange(10**9)}",
        "created_at": at,
        "placed_at": at + timedelta(minutes=5),
        "paid_at": at + timedelta(minutes=9),
        "updated_at": at + timedelta(minutes=9),
    }


def _fallback(column: sa.Column[Any]) -> Any:
    """A value for a column this benchmark does not know (the schema grew): by type."""
    if column.nullable:
        return None
    if isinstance(column.type, JSONB):
        return "{}"
    python_type = column.type.python_type
    if python_type is datetime:
        return datetime(2026, 1, 1, tzinfo=UTC)
    return python_type()


async def _live_orders(connection: asyncpg.Connection) -> str:
    """The live version's ``orders`` table (``orders`` itself is a view on it: no indexes)."""
    version = await connection.fetchval(
        "SELECT version FROM projection_versions WHERE projection = 'orders' AND state = 'live'"
    )
    return f'"{schema_for("orders", version)}".orders'


def orders_rows(count: int, *, seed: int = 11) -> tuple[list[str], list[tuple[Any, ...]]]:
    """``count`` rows shaped like the ``orders`` read model (columns from its schema)."""
    rng = random.Random(seed)
    columns = [column.name for column in orders.columns]
    rows = []
    for index in range(count):
        known = _orders_row(rng, index)
        rows.append(
            tuple(known[c.name] if c.name in known else _fallback(c) for c in orders.columns)
        )
    return columns, rows


async def copy_rows(dsn: str, *, count: int, batch: int, timeout: float) -> Rate:
    """``copy_records_to_table`` into a copy of the ``orders`` table (same columns, indexes).

    One transaction per ``batch`` rows, like the projector's batches. The database must be
    migrated (the table is created ``LIKE orders INCLUDING ALL``).
    """
    columns, rows = orders_rows(count)
    connection = await asyncpg.connect(dsn, timeout=30)
    try:
        async with asyncio.timeout(timeout):
            await connection.execute(
                f"CREATE TABLE bench_orders_copy (LIKE {await _live_orders(connection)} "
                "INCLUDING ALL)"
            )
            started = time.perf_counter()
            for start in range(0, count, batch):
                async with connection.transaction():
                    await connection.copy_records_to_table(
                        "bench_orders_copy", records=rows[start : start + batch], columns=columns
                    )
            seconds = time.perf_counter() - started
            await connection.execute("DROP TABLE bench_orders_copy")
    finally:
        await connection.close(timeout=10)
    return Rate(count, seconds)


@dataclass(frozen=True)
class UpsertRates:
    """Batched upserts of ``count`` new rows, then of the same ``count`` rows again (updates)."""

    inserted: Rate
    updated: Rate

    @property
    def per_second(self) -> float:
        seconds = self.inserted.seconds + self.updated.seconds
        return (self.inserted.count + self.updated.count) / seconds if seconds > 0 else 0.0


def unnest_upsert(table: sa.Table, target: str) -> str:
    """``INSERT INTO target SELECT * FROM unnest($1::type[], ...) ON CONFLICT DO UPDATE``.

    One statement per batch whatever its size: each column travels as one array parameter.
    """
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    arrays = ", ".join(
        f"${index}::{column.type.compile(dialect=dialect)}[]"
        for index, column in enumerate(table.columns, start=1)
    )
    names = ", ".join(f'"{column.name}"' for column in table.columns)
    keys = ", ".join(f'"{column.name}"' for column in table.primary_key.columns)
    updates = ", ".join(
        f'"{column.name}" = EXCLUDED."{column.name}"'
        for column in table.columns
        if not column.primary_key
    )
    return (
        f"INSERT INTO {target} ({names}) SELECT * FROM unnest({arrays}) "
        f"ON CONFLICT ({keys}) DO UPDATE SET {updates}"
    )


async def upsert_rows(dsn: str, *, count: int, batch: int, timeout: float) -> UpsertRates:
    """Batched ``unnest`` upserts into a copy of the ``orders`` table (same columns, indexes).

    A first pass inserts ``count`` new rows, a second upserts the same keys with new values
    (the conflict path, which is what a projector mostly does). One transaction per ``batch``.
    """
    columns, rows = orders_rows(count)
    status_at = columns.index("status")
    version_at = columns.index("version")
    changed = [
        (
            *row[:status_at],
            "shipped",
            *row[status_at + 1 : version_at],
            row[version_at] + 1,
            *row[version_at + 1 :],
        )
        for row in rows
    ]
    statement = unnest_upsert(orders, "bench_orders_upsert")
    connection = await asyncpg.connect(dsn, timeout=30)
    try:
        async with asyncio.timeout(timeout):
            await connection.execute(
                f"CREATE TABLE bench_orders_upsert (LIKE {await _live_orders(connection)} "
                "INCLUDING ALL)"
            )
            prepared = await connection.prepare(statement)
            passes = []
            for source in (rows, changed):
                started = time.perf_counter()
                for start in range(0, count, batch):
                    chunk = source[start : start + batch]
                    async with connection.transaction():
                        await prepared.fetch(*(list(column) for column in zip(*chunk, strict=True)))
                passes.append(Rate(count, time.perf_counter() - started))
            await connection.execute("DROP TABLE bench_orders_upsert")
    finally:
        await connection.close(timeout=10)
    return UpsertRates(*passes)
