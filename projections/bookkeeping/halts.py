"""Halts: the partitions a version stopped at, with the event and why (design.md, invariant 7).

Each function runs in the caller's transaction, on its raw asyncpg connection.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from projections.batches import Halt
from projections.bookkeeping.arrays import partitions_matching, versions_matching
from projections.projection import Target, pg_text


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
    source, condition, arrays = versions_matching("h", targets)
    topic_at, partitions_at = len(arrays) + 1, len(arrays) + 2
    rows = await connection.fetch(
        'SELECT h.projection, h.partition, h."offset" FROM projection_halts h '
        f"JOIN {source} ON {condition} WHERE h.topic = ${topic_at} "
        f"AND (${partitions_at}::int[] IS NULL OR h.partition = ANY(${partitions_at}::int[]))",
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
    source, condition, arrays = partitions_matching("h", keys)
    await connection.execute(
        f"DELETE FROM projection_halts h USING {source} WHERE {condition} "
        f"AND h.topic = ${len(arrays) + 1}",
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
