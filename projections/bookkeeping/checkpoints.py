"""Checkpoints: where each version of a projection stands in each partition.

Moves are compare-and-set (design.md, invariant 6): ``advance_checkpoints`` moves a
checkpoint only from the offset its caller expects, and raises ``StaleCheckpoint`` when any
was elsewhere, so the caller's whole transaction rolls back.

Each function runs in the caller's transaction, on its raw asyncpg connection.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from projections.batches import Group
from projections.bookkeeping.arrays import (
    PARTITION_COLUMNS,
    partitions_matching,
    unnest,
    versions_matching,
)
from projections.projection import Target
from service.kernel.errors import Conflict

# The bookkeeping rows that belong to one version (besides its registry row).
_HALTS_AND_PARKED = ("projection_halts", "parked_orders", "parked_events")
_OF_A_VERSION = ("projection_checkpoints", *_HALTS_AND_PARKED)


class StaleCheckpoint(Conflict):
    """A stored checkpoint is not where this instance expected: another instance moved it."""


async def read_checkpoints(
    connection: asyncpg.Connection,
    targets: Sequence[Target],
    topic: str,
    partitions: Sequence[int] | None = None,
) -> dict[tuple[str, int], int]:
    """(projection, partition) -> stored next offset, in ``partitions`` (with offset-0 rows
    made for those never seen), or in every partition stored (``None``)."""
    if partitions is None:
        source, condition, arrays = versions_matching("c", targets)
    else:
        source, condition, arrays = partitions_matching(
            "c", [(t, p) for t in targets for p in partitions]
        )
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
    columns = (*PARTITION_COLUMNS, ("expected", "int8"), ("new", "int8"), ("at", "timestamptz"))
    rows = (
        (m.target.name, m.target.version, m.partition, m.expected, m.new, m.last_event_at)
        for m in moves
    )
    source, condition, arrays = unnest("c", columns, rows, 3)
    moved = await connection.fetch(
        'UPDATE projection_checkpoints AS c SET next_offset = u."new", '
        'last_event_at = COALESCE(u."at", c.last_event_at), updated_at = now() '
        f"FROM {source} WHERE {condition} AND c.topic = ${len(arrays) + 1} "
        'AND c.next_offset = u."expected" '
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
    await _delete_of_version(connection, target, _HALTS_AND_PARKED)


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
