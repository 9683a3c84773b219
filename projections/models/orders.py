"""The ``orders`` read model: one row per order with its line items, status and step times."""

from __future__ import annotations

from collections.abc import Sequence
from typing import assert_never

import msgspec
import sqlalchemy as sa

from projections.projection import Applied, Db, ProjectionBug, Row, State
from projections.schema import orders
from service.kernel.events import (
    ItemAdded,
    ItemQuantityChanged,
    ItemRemoved,
    OrderCancelled,
    OrderCreated,
    OrderDelivered,
    OrderPaid,
    OrderPlaced,
    OrderShipped,
    ShippingAddress,
    ShippingAddressSet,
)


def _address(address: ShippingAddress | None) -> Row | None:
    return None if address is None else msgspec.to_builtins(address)


def _total(items: list[Row]) -> int:
    return sum(int(item["quantity"]) * int(item["unit_price"]) for item in items)


class OrdersProjection:
    name = "orders"
    tables: tuple[sa.Table, ...] = (orders,)

    async def load(self, db: Db, batch: Sequence[Applied]) -> State:
        state = State(self.tables)
        state["orders"].remember(
            await db.select_in(orders, "order_id", (a.envelope.order_id for a in batch))
        )
        return state

    def fold(self, state: State, applied: Applied) -> None:
        table = state["orders"]
        envelope, event = applied.envelope, applied.event
        current = table.get(envelope.order_id)
        if current is not None and envelope.version <= current["version"]:
            # Never a re-apply (each event passes its checkpoint once) but the log repeating a
            # version: this read model halts there, never skips it (invariant 7). The customer
            # and daily-sales aggregates keep no version per order and would count it.
            raise ProjectionBug(
                f"{envelope.type} v{envelope.version} of order {envelope.order_id}, whose row "
                f"is at v{current['version']} already: the log repeats a version"
            )
        at = envelope.occurred_at
        if current is None:
            if not isinstance(event, OrderCreated):
                raise ProjectionBug(
                    f"{envelope.type} v{envelope.version} of unknown order {envelope.order_id}"
                )
            table.put(
                {
                    "order_id": envelope.order_id,
                    "customer_id": event.customer_id,
                    "status": "draft",
                    "currency": event.currency,
                    "total": 0,
                    "item_count": 0,
                    "items": [],
                    "version": envelope.version,
                    "paid_amount": 0,
                    "refunded_amount": 0,
                    "payment_reference": None,
                    "carrier": None,
                    "tracking_number": None,
                    "cancel_reason": None,
                    "created_at": at,
                    "placed_at": None,
                    "paid_at": None,
                    "shipped_at": None,
                    "delivered_at": None,
                    "cancelled_at": None,
                    "updated_at": at,
                    "shipping_address": _address(event.shipping_address),
                }
            )
            return
        if envelope.version != current["version"] + 1:
            raise ProjectionBug(
                f"order {envelope.order_id} jumps from v{current['version']} to v{envelope.version}"
            )
        row = {**current, "version": envelope.version, "updated_at": at}
        match event:
            case OrderCreated():
                raise ProjectionBug(f"order {envelope.order_id} created twice")
            case ItemAdded():
                row["items"] = [
                    *current["items"],
                    {
                        "sku": event.sku,
                        "name": event.name,
                        "quantity": event.quantity,
                        "unit_price": event.unit_price,
                    },
                ]
            case ItemQuantityChanged():
                row["items"] = [
                    {**item, "quantity": event.quantity} if item["sku"] == event.sku else item
                    for item in current["items"]
                ]
            case ItemRemoved():
                row["items"] = [item for item in current["items"] if item["sku"] != event.sku]
            case OrderPlaced():
                row.update(status="placed", placed_at=at, total=event.total)
            case OrderPaid():
                row.update(
                    status="paid",
                    paid_at=at,
                    paid_amount=event.amount,
                    payment_reference=event.payment_reference,
                )
            case OrderShipped():
                row.update(
                    status="shipped",
                    shipped_at=at,
                    carrier=event.carrier,
                    tracking_number=event.tracking_number,
                )
                if event.shipping_address is not None:  # where it went (v1: no address then)
                    row["shipping_address"] = _address(event.shipping_address)
            case OrderDelivered():
                row.update(status="delivered", delivered_at=at)
            case OrderCancelled():
                row.update(
                    status="cancelled",
                    cancelled_at=at,
                    cancel_reason=event.reason,
                    refunded_amount=event.refunded_amount,
                )
            case ShippingAddressSet():
                row["shipping_address"] = _address(event.shipping_address)
            case _:
                assert_never(event)
        if row["status"] == "draft":
            row["total"] = _total(row["items"])
        row["item_count"] = len(row["items"])
        table.put(row)
