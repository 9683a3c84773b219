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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from aiokafka import TopicPartition

from service.infra.eventlog import TopicRepartitioned, committed_reader, partition_for, read_to_end
from service.kernel import envelope
from service.kernel.errors import EnvironmentProblem
from service.write.contract import WriterConfig
from service.write.snapshots import PartitionState
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
    # With a changelog: how many of its records were read, and what it must be told before the
    # writer decides anything (``catch_up``), per partition: the orders the log's tail changed
    # (None: every order, the partition had no position) and the position after the tail.
    state_records: int = 0
    catch_up: dict[int, tuple[set[str] | None, int]] = field(default_factory=dict)


async def check_no_open_transaction(
    config: WriterConfig,
    partitions: Sequence[int],
    abort_left_open: Callable[[list[int]], Awaitable[None]],
) -> None:
    """Make sure no transaction holds a partition's last stable offset back (see the module
    docstring), closing one our producer id left with ``abort_left_open``; raise
    ``OpenTransactionInLog`` if one that is not ours does."""
    open_at = await open_transactions(config, partitions)
    if not open_at:
        return
    _log.error(
        "transactions still open in %s after init_transactions (%s; a broker that restarted "
        "uncleanly can lose commit markers): aborting what our producer id left there",
        config.topic,
        open_at,
    )
    await abort_left_open(sorted(open_at))
    open_at = await open_transactions(config, partitions)
    if open_at:
        raise OpenTransactionInLog(config.topic, open_at)
    _log.warning("the transactions left open in %s are aborted", config.topic)


async def open_transactions(
    config: WriterConfig, partitions: Sequence[int]
) -> dict[int, tuple[int, int]]:
    """Partitions whose last stable offset stays behind their end, with (stable, end).

    Called after ``init_transactions``; markers still on their way get a moment: the whole
    ``commit_timeout``. Only then is what is still open aborted, and by then a writer this one
    fenced, still waiting for that batch's markers, has given up on it (its transaction, the
    wait included, is bounded by the same timeout and began earlier). The last stable offset
    does not tell an abort from a commit: this wait is what keeps it from acknowledging a batch
    that the abort ends."""
    watched = [TopicPartition(config.topic, p) for p in partitions]
    deadline = time.monotonic() + config.commit_timeout
    while True:
        stable = await _end_offsets(config, watched, "read_committed")
        end = await _end_offsets(config, watched, "read_uncommitted")
        open_at = {tp.partition: (stable[tp], end[tp]) for tp in watched if stable[tp] < end[tp]}
        if not open_at or time.monotonic() >= deadline:
            return open_at
        await asyncio.sleep(0.2)  # pacing between checks while markers are written


async def read_state(
    config: WriterConfig,
    partition_count: int,
    now: datetime,
    *,
    state_topic: str | None = None,
    partitions: Sequence[int] | None = None,
) -> Loaded:
    """Fold every event of the topic's partitions into order states and receipts; receipts
    that expired before ``now`` (the wall-clock time of the reading) are not kept.

    With ``state_topic`` (the writer's changelog, ``service.write.snapshots``): each partition's
    state is read from it, and only the events after its position are folded on top; a
    partition with no position yet is read whole from the log, as without a changelog.

    ``partitions``: only these (a writer that owns some of the topic's partitions); all by
    default.

    Raises ``TopicRepartitioned`` when orders no longer sit where their key goes."""
    owned = range(partition_count) if partitions is None else sorted(partitions)
    started = time.monotonic()
    state = Committed(idempotency_ttl=config.idempotency_ttl)
    starts: dict[int, int] = {}
    state_records = 0
    if state_topic is not None:
        stored = await _read_changelog(config, state_topic, owned)
        receipts = []
        for partition, kept in stored.items():
            state_records += kept.records
            if kept.position is None:
                continue  # its records are not known to be complete: the log is read whole
            starts[partition] = kept.position
            state.orders.update(kept.orders)
            receipts += [(receipt, key) for key, receipt in kept.receipts.items()]
        # Oldest first, as the writer keeps them (it prunes from the front).
        for receipt, key in sorted(receipts, key=lambda pair: pair[0].occurred_at):
            if receipt.expired(now, config.idempotency_ttl):
                state.forgotten.append((receipt.partition, key))
            else:
                state.keep(key, receipt)
    count = 0
    touched: dict[int, set[str]] = {}
    read_up_to: dict[int, int] = {}
    # The first orders created in each partition, placed as the key would be now.
    unchecked = [_PLACEMENT_CHECKS] * partition_count
    async for batch in read_to_end(config.kafka, config.topic, owned, starts=starts):
        for record in batch:
            sealed, event = envelope.decode(record.value)
            if sealed.version == 1 and unchecked[record.partition]:
                unchecked[record.partition] -= 1
                _check_placement(config.topic, sealed.order_id, record.partition, partition_count)
            state.fold(sealed, event, record.partition, record.offset, now=now)
            touched.setdefault(record.partition, set()).add(sealed.order_id)
            read_up_to[record.partition] = record.offset + 1
            count += 1
    catch_up: dict[int, tuple[set[str] | None, int]] = {}
    if state_topic is not None:
        for partition in owned:
            if partition not in starts:
                catch_up[partition] = (None, read_up_to.get(partition, 0))
            elif partition in touched:
                catch_up[partition] = (touched[partition], read_up_to[partition])
    loaded = Loaded(state, count, time.monotonic() - started, state_records, catch_up)
    _log.info(
        "writer state rebuilt from %d events and %d changelog records (%d orders, %d "
        "idempotency receipts) in %.2fs",
        count,
        state_records,
        len(state.orders),
        len(state.receipts),
        loaded.seconds,
    )
    return loaded


async def _read_changelog(
    config: WriterConfig, state_topic: str, partitions: Sequence[int]
) -> dict[int, PartitionState]:
    """Each of the changelog's ``partitions`` read to its last stable offset."""
    stored = {partition: PartitionState() for partition in partitions}
    async for batch in read_to_end(config.kafka, state_topic, partitions):
        for record in batch:
            stored[record.partition].take(record.key or b"", record.value)
    return stored


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
