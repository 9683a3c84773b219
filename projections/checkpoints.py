"""Reading projection checkpoints: has a projection applied a given event yet?"""

from __future__ import annotations

import asyncio
import time

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from projections.schema import projection_checkpoints, projection_versions

POLL_INTERVAL_S = 0.005


async def wait_for_checkpoint(
    engine: AsyncEngine,
    projection: str,
    topic: str,
    partition: int,
    offset: int,
    timeout_s: float,
) -> bool:
    """Wait until ``projection`` has applied the event at ``offset`` of ``topic``/``partition``.

    The checkpoint holds the offset of the *next* event to apply, so the event at ``offset``
    is applied once ``next_offset > offset``. Polls every few milliseconds; True as soon as
    that holds, False if ``timeout_s`` passes first (or at once, with ``timeout_s <= 0``,
    when it does not hold yet). A missing checkpoint row means nothing is applied yet.
    """
    checkpoints, versions = projection_checkpoints, projection_versions
    # The live version's checkpoint: a rebuild switches versions only once the new one has
    # applied at least as much, so the answer never goes backwards.
    query = (
        sa.select(checkpoints.c.next_offset)
        .join(
            versions,
            sa.and_(
                versions.c.projection == checkpoints.c.projection,
                versions.c.version == checkpoints.c.version,
            ),
        )
        .where(
            versions.c.state == "live",
            checkpoints.c.projection == projection,
            checkpoints.c.topic == topic,
            checkpoints.c.partition == partition,
        )
    )
    deadline = time.monotonic() + timeout_s
    # One connection for the whole (bounded) wait: a checkout per poll would ping each time.
    # Each poll ends its transaction, so every read sees the latest committed checkpoint.
    async with engine.connect() as connection:
        while True:
            next_offset = await connection.scalar(query)
            await connection.rollback()
            if next_offset is not None and next_offset > offset:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(POLL_INTERVAL_S, remaining))
