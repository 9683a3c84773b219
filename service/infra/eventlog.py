"""Reading the events topic: to the last stable offset, and where each partition ends.

``service.infra.topic`` creates and checks the topic itself."""

from __future__ import annotations

import json
import logging
import random
import struct
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from service.infra.kafka_clients import KafkaTarget, client_options
from service.infra.topic import TopicMissing
from service.kernel.errors import EnvironmentProblem

_log = logging.getLogger(__name__)


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


def partition_for(key: bytes, partitions: int) -> int:
    """The partition of a record key: the one the Kafka clients' default partitioner picks
    (murmur2 of the key), so an order's events stay in the partition they always had."""
    return (_murmur2(key) & 0x7FFFFFFF) % partitions


# Drawing ids until one falls in the wanted partition takes ``partitions`` draws on average;
# this many fail with a probability below 1e-30 for any partition count.
_MAX_DRAWS_PER_PARTITION = 70


def new_order_id(caller: str | None, idempotency_key: str, partitions: int) -> str:
    """A new order's id (a random UUID) in the partition the caller and its Idempotency-Key
    pick: a create retried with the same key lands in the same partition, so the same writer
    (the partition's owner) decides it and finds the first attempt's receipt there."""
    wanted = partition_for(json.dumps([caller, idempotency_key]).encode(), partitions)
    # Only the id's last 4 hex digits (random in a UUID4) are drawn again: the hash of its
    # first 32 characters is taken once, and each draw costs one more word of murmur2.
    head = str(uuid.uuid4())[:32].encode()
    state = _murmur2_words(0x9747B28C ^ 36, head)
    start = random.getrandbits(16)
    for draw in range(min(0x10000, _MAX_DRAWS_PER_PARTITION * partitions)):
        tail = b"%04x" % ((start + draw) & 0xFFFF)
        if (_murmur2_final(_murmur2_words(state, tail)) & 0x7FFFFFFF) % partitions == wanted:
            return (head + tail).decode()
    raise RuntimeError(f"no order id fell in partition {wanted} of {partitions}")  # never


_MURMUR2_M = 0x5BD1E995


def _murmur2(data: bytes) -> int:
    """Kafka's murmur2 (``org.apache.kafka.common.utils.Utils.murmur2``), as aiokafka's, but
    reading the key a 32-bit word at a time: several times faster in pure Python."""
    length = len(data)
    whole = length & ~3
    h = _murmur2_words(0x9747B28C ^ length, data[:whole])
    extra = length & 3
    if extra >= 3:
        h ^= data[whole + 2] << 16
    if extra >= 2:
        h ^= data[whole + 1] << 8
    if extra >= 1:
        h = ((h ^ data[whole]) * _MURMUR2_M) & 0xFFFFFFFF
    return _murmur2_final(h)


def _murmur2_words(h: int, words: bytes) -> int:
    """murmur2's state ``h`` after mixing in ``words`` (a multiple of 4 bytes)."""
    for (k,) in struct.iter_unpack("<I", words):
        k = (k * _MURMUR2_M) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * _MURMUR2_M) & 0xFFFFFFFF
        h = ((h * _MURMUR2_M) & 0xFFFFFFFF) ^ k
    return h


def _murmur2_final(h: int) -> int:
    h ^= h >> 13
    h = (h * _MURMUR2_M) & 0xFFFFFFFF
    return h ^ (h >> 15)


def committed_reader(kafka: KafkaTarget, **overrides: Any) -> AIOKafkaConsumer:
    """A group-less consumer that sees committed transactions only."""
    options: dict[str, Any] = {
        **client_options(kafka),
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

    def __init__(self, kafka: KafkaTarget, topic: str, *, request_timeout_ms: int = 5000) -> None:
        self.kafka = kafka
        self.topic = topic
        self.request_timeout_ms = request_timeout_ms
        self._consumer: AIOKafkaConsumer | None = None

    async def read(self) -> dict[int, int]:
        """partition -> high watermark; ``TopicMissing`` if the broker has no such topic."""
        if self._consumer is None:
            consumer = committed_reader(
                self.kafka,
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
            raise TopicMissing(f"no topic {self.topic} at {self.kafka}")
        return ends

    async def close(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await consumer.stop()


async def read_to_end(
    kafka: KafkaTarget,
    topic: str,
    partitions: Sequence[int],
    *,
    batch_records: int = 10000,
    starts: Mapping[int, int] | None = None,
) -> AsyncIterator[list[ConsumerRecord[bytes, bytes]]]:
    """Yield batches of committed records from offset 0 (or ``starts[partition]``) up to each
    partition's last stable offset.

    The end is taken once, at the start: what is committed later is not read.
    """
    consumer = committed_reader(kafka)
    await consumer.start()
    try:
        assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not assigned:
            return
        consumer.assign(assigned)
        await consumer.seek_to_beginning(*assigned)
        for tp in assigned:
            if starts and starts.get(tp.partition):
                consumer.seek(tp, starts[tp.partition])
        # With read_committed, the end offsets are the last stable offsets.
        ends: dict[TopicPartition, int] = await consumer.end_offsets(assigned)
        first = {tp: (starts or {}).get(tp.partition, 0) for tp in assigned}
        remaining = {tp for tp in assigned if ends[tp] > first[tp]}
        for tp in assigned:
            if tp not in remaining:
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
