"""Which topic each projection version was built from (``projection_topics``), and how far
its checkpoints reach: what tells a runner that the topic under its name is not the one its
checkpoints were taken on."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import asyncpg

from projections.bookkeeping.arrays import versions_matching
from projections.projection import Target


async def record_topic(
    connection: asyncpg.Connection, targets: Sequence[Target], topic: str, topic_id: uuid.UUID
) -> dict[Target, uuid.UUID]:
    """Record ``topic_id`` for the versions that have no topic id yet (a new version, or one
    built before ids were recorded); returns the id each version has now. Writes nothing when
    every version has one (a read-only database answers all the same)."""
    known = await topic_ids(connection, targets, topic)
    missing = [t for t in targets if t not in known]
    if not missing:
        return known
    source, _, arrays = versions_matching("t", missing)
    await connection.execute(
        "INSERT INTO projection_topics (projection, version, topic, topic_id) "
        f'SELECT u."projection", u."version", $3, $4 FROM {source} ON CONFLICT DO NOTHING',
        *arrays,
        topic,
        topic_id,
    )
    return await topic_ids(connection, targets, topic)


async def topic_ids(
    connection: asyncpg.Connection, targets: Sequence[Target], topic: str
) -> dict[Target, uuid.UUID]:
    """The topic id recorded for each of ``targets`` that has one."""
    source, condition, arrays = versions_matching("t", targets)
    rows = await connection.fetch(
        f"SELECT t.projection, t.version, t.topic_id FROM projection_topics t JOIN {source} "
        f"ON {condition} WHERE t.topic = $3",
        *arrays,
        topic,
    )
    recorded = {(row["projection"], row["version"]): row["topic_id"] for row in rows}
    return {t: recorded[(t.name, t.version)] for t in targets if (t.name, t.version) in recorded}


async def checkpoint_reach(
    connection: asyncpg.Connection, targets: Sequence[Target], topic: str
) -> dict[int, int]:
    """partition -> the highest checkpoint of ``targets`` there."""
    source, condition, arrays = versions_matching("c", targets)
    rows = await connection.fetch(
        "SELECT c.partition, max(c.next_offset) AS reach FROM projection_checkpoints c "
        f"JOIN {source} ON {condition} WHERE c.topic = $3 GROUP BY c.partition",
        *arrays,
        topic,
    )
    return {row["partition"]: row["reach"] for row in rows}
