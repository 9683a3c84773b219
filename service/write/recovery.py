"""Writer state from the log (design.md 5): read every partition (read_committed, up to the last
stable offset) and fold it into order states and idempotency receipts. Never a read model.

Before the log is read, no transaction may be open on our partitions: ``init_transactions``
has just completed or aborted our own, and nobody else writes here. A transaction still open
there holds the last stable offset back, so the state read would be stale and the next
decisions would repeat versions. One our producer id left open (its marker lost by a broker
that restarted uncleanly: the coordinator thinks it is complete, so nothing else will ever
close it) is closed by aborting: it can only hold unacknowledged commands, because commands
are acknowledged only once their markers are in. If a partition is still held back after
that (another producer's transaction), the writer refuses to take commands and says why.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from aiokafka import TopicPartition

from service.infra.eventlog import TopicRepartitioned, committed_reader, partition_for, read_to_end
from service.kernel import envelope
from service.kernel.errors import EnvironmentProblem
from service.write.contract import WriterConfig
from service.write.staging import Committed

_log = logging.getLogger(__name__)

# How many of the first orders of each partition ``read_state`` checks are where their key goes.
_PLACEMENT_CHECKS = 64


class OpenTransactionInLog(EnvironmentProblem):
    """A transaction is still open on a partition after ``init_transactions``: reading the log
    now would give a stale state, so the writer must not decide anything."""

    def __init__(self, topic: str, open_at: dict[int, tuple[int, int]]) -> None:
        where = ", ".join(
            f"partition {p}: last stable offset {stable} < end {end}"
            for p, (stable, end) in sorted(open_at.items())
        )
        super().__init__(
            f"an open transaction that is not the writer's holds back {topic} ({where}); the "
            "writer will not decide on a stale state. Find it with `kafka-transactions.sh "
            "find-hanging`, resolve it with `kafka-transactions.sh abort`, and make sure "
            "nothing else writes to this topic"
        )
        self.open_at = open_at


@dataclass(frozen=True, slots=True)
class Loaded:
    """The state read from the log, with how many events it took and how long."""

    state: Committed
    events: int
    seconds: float


async def check_no_open_transaction(
    config: WriterConfig,
    partition_count: int,
    abort_left_open: Callable[[list[int]], Awaitable[None]],
) -> None:
    """Make sure no transaction holds a partition's last stable offset back (see the module
    docstring), closing one our producer id left with ``abort_left_open``; raise
    ``OpenTransactionInLog`` if one that is not ours does."""
    open_at = await open_transactions(config, partition_count)
    if not open_at:
        return
    _log.error(
        "transactions still open in %s after init_transactions (%s; a broker that restarted "
        "uncleanly can lose commit markers): aborting what our producer id left there",
        config.topic,
        open_at,
    )
    await abort_left_open(sorted(open_at))
    open_at = await open_transactions(config, partition_count)
    if open_at:
        raise OpenTransactionInLog(config.topic, open_at)
    _log.warning("the transactions left open in %s are aborted", config.topic)


async def open_transactions(
    config: WriterConfig, partition_count: int
) -> dict[int, tuple[int, int]]:
    """Partitions whose last stable offset stays behind their end, with (stable, end).

    Called after ``init_transactions``; markers still on their way get a moment: the whole
    ``commit_timeout``. Only then is what is still open aborted, and by then a writer this one
    fenced, still waiting for that batch's markers, has given up on it (its transaction, the
    wait included, is bounded by the same timeout and began earlier). The last stable offset
    does not tell an abort from a commit: this wait is what keeps it from acknowledging a batch
    that the abort ends."""
    partitions = [TopicPartition(config.topic, p) for p in range(partition_count)]
    deadline = time.monotonic() + config.commit_timeout
    while True:
        stable = await _end_offsets(config, partitions, "read_committed")
        end = await _end_offsets(config, partitions, "read_uncommitted")
        open_at = {tp.partition: (stable[tp], end[tp]) for tp in partitions if stable[tp] < end[tp]}
        if not open_at or time.monotonic() >= deadline:
            return open_at
        await asyncio.sleep(0.2)  # pacing between checks while markers are written


async def read_state(config: WriterConfig, partition_count: int, now: datetime) -> Loaded:
    """Fold every event of the topic's partitions into order states and receipts; receipts
    that expired before ``now`` (the wall-clock time of the reading) are not kept.

    Raises ``TopicRepartitioned`` when orders no longer sit where their key goes."""
    started = time.monotonic()
    state = Committed(idempotency_ttl=config.idempotency_ttl)
    count = 0
    # The first orders created in each partition, placed as the key would be now.
    unchecked = [_PLACEMENT_CHECKS] * partition_count
    async for batch in read_to_end(config.kafka, config.topic, range(partition_count)):
        for record in batch:
            sealed, event = envelope.decode(record.value)
            if sealed.version == 1 and unchecked[record.partition]:
                unchecked[record.partition] -= 1
                _check_placement(config.topic, sealed.order_id, record.partition, partition_count)
            state.fold(sealed, event, record.partition, record.offset, now=now)
            count += 1
    loaded = Loaded(state, count, time.monotonic() - started)
    _log.info(
        "writer state rebuilt from %d events (%d orders, %d idempotency receipts) in %.2fs",
        count,
        len(state.orders),
        len(state.receipts),
        loaded.seconds,
    )
    return loaded


def _check_placement(topic: str, order_id: str, partition: int, partition_count: int) -> None:
    """Raise ``TopicRepartitioned`` if the order's key no longer goes to its partition.

    Orders written before partitions were added sit where the old count put them, and among
    the first orders of a partition that had any then, each lands elsewhere under the new count
    with a probability of at least one half: ``_PLACEMENT_CHECKS`` of them tell, at a hashing
    cost that does not grow with the log."""
    now = partition_for(order_id.encode(), partition_count)
    if now != partition:
        raise TopicRepartitioned(topic, order_id, partition, now, partition_count)


async def _end_offsets(
    config: WriterConfig, partitions: list[TopicPartition], isolation_level: str
) -> dict[TopicPartition, int]:
    consumer = committed_reader(config.kafka, isolation_level=isolation_level)
    await consumer.start()
    try:
        ends: dict[TopicPartition, int] = await consumer.end_offsets(partitions)
        return ends
    finally:
        await consumer.stop()
