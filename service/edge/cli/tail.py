"""``orders events tail``: the events on the topic, decoded, one line each, for debugging.

The reader is a read_committed consumer without a consumer group: it assigns the partitions
itself and never commits, so tailing changes nothing for the writer or the projector, and shows
exactly what they see (committed events only). A record that does not decode is printed as such,
with its position and the reason, and the tail goes on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO, TypeAlias

import msgspec
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from service.infra.eventlog import committed_reader, read_to_end
from service.infra.kafka_clients import KafkaTarget
from service.infra.topic import topic_partitions
from service.kernel import envelope

_log = logging.getLogger(__name__)

Record: TypeAlias = ConsumerRecord[bytes, bytes]

# How long one poll waits for new records while following: the bound on reacting to ``stop``.
_POLL_MS = 200
# How much of an undecodable value a readable line shows.
_PREVIEW_BYTES = 120
_TYPE_WIDTH = max(len(name) for name in envelope.CURRENT_SCHEMA_VERSION)


@dataclass(frozen=True, kw_only=True)
class TailOptions:
    """What ``orders events tail`` was asked for."""

    order_id: str | None = None
    from_beginning: bool = False
    follow: bool = False
    limit: int | None = None
    as_json: bool = False

    @property
    def follows(self) -> bool:
        """Starting at the end only makes sense waiting for new events, so it implies follow."""
        return self.follow or not self.from_beginning


def partition_for(order_id: str, partitions: Sequence[int]) -> int:
    """The partition the writer's producer sends an order's events to.

    The writer keys every record by the order id and leaves aiokafka's default partitioner in
    place (murmur2 of the key bytes, like the Java client), so this asks that same partitioner.
    """
    ordered = sorted(partitions)
    return int(DefaultPartitioner()(order_id.encode(), ordered, ordered))


async def tail(
    bootstrap: KafkaTarget,
    topic: str,
    out: TextIO,
    options: TailOptions,
    *,
    stop: asyncio.Event | None = None,
    started: asyncio.Event | None = None,
) -> int:
    """Print the committed events of ``topic`` to ``out``, one line each; return how many.

    ``--from-beginning`` without ``follow``: from offset 0 to the last stable offsets taken at the
    start, then return. Otherwise follow from offset 0 or from the current end until ``stop`` is
    set (or ``limit`` lines are out). ``started`` is set once the starting positions are fixed:
    an event committed after that is printed when following. With an order id, only that
    order's partition is read and only its events are printed.
    """
    partitions = await topic_partitions(bootstrap, topic)
    if options.order_id is not None:
        partitions = [partition_for(options.order_id, partitions)]
    batches: AsyncIterator[list[Record]]
    if options.follows:
        batches = _follow(bootstrap, topic, partitions, options.from_beginning, started)
    else:
        batches = read_to_end(bootstrap, topic, partitions)
        if started is not None:
            started.set()
    printed = 0
    try:
        async for batch in batches:
            for record in batch:
                line = format_record(record, options)
                if line is None:
                    continue
                out.write(line + "\n")
                printed += 1
                if printed == options.limit:
                    break
            out.flush()
            if printed == options.limit or (stop is not None and stop.is_set()):
                break
    finally:
        # Stops the consumer now rather than whenever the generator is collected.
        if isinstance(batches, AsyncGenerator):
            await batches.aclose()
    return printed


async def _follow(
    bootstrap: KafkaTarget,
    topic: str,
    partitions: Sequence[int],
    from_beginning: bool,
    started: asyncio.Event | None,
) -> AsyncGenerator[list[Record], None]:
    """Batches of committed records, forever; an empty batch when nothing came within a poll."""
    consumer = committed_reader(bootstrap)
    await consumer.start()
    try:
        assigned = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(assigned)
        if from_beginning:
            await consumer.seek_to_beginning(*assigned)
        else:
            # With read_committed, the end offsets are the last stable offsets: a transaction
            # still open there is shown once it commits.
            for tp, end in (await consumer.end_offsets(assigned)).items():
                consumer.seek(tp, end)
        _log.info(
            "following %s (partitions %s) from %s; Ctrl-C stops",
            topic,
            ",".join(map(str, partitions)),
            "the beginning" if from_beginning else "the end",
        )
        if started is not None:
            started.set()
        while True:
            fetched = await consumer.getmany(timeout_ms=_POLL_MS)
            if not fetched:
                yield []
            for records in fetched.values():
                yield records
    finally:
        await consumer.stop()


def format_record(record: Record, options: TailOptions) -> str | None:
    """The line for one record, or ``None`` when the order filter leaves it out.

    An undecodable record belongs to the order if its key is the order id (the writer's key).
    """
    try:
        sealed, _event = envelope.decode(record.value)
    except envelope.UndecodableEvent as problem:
        if options.order_id is not None and record.key != options.order_id.encode():
            return None
        if options.as_json:
            return _undecodable_json(record, problem)
        return _undecodable_text(record, problem)
    if options.order_id is not None and sealed.order_id != options.order_id:
        return None
    if options.as_json:
        return _event_json(record)
    return _event_text(record, sealed)


def _event_text(record: Record, sealed: envelope.Envelope) -> str:
    data = msgspec.json.format(bytes(sealed.data), indent=-1).decode()
    return (
        f"{_time(sealed.occurred_at)}  {_position(record)}  {sealed.order_id}  "
        f"v{sealed.version:<3} {sealed.type:<{_TYPE_WIDTH}}  {data}"
    )


def _event_json(record: Record) -> str:
    # The envelope exactly as on the wire (already checked by decoding), plus its position.
    fields: dict[str, Any] = msgspec.json.decode(record.value or b"{}")
    located = {"partition": record.partition, "offset": record.offset, **fields}
    return msgspec.json.encode(located).decode()


def _undecodable_text(record: Record, problem: Exception) -> str:
    value = record.value
    preview = "no value" if value is None else repr(value[:_PREVIEW_BYTES])
    if value is not None and len(value) > _PREVIEW_BYTES:
        preview += f"... ({len(value)} bytes)"
    return (
        f"{_time(_record_time(record))}  {_position(record)}  UNDECODABLE "
        f"key={_text(record.key)!r}: {problem}; value {preview}"
    )


def _undecodable_json(record: Record, problem: Exception) -> str:
    return msgspec.json.encode(
        {
            "partition": record.partition,
            "offset": record.offset,
            "undecodable": str(problem),
            "timestamp": _time(_record_time(record)),
            "key": _text(record.key),
            "value": _text(record.value),
        }
    ).decode()


def _position(record: Record) -> str:
    return f"{record.partition}:{record.offset}".ljust(8)


def _record_time(record: Record) -> datetime:
    return datetime.fromtimestamp(record.timestamp / 1000, UTC)


def _time(moment: datetime) -> str:
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    shown = moment.replace(tzinfo=None).isoformat(timespec="milliseconds")
    return shown + ("Z" if moment.tzinfo is not None else "")


def _text(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("utf-8", errors="backslashreplace")
