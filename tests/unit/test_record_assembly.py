"""Record assembly: sealed events as Kafka records (key, value, headers, partition), packed into
record batches whose offsets tell where each command's last event sits."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from aiokafka.producer.message_accumulator import BatchBuilder

from service.infra.eventlog import partition_for
from service.kernel import envelope
from service.kernel.events import ItemAdded, OrderCreated
from service.write.records import pack, records_of

AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
PARTITIONS = 12


def _events(order_id: str, count: int = 1, first_version: int = 1) -> list[envelope.Envelope]:
    events: list[envelope.Envelope] = []
    for index in range(count):
        event = (
            OrderCreated(customer_id="c-1", currency="EUR")
            if first_version + index == 1
            else ItemAdded(sku=f"S-{index}", name="Mug", quantity=1, unit_price=100)
        )
        events.append(
            envelope.seal(
                event,
                event_id=f"{order_id}-{index}",
                order_id=order_id,
                version=first_version + index,
                occurred_at=AT,
                command_id="cmd-1",
                correlation_id="corr-1",
            )
        )
    return events


def _orders_in_one_partition(count: int) -> list[str]:
    """Order ids whose keys all go to one partition."""
    found = [f"o-{n}" for n in range(10_000) if partition_for(f"o-{n}".encode(), PARTITIONS) == 0]
    return found[:count]


def _orders_in_distinct_partitions(count: int) -> list[str]:
    by_partition: dict[int, str] = {}
    for n in range(10_000):
        by_partition.setdefault(partition_for(f"o-{n}".encode(), PARTITIONS), f"o-{n}")
    return list(by_partition.values())[:count]


@dataclass
class _Batch:
    """A record batch that holds ``capacity`` records."""

    capacity: int
    records: list[tuple[bytes | None, bytes | None]] = field(default_factory=list)

    def append(self, **record: Any) -> object | None:
        if len(self.records) >= self.capacity:
            return None
        self.records.append((record["key"], record["value"]))
        return len(self.records)

    def record_count(self) -> int:
        return len(self.records)


def _real_batch() -> BatchBuilder:
    return BatchBuilder(1024 * 1024, 0, is_transactional=1)  # 0: no compression


def test_a_record_is_keyed_by_its_order_and_sits_in_the_keys_partition() -> None:
    events = _events("order-7", count=2)

    records = records_of(events, PARTITIONS)

    partition = partition_for(b"order-7", PARTITIONS)
    assert [(r.key, r.partition) for r in records] == [(b"order-7", partition)] * 2


def test_a_record_value_is_its_envelope_and_its_headers_repeat_the_routing_fields() -> None:
    [event] = _events("order-7")

    [record] = records_of([event], PARTITIONS)

    assert envelope.decode(record.value)[0] == event
    assert record.headers == [
        ("type", b"OrderCreated"),
        ("schema_version", b"2"),  # OrderCreated's current version
        ("correlation_id", b"corr-1"),
    ]


def test_commands_of_one_partition_share_one_batch_in_the_order_they_were_decided() -> None:
    first, second = _orders_in_one_partition(2)
    commands = [_events(first), _events(second), _events(first, first_version=2)]

    packed = pack(commands, PARTITIONS, lambda: _Batch(capacity=100))

    [(partition, batch)] = packed.batches
    assert partition == 0
    assert [key for key, _ in batch.records] == [first.encode(), second.encode(), first.encode()]
    assert packed.last == [(0, 0), (0, 1), (0, 2)]


def test_each_partition_written_gets_its_own_batch() -> None:
    orders = _orders_in_distinct_partitions(3)

    packed = pack([_events(order_id) for order_id in orders], PARTITIONS, lambda: _Batch(100))

    assert [partition for partition, _ in packed.batches] == [
        partition_for(order_id.encode(), PARTITIONS) for order_id in orders
    ]
    assert packed.last == [(0, 0), (1, 0), (2, 0)]


def test_a_full_batch_continues_in_a_second_batch_for_the_same_partition() -> None:
    first, second = _orders_in_one_partition(2)

    packed = pack(
        [_events(first, count=2), _events(second, count=2)], PARTITIONS, lambda: _Batch(3)
    )

    assert [(p, batch.record_count()) for p, batch in packed.batches] == [(0, 3), (0, 1)]
    # The second command's events straddle the two batches: its last one is in the second.
    assert packed.last == [(0, 1), (1, 0)]


def test_an_event_that_does_not_fit_an_empty_batch_is_refused() -> None:
    with pytest.raises(ValueError, match="an event of order o-1 exceeds a batch"):
        pack([_events("o-1")], PARTITIONS, lambda: _Batch(0))


def test_a_commands_position_is_its_batch_base_offset_plus_the_index_of_its_last_event() -> None:
    first, second = _orders_in_one_partition(2)
    other = next(
        order_id
        for order_id in _orders_in_distinct_partitions(PARTITIONS)
        if partition_for(order_id.encode(), PARTITIONS) != 0
    )
    commands = [_events(first, count=2), _events(other), _events(second, count=3)]

    packed = pack(commands, PARTITIONS, lambda: _Batch(100))

    other_partition = partition_for(other.encode(), PARTITIONS)
    assert packed.positions([40, 7]) == [(0, 41), (other_partition, 7), (0, 44)]
    assert packed.ends([40, 7]) == {0: 44, other_partition: 7}


def test_the_end_of_a_partition_written_in_two_batches_is_in_the_later_one() -> None:
    [order_id] = _orders_in_one_partition(1)

    packed = pack([_events(order_id, count=5)], PARTITIONS, lambda: _Batch(3))

    assert packed.ends([10, 13]) == {0: 14}
    assert packed.positions([10, 13]) == [(0, 14)]


def test_the_producers_record_batches_take_the_records() -> None:
    first, second = _orders_in_one_partition(2)

    packed = pack([_events(first, count=2), _events(second)], PARTITIONS, _real_batch)

    [(partition, batch)] = packed.batches
    assert (partition, batch.record_count()) == (0, 3)
    assert packed.last == [(0, 1), (0, 2)]
