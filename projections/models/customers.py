"""The ``customer_summary`` read model: orders, open orders and lifetime value per customer.

A customer's orders sit in many partitions, so ``customer_summaries`` rows are aggregates: a
batch folds its events into deltas from zero and the upsert adds them (see schema.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa

from projections.projection import Applied, Db, ProjectionBug, Row, State
from projections.schema import customer_summaries, customer_summary_orders
from service.kernel.events import OrderCancelled, OrderCreated, OrderDelivered, OrderPaid


def _delta(state: State, customer_id: str, at: datetime) -> Row:
    """This batch's change to a customer's summary (a copy, to be put back)."""
    current = state["customer_summaries"].get(customer_id)
    if current is None:
        return {
            "customer_id": customer_id,
            "order_count": 0,
            "open_orders": 0,
            "lifetime_value": {},
            "updated_at": at,
        }
    return {
        **current,
        "lifetime_value": dict(current["lifetime_value"]),
        "updated_at": max(current["updated_at"], at),
    }


class CustomerSummaryProjection:
    name = "customer_summary"
    tables: tuple[sa.Table, ...] = (customer_summaries, customer_summary_orders)

    async def load(self, db: Db, batch: Sequence[Applied]) -> State:
        # Only the order -> customer links are read; summaries are written as deltas.
        state = State(self.tables)
        state["customer_summary_orders"].remember(
            await db.select_in(
                customer_summary_orders,
                "order_id",
                (a.envelope.order_id for a in batch if not isinstance(a.event, OrderCreated)),
            )
        )
        return state

    def fold(self, state: State, applied: Applied) -> None:
        envelope, event = applied.envelope, applied.event
        links = state["customer_summary_orders"]
        if isinstance(event, OrderCreated):
            links.put(
                {
                    "order_id": envelope.order_id,
                    "customer_id": event.customer_id,
                    "currency": event.currency,
                    "open": True,
                }
            )
            delta = _delta(state, event.customer_id, envelope.occurred_at)
            delta["order_count"] += 1
            delta["open_orders"] += 1
            state["customer_summaries"].put(delta)
            return
        if not isinstance(event, OrderPaid | OrderCancelled | OrderDelivered):
            return
        link = links.get(envelope.order_id)
        if link is None:
            raise ProjectionBug(f"{envelope.type} of unknown order {envelope.order_id}")
        delta = _delta(state, link["customer_id"], envelope.occurred_at)
        value = delta["lifetime_value"]
        currency = link["currency"]
        if isinstance(event, OrderPaid):
            value[currency] = value.get(currency, 0) + event.amount
        elif isinstance(event, OrderCancelled) and event.refunded_amount:
            value[currency] = value.get(currency, 0) - event.refunded_amount
        if isinstance(event, OrderCancelled | OrderDelivered) and link["open"]:
            links.put({**link, "open": False})
            delta["open_orders"] -= 1
        state["customer_summaries"].put(delta)
