"""The writer's changelog records: what goes in comes back, a later record of a key wins, a
tombstone removes, and the position says how far the records reach."""

from __future__ import annotations

from datetime import UTC, datetime

from msgspec.structs import replace

from service.kernel.domain import LineItem, Order, OrderStatus, settled
from service.kernel.events import ShippingAddress
from service.write import snapshots
from service.write.staging import Receipt

AT = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
ORDER = Order(
    order_id="o-1",
    version=4,
    status=OrderStatus.PLACED,
    customer_id="c-1",
    currency="EUR",
    items=(LineItem(sku="A", name="a", quantity=2, unit_price=500),),
    total=1000,
    paid_amount=0,
    shipping_address=ShippingAddress(
        name="N", lines=("1 Main St",), city="C", postal_code="1", country="DE"
    ),
)
RECEIPT = Receipt("hash", "o-1", 4, 2, 17, AT)


def _read(
    *records: snapshots.StateRecord | list[snapshots.StateRecord],
) -> snapshots.PartitionState:
    state = snapshots.PartitionState()
    for record in records:
        for _partition, key, value in record if isinstance(record, list) else [record]:
            state.take(key, value)
    return state


def test_an_order_a_receipt_and_the_position_come_back_as_they_went_in() -> None:
    state = _read(
        snapshots.order_records(2, ORDER),
        snapshots.receipt_record(("c-1", "key-1"), RECEIPT),
        snapshots.position_record(2, 18),
    )
    assert state.orders == {"o-1": ORDER}
    assert state.receipts == {("c-1", "key-1"): RECEIPT}
    assert state.position == 18
    assert state.records == 3


def test_a_closed_order_takes_a_few_bytes_and_replaces_its_open_record() -> None:
    delivered = replace(ORDER, version=7, status=OrderStatus.DELIVERED, paid_amount=1000)
    records = snapshots.order_records(2, delivered)
    assert [(key[:1], value is None) for _, key, value in records] == [(b"o", True), (b"c", False)]
    assert len(records[1][2] or b"") < 40
    state = _read(snapshots.order_records(2, ORDER), records)
    assert state.orders == {"o-1": settled(delivered)}


def test_a_later_record_of_a_key_wins_and_a_tombstone_removes_the_receipt() -> None:
    later = settled(replace(ORDER, version=7, status=OrderStatus.DELIVERED, paid_amount=1000))
    state = _read(
        snapshots.order_records(2, ORDER),
        snapshots.receipt_record((None, "key-2"), RECEIPT),
        snapshots.order_records(2, later),
        snapshots.forgotten_record(2, (None, "key-2")),
    )
    assert state.orders == {"o-1": later}
    assert state.receipts == {}
    assert state.position is None  # no position: these records prove nothing yet


def test_a_closed_order_is_stored_settled() -> None:
    closed = replace(ORDER, version=5, status=OrderStatus.CANCELLED)
    [_tombstone, (_, _, value)] = snapshots.order_records(0, closed)
    assert value is not None
    assert b'"sku"' not in value  # no items kept
    assert _read(snapshots.order_records(0, closed)).orders["o-1"] == settled(closed)
