"""Reading projection checkpoints: has a projection applied a given event yet?"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import time
import uuid
from collections.abc import Callable

import sqlalchemy as sa
from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy.ext.asyncio import AsyncEngine

from projections.schema import projection_checkpoints, projection_topics, projection_versions
from service.infra.database import driver_of, reading
from service.kernel.errors import Unavailable

POLL_INTERVAL_S = 0.005

WAITS = Counter(
    "orders_consistency_waits",
    "Queries that waited for their consistency token, by outcome",
    ["outcome"],
)
WAIT_SECONDS = Histogram(
    "orders_consistency_wait_seconds",
    "How long a query waited for its consistency token",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
WAITERS = Gauge("orders_consistency_waiters", "Queries waiting for their consistency token now")


def live_checkpoints(topic: str, topic_id: uuid.UUID | None = None) -> sa.Subquery:
    """(projection, partition, next_offset) of each projection's LIVE version on ``topic``;
    with ``topic_id``, only of versions built from the topic of that id (a topic deleted and
    created again under the same name has another: ``projections.identity``).

    A rebuild switches versions only once the new one has applied at least as much as the
    old, so what this answers never goes backwards.
    """
    checkpoints, versions, topics = projection_checkpoints, projection_versions, projection_topics
    query = sa.select(
        checkpoints.c.projection, checkpoints.c.partition, checkpoints.c.next_offset
    ).join(
        versions,
        sa.and_(
            versions.c.projection == checkpoints.c.projection,
            versions.c.version == checkpoints.c.version,
        ),
    )
    if topic_id is not None:
        query = query.join(
            topics,
            sa.and_(
                topics.c.projection == checkpoints.c.projection,
                topics.c.version == checkpoints.c.version,
                topics.c.topic == checkpoints.c.topic,
                topics.c.topic_id == topic_id,
            ),
        )
    return query.where(versions.c.state == "live", checkpoints.c.topic == topic).subquery(
        "live_checkpoints"
    )


async def wait_for_checkpoint(
    engine: AsyncEngine,
    projection: str,
    topic: str,
    partition: int,
    offset: int,
    timeout_s: float,
    topic_id: uuid.UUID | None = None,
) -> bool:
    """Wait until ``projection`` has applied the event at ``offset`` of ``topic``/``partition``.

    The checkpoint holds the offset of the *next* event to apply, so the event at ``offset``
    is applied once ``next_offset > offset``. Polls every few milliseconds; True as soon as
    that holds, False if ``timeout_s`` passes first (or at once, with ``timeout_s <= 0``,
    when it does not hold yet). A missing checkpoint row means nothing is applied yet.
    """
    live = live_checkpoints(topic, topic_id)
    query = sa.select(live.c.next_offset).where(
        live.c.projection == projection, live.c.partition == partition
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


class TooManyWaitingQueries(Unavailable):
    """As many queries as allowed already wait for their consistency tokens: retry shortly."""

    code = "too-many-waiting-queries"


class CheckpointWatcher:
    """Waits for checkpoints on behalf of every query of a process, with ONE poller.

    A query waiting for its consistency token then costs a future, not a database round trip
    every few milliseconds: under load, hundreds of waiting queries polling on their own
    connections would take the CPU and the pool from everything else. The poller sends one
    statement per poll through the raw driver, in autocommit (no BEGIN and ROLLBACK), and a
    token that the latest poll, at most one interval old, shows applied is answered at once.
    At most ``max_waiting`` queries wait at a time; the next is refused at once
    (``TooManyWaitingQueries``) rather than queued without bound.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        topic: str,
        *,
        topic_id: uuid.UUID | None = None,
        poll_interval_s: float = POLL_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        max_waiting: int | None = None,
    ) -> None:
        self.engine = engine
        self.topic = topic
        self.topic_id = topic_id
        self.poll_interval_s = poll_interval_s
        self.clock = clock
        self.max_waiting = max_waiting  # None: no limit
        self.waiting = 0  # queries waiting now
        self.polls = 0
        compiled = sa.select(live_checkpoints(topic, topic_id)).compile(dialect=engine.dialect)
        self._sql = str(compiled)
        self._parameters = [compiled.params[name] for name in compiled.positiontup or ()]
        self._waiting: dict[tuple[str, int], list[tuple[int, asyncio.Future[None]]]] = {}
        self._poller: asyncio.Task[None] | None = None
        # (projection, partition) -> next offset, as of the latest poll, and when it ran.
        self._applied: dict[tuple[str, int], int] = {}
        self._polled_at = -math.inf

    def applied(self, projection: str, partition: int, offset: int) -> bool:
        """The latest poll, if at most one interval old, shows the event at ``offset`` applied.

        What it shows is at most as new as the database: a live checkpoint never goes back
        (``live_checkpoints``), except in an in-place rebuild, whose readers see the read model
        refill anyway."""
        fresh = self.clock() - self._polled_at <= self.poll_interval_s
        return fresh and self._applied.get((projection, partition), -1) > offset

    async def wait(self, projection: str, partition: int, offset: int, timeout_s: float) -> bool:
        """Like ``wait_for_checkpoint``: True once the event at ``offset`` is applied.

        Raises ``TooManyWaitingQueries`` if it would wait while ``max_waiting`` queries do."""
        if self.applied(projection, partition, offset):
            return True
        if timeout_s <= 0:
            return await wait_for_checkpoint(
                self.engine, projection, self.topic, partition, offset, 0, self.topic_id
            )
        if self.max_waiting is not None and self.waiting >= self.max_waiting:
            WAITS.labels("refused").inc()
            raise TooManyWaitingQueries(
                f"{self.waiting} queries already wait for their consistency tokens, the most "
                "this server lets wait; retry shortly"
            )
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._waiting.setdefault((projection, partition), [])
        waiters.append((offset, future))
        self.waiting += 1
        WAITERS.inc()
        if self._poller is None or self._poller.done():
            # Serves every waiting query: started outside the context (correlation id) of the
            # request that happens to start it.
            self._poller = asyncio.create_task(
                self._poll(), name="checkpoint-watcher", context=contextvars.Context()
            )
        started = time.monotonic()
        outcome = "failed"
        try:
            async with asyncio.timeout(timeout_s):
                await future
            outcome = "reached"
            return True
        except TimeoutError:
            outcome = "timed_out"
            return False
        finally:
            WAITS.labels(outcome).inc()
            WAIT_SECONDS.observe(time.monotonic() - started)
            WAITERS.dec()
            self.waiting -= 1
            if (offset, future) in waiters:
                waiters.remove((offset, future))
            if not waiters and self._waiting.get((projection, partition)) is waiters:
                del self._waiting[(projection, partition)]
            if not self._waiting and self._poller is not None:
                self._poller.cancel()  # nobody waits: give the connection back now
                self._poller = None  # the next waiter starts a new poller

    async def close(self) -> None:
        """Stop polling (the process is shutting down); waiting queries then time out."""
        if self._poller is not None and not self._poller.done():
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller

    async def _poll(self) -> None:
        try:
            # Outside a transaction, each statement reads the latest committed checkpoints.
            async with reading(self.engine) as connection:
                driver = await driver_of(connection)
                while self._waiting:
                    rows = await driver.fetch(self._sql, *self._parameters)
                    self._applied = {(row[0], row[1]): row[2] for row in rows}
                    self._polled_at = self.clock()
                    self.polls += 1
                    for key, waiters in list(self._waiting.items()):
                        next_offset = self._applied.get(key)
                        if next_offset is None:
                            continue
                        for offset, future in waiters:
                            if next_offset > offset and not future.done():
                                future.set_result(None)
                    await asyncio.sleep(self.poll_interval_s)  # the polling interval
        except Exception as error:  # the database is away: every waiting query hears it
            for waiters in self._waiting.values():
                for _, future in waiters:
                    if not future.done():
                        future.set_exception(error)
