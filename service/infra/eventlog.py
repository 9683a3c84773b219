"""The events topic on Kafka: creating and checking it, and reading it to the last stable offset."""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from service.kernel.errors import EnvironmentProblem

_log = logging.getLogger(__name__)

# The log is the truth: it must never delete or compact history.
REQUIRED_TOPIC_CONFIG = {"retention.ms": "-1", "retention.bytes": "-1", "cleanup.policy": "delete"}
_TOPIC_ALREADY_EXISTS = 36
_UNKNOWN_TOPIC = 3


class TopicWouldLoseHistory(EnvironmentProblem):
    """The events topic is configured to delete or compact events."""


class TopicMissing(EnvironmentProblem):
    """The events topic does not exist on the broker."""


class TopicRepartitioned(EnvironmentProblem):
    """Partitions were added to the topic after orders were written to it: the key's partition
    changed, so an order's next events would land in another partition than its first."""

    def __init__(self, topic: str, order_id: str, partition: int, now: int, count: int) -> None:
        super().__init__(
            f"order {order_id} is in partition {partition} of {topic}, but with the topic's "
            f"{count} partitions its key now goes to partition {now}: partitions were added "
            "after orders were written, and the next events of those orders would land in "
            "another partition than their first, out of order. The writer will not write to "
            "this topic: point ORDERS_TOPIC at a topic with the partition count its orders "
            "were written with"
        )


async def ensure_topic(
    bootstrap: str, topic: str, *, partitions: int, allow_deleting: bool = False
) -> int:
    """Create the events topic with infinite retention, or check an existing one.

    Returns its partition count. Raises ``TopicWouldLoseHistory`` for a topic that would delete
    or compact history, unless ``allow_deleting`` overrides it (then it only warns).
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    await admin.start()
    try:
        count = await _partition_count(admin, topic)
        if count is None:
            brokers = len((await admin.describe_cluster())["brokers"])
            response = await admin.create_topics(
                [
                    NewTopic(
                        topic,
                        num_partitions=partitions,
                        replication_factor=min(3, brokers),
                        topic_configs=REQUIRED_TOPIC_CONFIG,
                    )
                ]
            )
            error = response.to_object()["topic_errors"][0]
            if error["error_code"] not in (0, _TOPIC_ALREADY_EXISTS):
                raise RuntimeError(f"could not create topic {topic}: {error['error_message']}")
            _log.info(
                "created topic %s with %d partitions and infinite retention", topic, partitions
            )
            count = await _wait_for_partitions(admin, topic)
        problems = await _history_problems(admin, topic)
        if problems:
            message = (
                f"topic {topic} would lose history ({', '.join(problems)}); the events topic is "
                "the source of truth and needs retention.ms=-1, retention.bytes=-1 and "
                "cleanup.policy=delete. Fix it with kafka-configs.sh --alter, or set "
                "ORDERS_ALLOW_DELETING_TOPIC=1 to start anyway"
            )
            if not allow_deleting:
                raise TopicWouldLoseHistory(message)
            _log.warning("starting despite an unsafe topic: %s", message)
        return count
    finally:
        await admin.close()


async def topic_partitions(bootstrap: str, topic: str) -> list[int]:
    """The partition ids of ``topic``; ``TopicMissing`` if there is no such topic.

    Lists the topics first: asking for one by name would let a broker that auto-creates topics
    create it, with the wrong retention.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    await admin.start()
    try:
        if topic not in await admin.list_topics():
            raise TopicMissing(
                f"no topic {topic} at {bootstrap}; is the API running (it creates the topic) "
                "and ORDERS_TOPIC right?"
            )
        described = (await admin.describe_topics([topic]))[0]
        if described["error_code"] != 0:
            raise EnvironmentProblem(
                f"cannot describe topic {topic} at {bootstrap}: Kafka error "
                f"{described['error_code']}; check the broker's log"
            )
        return sorted(int(p["partition"]) for p in described["partitions"])
    finally:
        await admin.close()


async def _partition_count(admin: AIOKafkaAdminClient, topic: str) -> int | None:
    described = (await admin.describe_topics([topic]))[0]
    if described["error_code"] == _UNKNOWN_TOPIC:
        return None
    if described["error_code"] != 0:
        raise RuntimeError(f"cannot describe topic {topic}: error {described['error_code']}")
    return len(described["partitions"])


async def _wait_for_partitions(admin: AIOKafkaAdminClient, topic: str) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        count = await _partition_count(admin, topic)
        if count:
            return count
        await asyncio.sleep(0.1)  # pacing between metadata polls
    raise RuntimeError(f"topic {topic} was created but its partitions never appeared")


async def _history_problems(admin: AIOKafkaAdminClient, topic: str) -> list[str]:
    responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    entries = responses[0].to_object()["resources"][0]["config_entries"]
    config = {entry["config_names"]: entry["config_value"] for entry in entries}
    problems = []
    for name, required in REQUIRED_TOPIC_CONFIG.items():
        actual = config.get(name)
        if name == "cleanup.policy":
            if actual is not None and "compact" in actual:
                problems.append(f"cleanup.policy={actual}")
        elif actual is not None and actual != required:
            problems.append(f"{name}={actual}")
    return problems


