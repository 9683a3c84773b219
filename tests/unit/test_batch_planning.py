"""Batch planning: which fetched records each projection version applies, and where it stops."""

from __future__ import annotations

from datetime import UTC, datetime

from aiokafka import TopicPartition

from projections.batches import Batch, Group, Halt, Kept, plan, split_parked, without_stale
from projections.models.catalog import PROJECTIONS
from projections.projection import Applied, Target, pg_text
from service.kernel import envelope
from service.kernel.events import OrderCreated

TP = TopicPartition("orders.events", 3)
ORDERS = Target(PROJECTIONS["orders"], 1)
HISTORY = Target(PROJECTIONS["order_history"], 2)
AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _event(order_id: str, version: int = 1) -> bytes:
    sealed = envelope.seal(
        OrderCreated(customer_id="c-1", currency="EUR"),
        event_id=f"{order_id}-{version}",
        order_id=order_id,
        version=version,
        occurred_at=AT,
        command_id="cmd",
        correlation_id="cmd",
    )
    return envelope.encode(sealed)


def _records(*values: bytes | None, first: int = 10) -> list[Kept]:
    return [Kept(first + i, f"order-{i}".encode(), value) for i, value in enumerate(values)]


def _at(orders: int, history: int) -> dict[int, dict[str, int]]:
    """Both versions' checkpoints in the partition."""
    return {3: {"orders": orders, "order_history": history}}


def _applied(record: Kept) -> Applied:
    sealed, event = envelope.decode(record.value)
    return Applied(sealed, event, TP.partition, record.offset)


def test_every_version_at_the_same_checkpoint_shares_one_list_of_events() -> None:
    records = _records(_event("a"), _event("b"), _event("c"))
    planned = plan({TP: records}, {}, [ORDERS, HISTORY], _at(10, 10), {})
    first, second = planned.groups
    assert first.events is second.events
    assert [a.offset for a in first.events] == [10, 11, 12]
    assert (first.expected, first.new) == (10, 13)
    assert planned.raw[(3, 11)] == records[1].value
    assert planned.halts == []


def test_a_version_further_on_skips_the_records_it_already_applied() -> None:
    records = _records(_event("a"), _event("b"), _event("c"))
    planned = plan({TP: records}, {}, [ORDERS, HISTORY], _at(10, 12), {})
    by_name = {g.target.name: g for g in planned.groups}
    assert [a.offset for a in by_name["order_history"].events] == [12]
    assert (by_name["order_history"].expected, by_name["order_history"].new) == (12, 13)


def test_a_version_past_every_record_gets_no_group() -> None:
    planned = plan({TP: _records(_event("a"))}, {}, [ORDERS], {3: {"orders": 11}}, {})
    assert planned.groups == []


def test_an_undecodable_record_ends_the_group_there_and_halts_once_committed() -> None:
    records = _records(_event("a"), b"not json", _event("c"))
    planned = plan({TP: records}, {}, [ORDERS], {3: {"orders": 10}}, {})
    (group,) = planned.groups
    assert [a.offset for a in group.events] == [10]
    assert group.new == 11  # the checkpoint moves up to the poison, not past it
    (halt,) = planned.halts
    assert (halt.projection, halt.partition, halt.offset, halt.order_id) == (
        "orders",
        3,
        11,
        "order-1",
    )


def test_a_version_already_past_the_undecodable_record_goes_on() -> None:
    records = _records(_event("a"), b"not json", _event("c"))
    planned = plan({TP: records}, {}, [ORDERS, HISTORY], _at(10, 12), {})
    by_name = {g.target.name: g for g in planned.groups}
    assert [a.offset for a in by_name["order_history"].events] == [12]
    assert [h.projection for h in planned.halts] == ["orders"]


def test_a_halted_version_takes_nothing_in_its_partition() -> None:
    halted = {("orders", 3): Halt("orders", 3, 10, None, "poison")}
    planned = plan(
        {TP: _records(_event("a"))},
        {},
        [ORDERS, HISTORY],
        {3: {"orders": 10, "order_history": 10}},
        halted,
    )
    assert [g.target.name for g in planned.groups] == ["order_history"]


def test_records_of_a_partition_no_longer_assigned_are_not_applied() -> None:
    assert plan({TP: _records(_event("a"))}, {}, [ORDERS], {}, {}).groups == []


def test_records_fetched_before_a_seek_of_their_partition_are_dropped() -> None:
    other = TopicPartition(TP.topic, 4)
    fetched = {TP: _records(_event("a")), other: _records(_event("b"))}
    kept = without_stale(fetched, generations={3: 1, 4: 1}, seeks={3: 2, 4: 1})
    assert list(kept) == [other]


def test_a_batch_keeps_a_partitions_chunks_together_until_it_is_sought_again() -> None:
    batch = Batch()
    batch.add(TP, _records(_event("a")), generation=0)
    batch.add(TP, _records(_event("b"), first=11), generation=0)
    assert [r.offset for r in batch.records[TP]] == [10, 11]
    batch.add(TP, _records(_event("c"), first=5), generation=1)
    assert [r.offset for r in batch.records[TP]] == [5]
    assert batch.generations[3] == 1
    assert len(batch.decoded[TP]) == 1
    assert batch.count == 3


def test_events_of_a_parked_order_are_set_aside_for_that_projection_only() -> None:
    records = _records(_event("a\x00"), _event("b"))
    events = [_applied(r) for r in records]
    groups = [Group(ORDERS, 3, 10, 12, events), Group(HISTORY, 3, 10, 12, events)]
    applying, aside = split_parked(groups, {("orders", pg_text("a\x00"))})
    assert [a.offset for a in applying["orders"]] == [11]
    assert [a.offset for a in applying["order_history"]] == [10, 11]
    assert [(t.name, a.offset) for t, a in aside] == [("orders", 10)]


def test_with_nothing_parked_every_group_is_applied_even_a_bare_checkpoint_move() -> None:
    applying, aside = split_parked([Group(ORDERS, 3, 10, 12)], set())
    assert applying == {"orders": []}
    assert aside == []


def test_the_consumers_batch_is_planned_from_the_events_it_decoded_record_by_record() -> None:
    # As the runner does it: records kept and decoded once by Batch.add, then planned with those
    # decodings, which line up with the records by position (records below the checkpoint too).
    batch = Batch()
    batch.add(TP, _records(_event("a"), _event("b"), b"not json", _event("d")), generation=0)
    decoded_b = batch.decoded[TP][1]
    # A stand-in decoding for offset 11: the plan must take it rather than decode again.
    batch.decoded[TP][1] = envelope.decode(_event("b-as-decoded"))

    planned = plan(batch.records, batch.decoded, [ORDERS], {3: {"orders": 11}}, {})

    (group,) = planned.groups
    assert [(a.offset, a.envelope.order_id) for a in group.events] == [(11, "b-as-decoded")]
    assert not isinstance(decoded_b, envelope.UndecodableEvent)
    (halt,) = planned.halts
    assert (halt.offset, halt.order_id) == (12, "order-2")
