"""Which topic each projection version was built from (``projection_topics``), and how far
its checkpoints reach: what tells a runner that the topic under its name is not the one its
checkpoints were taken on."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import asyncpg

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
    names = [t.name for t in missing]
    versions = [t.version for t in missing]
    await connection.execute(
        "INSERT INTO projection_topics (projection, version, topic, topic_id) "
        "SELECT projection, version, $3, $4 FROM unnest($1::text[], $2::int[]) "
        "AS t(projection, version) ON CONFLICT DO NOTHING",
        names,
        versions,
        topic,
        topic_id,
    )
    return await topic_ids(connection, targets, topic)


async def topic_ids(
    connection: asyncpg.Connection, targets: Sequence[Target], topic: str
) -> dict[Target, uuid.UUID]:
    """The topic id recorded for each of ``targets`` that has one."""
    rows = await connection.fetch(
        "SELECT projection, version, topic_id FROM projection_topics "
        "WHERE topic = $3 AND (projection, version) IN "
        "(SELECT * FROM unnest($1::text[], $2::int[]))",
        [t.name for t in targets],
        [t.version for t in targets],
        topic,
    )
    recorded = {(row["projection"], row["version"]): row["topic_id"] for row in rows}
    return {t: recorded[(t.name, t.version)] for t in targets if (t.name, t.version) in recorded}


async def checkpoint_reach(
    connection: asyncpg.Connection, targets: Sequence[Target], topic: str
) -> dict[int, int]:
    """partition -> the highest checkpoint of ``targets`` there."""
    rows = await connection.fetch(
        "SELECT partition, max(next_offset) AS reach FROM projection_checkpoints "
        "WHERE topic = $3 AND (projection, version) IN "
        "(SELECT * FROM unnest($1::text[], $2::int[])) GROUP BY partition",
        [t.name for t in targets],
        [t.version for t in targets],
        topic,
    )
    return {row["partition"]: row["reach"] for row in rows}
