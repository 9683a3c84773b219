"""The runner's Kafka consumer: creating and stopping it, fetching decoded batches, the
rebalance listener, and the informational offset commits.

Kafka's committed offsets are never read back for correctness: on assignment the runner seeks
to the stored checkpoints (design.md, invariant 6), and commits offsets only so that lag tools
see something. The consumer reads committed events only (``read_committed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Protocol

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import GroupAuthorizationFailedError, KafkaError, TopicAuthorizationFailedError

from projections import metrics
from projections.batches import Batch
from service.infra.kafka_clients import KafkaTarget, client_options
from service.kernel.errors import Unavailable

_log = logging.getLogger(__name__)

# Records taken from the consumer (and decoded) at a time: the event loop gets a turn between
# chunks, so the batch in flight keeps talking to Postgres while the next one is decoded.
FETCH_CHUNK = 2_000


class ConsumerBroken(Unavailable):
    """The Kafka consumer failed in a way only a new consumer recovers from."""


# Kafka's ACLs refuse this principal the topic or the group: a new consumer would be refused
# too, so these end the process, with advice naming the ACL, instead of a retry loop.
REFUSALS = (TopicAuthorizationFailedError, GroupAuthorizationFailedError)


def new_consumer(
    kafka: KafkaTarget,
    group_id: str,
    *,
    instance_id: str | None,
    max_partition_fetch_bytes: int,
) -> AIOKafkaConsumer:
    """A consumer of ``group_id`` that reads committed events and never commits on its own."""
    return AIOKafkaConsumer(
        **client_options(kafka),
        group_id=group_id,
        group_instance_id=f"{instance_id}.{group_id}" if instance_id else None,
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=max_partition_fetch_bytes,
        fetch_max_bytes=max(32 * 1024 * 1024, max_partition_fetch_bytes),
        metadata_max_age_ms=30_000,  # notice new partitions within half a minute
    )


async def start(consumer: AIOKafkaConsumer, topic: str, stop: asyncio.Event, label: str) -> None:
    """Start ``consumer`` and wait until ``topic`` exists (or ``stop``).

    Raises ``ConsumerBroken`` when the broker cannot be reached."""
    try:
        await consumer.start()
        if topic not in await consumer.topics():
            _log.info("%s: waiting for topic %s to exist", label, topic)
        while topic not in await consumer.topics() and not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
    except REFUSALS:
        raise
    except KafkaError as error:
        raise ConsumerBroken from error


async def stop_consumer(consumer: AIOKafkaConsumer) -> None:
    """Stop ``consumer`` (it leaves its group), whatever state the broker is in.

    With the broker away, aiokafka's ``stop`` lets out the CancelledError of a fetch request it
    cancelled itself (one sleeping out its retry back-off). That one is not for this task, and
    passed on it would end the runner as if cancelled: only a cancellation of this task is.
    """
    try:
        with contextlib.suppress(Exception):
            await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        # ``stop`` ended there, before closing its client (connections, metadata task), and
        # will not run again: close it, or each consumer replaced during an outage leaks one.
        with contextlib.suppress(Exception):
            await consumer._client.close()


async def fetch(
    consumer: AIOKafkaConsumer,
    max_records: int,
    wait_ms: int,
    seeks: Mapping[int, int],
    times: metrics.RecordTimes | None = None,
) -> Batch:
    """Up to ``max_records`` records, decoded, in chunks of ``FETCH_CHUNK``; each partition's
    records tagged with its seek counter in ``seeks`` when they were handed over, and the
    timestamp of each chunk's first record noted in ``times`` (for the lag in seconds)."""
    batch = Batch()
    while batch.count < max_records:
        try:
            chunk = await consumer.getmany(
                timeout_ms=wait_ms, max_records=min(FETCH_CHUNK, max_records - batch.count)
            )
        except REFUSALS:
            raise
        except Exception as error:  # aiokafka re-raises its coordinator's failures here
            raise ConsumerBroken from error
        if not chunk:
            break
        wait_ms = 0  # then only what is already buffered
        for tp, fetched in chunk.items():
            batch.add(tp, fetched, seeks.get(tp.partition, 0))
            if times is not None and fetched:
                times.note(tp.partition, fetched[0], fetched[-1])
    return batch


async def commit_offsets(
    consumer: AIOKafkaConsumer, topic: str, offsets: Mapping[int, int], timeout: float
) -> None:
    """Commit ``offsets`` (partition -> offset) for lag tools; given up after ``timeout``:
    while the broker is away aiokafka's commit never fails (it keeps looking for the group
    coordinator), and would hold the loop and a SIGTERM until it is back."""
    if not offsets:
        return
    with contextlib.suppress(KafkaError, TimeoutError):
        commit = consumer.commit({TopicPartition(topic, p): o for p, o in offsets.items()})
        await asyncio.wait_for(commit, timeout)


def assigned(consumer: AIOKafkaConsumer, topic: str) -> list[int]:
    """The partitions of ``topic`` assigned to ``consumer``."""
    return [tp.partition for tp in consumer.assignment() if tp.topic == topic]


async def positions(
    consumer: AIOKafkaConsumer, topic: str, partitions: Sequence[int]
) -> dict[int, int]:
    """partition -> the offset of the next record ``consumer`` will return there."""
    return {p: await consumer.position(TopicPartition(topic, p)) for p in partitions}


class Rebalanced(Protocol):
    """What the rebalance listener needs of the runner."""

    @property
    def label(self) -> str: ...
    @property
    def applying(self) -> asyncio.Lock: ...
    def forget(self, partition: int) -> None: ...
    async def seek_to_checkpoints(self, partitions: Sequence[int]) -> None: ...
    def await_seek(self, partitions: Sequence[int], error: Exception) -> None: ...


class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Forgets revoked partitions and seeks assigned ones to their stored checkpoints.

    aiokafka runs it inside ``getmany``, concurrently with the batch in flight: it waits for
    that batch through ``applying``, a lock held only around database work, never around a
    Kafka call, so it cannot wait on itself."""

    def __init__(self, runner: Rebalanced) -> None:
        self.runner = runner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        async with self.runner.applying:
            for tp in revoked:
                self.runner.forget(tp.partition)
        if revoked:
            _log.info(
                "%s: partitions %s revoked",
                self.runner.label,
                sorted(tp.partition for tp in revoked),
            )

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        metrics.REBALANCES.inc()  # every rebalance ends here, with or without partitions
        partitions = [tp.partition for tp in assigned]
        async with self.runner.applying:
            try:
                await self.runner.seek_to_checkpoints(partitions)
            except Exception as error:  # aiokafka would only log it: the run loop retries
                self.runner.await_seek(partitions, error)
