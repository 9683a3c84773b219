"""The writer's state as records of its changelog topic (``<topic>.writer-state``, compacted).

Partition p of the changelog holds the state of the orders of partition p of the events topic:

* ``o`` + order id -> an open order's state after its last event;
* ``c`` + order id -> a closed (delivered or cancelled) order's version, status, customer and
  currency: all it keeps (``settled``), in a few bytes, since closed orders pile up and each
  start reads them all (its ``o`` record is removed in the same transaction);
* ``r`` + caller and key -> an idempotency receipt of a command whose order is in p (a
  tombstone once it has expired);
* ``p`` -> the position: the offset of the events topic's partition p up to which (exclusive)
  the records above reflect every event.

Every transaction that appends events also writes, before it commits, the state of each order
it changed, its receipts and the new position of each partition it wrote: the changelog and
the events commit or abort together, so a changelog partition read to its end, plus the events
after its position (the tail), is exactly the state the whole log folds to. Taking over a
partition costs its live orders and its tail, not its history. Pure: no I/O here.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from datetime import datetime

import msgspec
from msgspec.structs import replace

from service.kernel.domain import FINAL_STATUSES, Order, OrderStatus, closed_order
from service.write.staging import Receipt, ReceiptKey

ORDER = b"o"
CLOSED = b"c"
RECEIPT = b"r"
POSITION = b"p"

# A changelog record: (partition, key, value); a value of None is a tombstone.
StateRecord = tuple[int, bytes, bytes | None]

_order_encoder = msgspec.json.Encoder()
_order_decoder = msgspec.json.Decoder(Order)


class _StoredReceipt(msgspec.Struct, array_like=True, frozen=True):
    request_hash: str | None
    order_id: str
    version: int
    partition: int
    offset: int
    occurred_at: datetime


_receipt_decoder = msgspec.json.Decoder(_StoredReceipt)


class _ClosedOrder(msgspec.Struct, array_like=True, frozen=True):
    version: int
    status: OrderStatus
    customer_id: str
    currency: str


_closed_decoder = msgspec.json.Decoder(_ClosedOrder)


def order_records(partition: int, order: Order, *, first: bool = False) -> list[StateRecord]:
    """The records of an order's state: an open one's whole, a closed one's few fields and,
    first (a later record of an order wins), the tombstone of its open record, unless this is
    the ``first`` record of the order in a partition's changelog (written with no position)."""
    key = order.order_id.encode()
    if order.status not in FINAL_STATUSES:
        return [(partition, ORDER + key, _order_encoder.encode(order))]
    closed = _ClosedOrder(order.version, order.status, order.customer_id, order.currency)
    record = (partition, CLOSED + key, _order_encoder.encode(closed))
    return [record] if first else [(partition, ORDER + key, None), record]


def receipt_record(key: ReceiptKey, receipt: Receipt) -> StateRecord:
    stored = _StoredReceipt(
        receipt.request_hash,
        receipt.order_id,
        receipt.version,
        receipt.partition,
        receipt.offset,
        receipt.occurred_at,
    )
    return receipt.partition, receipt_key_bytes(key), _order_encoder.encode(stored)


def receipt_key_bytes(key: ReceiptKey) -> bytes:
    return RECEIPT + json.dumps(list(key)).encode()


def forgotten_record(partition: int, key: ReceiptKey) -> StateRecord:
    """The tombstone of an expired receipt: compaction drops it from the changelog."""
    return partition, receipt_key_bytes(key), None


def position_record(partition: int, next_offset: int) -> StateRecord:
    return partition, POSITION, str(next_offset).encode()


@dataclass
class PartitionState:
    """One changelog partition read to its end: the latest record of each key."""

    orders: dict[str, Order] = field(default_factory=dict)
    receipts: dict[ReceiptKey, Receipt] = field(default_factory=dict)
    position: int | None = None  # None: no position yet, the records prove nothing
    records: int = 0

    def take(self, key: bytes, value: bytes | None) -> None:
        """Take in one record of the changelog, in offset order (a later one wins)."""
        self.records += 1
        kind, rest = key[:1], key[1:]
        if kind == POSITION:
            self.position = None if value is None else int(value)
        elif kind == CLOSED and value is not None:
            order_id = rest.decode()
            closed = _closed_decoder.decode(value)
            self.orders[order_id] = closed_order(
                order_id,
                closed.version,
                closed.status,
                sys.intern(closed.customer_id),
                sys.intern(closed.currency),
            )
        elif kind == ORDER:
            if value is None:
                self.orders.pop(rest.decode(), None)
            else:
                order = _order_decoder.decode(value)
                # One copy of each customer id and currency, as when folded from the log.
                self.orders[rest.decode()] = replace(
                    order,
                    customer_id=sys.intern(order.customer_id),
                    currency=sys.intern(order.currency),
                )
        elif kind == RECEIPT:
            caller, idempotency_key = json.loads(rest)
            receipt_key: ReceiptKey = (caller, idempotency_key)
            if value is None:
                self.receipts.pop(receipt_key, None)
            else:
                stored = _receipt_decoder.decode(value)
                self.receipts[receipt_key] = Receipt(
                    stored.request_hash,
                    stored.order_id,
                    stored.version,
                    stored.partition,
                    stored.offset,
                    stored.occurred_at,
                )
