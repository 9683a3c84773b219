"""Record assembly: the sealed events of a batch of commands as Kafka records in record batches.

A record's key is its order id, so every event of an order sits in one partition (design.md 2),
and its headers repeat the envelope's routing fields. Records go into one record batch per
partition (a second one only when the first is full) in the order the commands were decided:
the partition keeps each order's versions in order, and a batch gets consecutive offsets, so a
record's offset is its batch's base offset plus its index in the batch.

No I/O here: the record batches come from a factory (the producer's ``create_batch``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from service.infra.eventlog import partition_for
from service.kernel import envelope


class RecordBatch(Protocol):
    """What assembly needs of a record batch (aiokafka's ``BatchBuilder``)."""

    def append(
        self,
        *,
        timestamp: float | None,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]],
    ) -> object | None:
        """Add a record; ``None`` when the batch is full."""

    def record_count(self) -> int:
        """How many records the batch holds."""


B = TypeVar("B", bound=RecordBatch)


@dataclass(frozen=True, slots=True)
class Record:
    """One event as a Kafka record."""

    partition: int
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]


def records_of(
    events: Sequence[envelope.Envelope],
    partition_count: int,
    trace_headers: Sequence[tuple[str, bytes]] = (),
) -> list[Record]:
    """One command's events as records, all in its order's partition; ``trace_headers``: the
    W3C trace context of its producer span, when the command is traced."""
    key = events[0].order_id.encode()
    partition = partition_for(key, partition_count)
    records = []
    for event in events:
        headers = envelope.headers(event)
        headers.extend(trace_headers)
        records.append(Record(partition, key, envelope.encode(event), headers))
    return records


@dataclass(frozen=True, slots=True)
class Packed(Generic[B]):
    """A batch of commands' records packed into record batches, to send in this order."""

    batches: list[tuple[int, B]]  # (partition, record batch)
    # Per command: the index in ``batches`` of the batch holding its last record, and that
    # record's index in the batch.
    last: list[tuple[int, int]]

    def positions(self, base_offsets: Sequence[int]) -> list[tuple[int, int]]:
        """Per command, the partition and offset of its last record, given the base offset the
        log gave each batch."""
        return [(self.batches[batch][0], base_offsets[batch] + index) for batch, index in self.last]

    def ends(self, base_offsets: Sequence[int]) -> dict[int, int]:
        """Per partition written, the offset of its last record."""
        ends: dict[int, int] = {}
        for (partition, batch), base in zip(self.batches, base_offsets, strict=True):
            ends[partition] = max(ends.get(partition, -1), base + batch.record_count() - 1)
        return ends


def pack(
    commands: Iterable[Sequence[envelope.Envelope]],
    partition_count: int,
    new_batch: Callable[[], B],
    trace_headers: Mapping[int, Sequence[tuple[str, bytes]]] | None = None,
) -> Packed[B]:
    """Pack each command's events (in the order given) into record batches from ``new_batch``.
    ``trace_headers``: by the index of a traced command, the headers its records carry.

    Raises ``ValueError`` for an event that does not fit even in an empty batch."""
    batches: list[tuple[int, B]] = []
    filling: dict[int, int] = {}  # partition -> index in batches of the batch being filled
    last: list[tuple[int, int]] = []
    for number, events in enumerate(commands):
        traced = trace_headers.get(number, ()) if trace_headers else ()
        records = records_of(events, partition_count, traced)
        partition = records[0].partition
        index = filling.get(partition, -1)
        for record in records:
            if index < 0 or not _append(batches[index][1], record):
                index = filling[partition] = len(batches)
                batches.append((partition, new_batch()))
                if not _append(batches[index][1], record):
                    order_id = record.key.decode()
                    raise ValueError(f"an event of order {order_id} exceeds a batch")
        last.append((index, batches[index][1].record_count() - 1))
    return Packed(batches, last)


def _append(batch: RecordBatch, record: Record) -> bool:
    added = batch.append(timestamp=None, key=record.key, value=record.value, headers=record.headers)
    return added is not None