def partition_for(key: bytes, partitions: int) -> int:
    """The partition of a record key: the one the Kafka clients' default partitioner picks
    (murmur2 of the key), so an order's events stay in the partition they always had."""
    return (_murmur2(key) & 0x7FFFFFFF) % partitions


_MURMUR2_M = 0x5BD1E995


def _murmur2(data: bytes) -> int:
    """Kafka's murmur2 (``org.apache.kafka.common.utils.Utils.murmur2``), as aiokafka's, but
    reading the key a 32-bit word at a time: several times faster in pure Python."""
    length = len(data)
    h = 0x9747B28C ^ length
    whole = length & ~3
    for (k,) in struct.iter_unpack("<I", data[:whole]):
        k = (k * _MURMUR2_M) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * _MURMUR2_M) & 0xFFFFFFFF
        h = ((h * _MURMUR2_M) & 0xFFFFFFFF) ^ k
    extra = length & 3
    if extra >= 3:
        h ^= data[whole + 2] << 16
    if extra >= 2:
        h ^= data[whole + 1] << 8
    if extra >= 1:
        h = ((h ^ data[whole]) * _MURMUR2_M) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * _MURMUR2_M) & 0xFFFFFFFF
    return h ^ (h >> 15)


def committed_reader(bootstrap: str, **overrides: Any) -> AIOKafkaConsumer:
    """A group-less consumer that sees committed transactions only."""
    options: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "isolation_level": "read_committed",
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_partition_fetch_bytes": 8 * 1024 * 1024,
        "fetch_max_bytes": 64 * 1024 * 1024,
    }
    options.update(overrides)
    return AIOKafkaConsumer(**options)


async def topic_end_offsets(consumer: AIOKafkaConsumer, topic: str) -> dict[int, int] | None:
    """partition -> end offset of every partition of ``topic`` (the last stable offsets for a
    read_committed ``consumer``, the high watermarks for a read_uncommitted one); None: no
    such topic. Only partitions the metadata lists are asked for: aiokafka waits forever for
    the end of one that does not exist."""
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        # What ``consumer.topics()`` does, keeping the partitions it learns.
        cluster = await consumer._client.fetch_all_metadata()
        partitions = cluster.partitions_for_topic(topic)
    if not partitions:
        return None
    ends = await consumer.end_offsets([TopicPartition(topic, p) for p in partitions])
    return {tp.partition: offset for tp, offset in ends.items()}


class HighWatermarks:
    """Reads the high watermark of every partition of a topic (``service.kernel.log_ends``
    says why that is a partition's end), through one group-less consumer kept open between
    reads and opened again after a failed start."""

    def __init__(self, bootstrap: str, topic: str, *, request_timeout_ms: int = 5000) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.request_timeout_ms = request_timeout_ms
        self._consumer: AIOKafkaConsumer | None = None

    async def read(self) -> dict[int, int]:
        """partition -> high watermark; ``TopicMissing`` if the broker has no such topic."""
        if self._consumer is None:
            consumer = committed_reader(
                self.bootstrap,
                isolation_level="read_uncommitted",
                request_timeout_ms=self.request_timeout_ms,
            )
            try:
                await consumer.start()
            except BaseException:
                await consumer.stop()  # a failed start leaves its connections open
                raise
            self._consumer = consumer
        ends = await topic_end_offsets(self._consumer, self.topic)
        if ends is None:
            raise TopicMissing(f"no topic {self.topic} at {self.bootstrap}")
        return ends

    async def close(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await consumer.stop()


async def read_to_end(
    bootstrap: str,
    topic: str,
    partitions: Sequence[int],
    *,
    batch_records: int = 10000,
) -> AsyncIterator[list[ConsumerRecord[bytes, bytes]]]:
    """Yield batches of committed records from offset 0 up to each partition's last stable offset.

    The end is taken once, at the start: what is committed later is not read.
    """
    consumer = committed_reader(bootstrap)
    await consumer.start()
    try:
        assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not assigned:
            return
        consumer.assign(assigned)
        await consumer.seek_to_beginning(*assigned)
        # With read_committed, the end offsets are the last stable offsets.
        ends: dict[TopicPartition, int] = await consumer.end_offsets(assigned)
        remaining = {tp for tp in assigned if ends[tp] > 0}
        for tp in assigned:
            if ends[tp] == 0:
                consumer.pause(tp)
        while remaining:
            fetched = await consumer.getmany(timeout_ms=500, max_records=batch_records)
            for tp, records in fetched.items():
                wanted = [r for r in records if r.offset < ends[tp]]
                if wanted:
                    yield wanted
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
                    consumer.pause(tp)
    finally:
        await consumer.stop()
