"""The ``daily_sales`` read model: per UTC day and currency, orders placed, paid, cancelled.

A day's sales come from every partition, so ``daily_sales`` rows are aggregates: a batch folds
its events into deltas from zero and the upsert adds them (see schema.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime

import sqlalchemy as sa

from projections.projection import Applied, Db, ProjectionBug, State
from projections.schema import daily_sales, daily_sales_orders
from service.kernel.events import OrderCancelled, OrderCreated, OrderPaid, OrderPlaced

_COUNTED = (OrderPlaced, OrderPaid, OrderCancelled)


class DailySalesProjection:
    name = "daily_sales"
    tables: tuple[sa.Table, ...] = (daily_sales, daily_sales_orders)

    async def load(self, db: Db, batch: Sequence[Applied]) -> State:
        # Only the order -> currency links are read; day rows are written as deltas.
        state = State(self.tables)
        state["daily_sales_orders"].remember(
            await db.select_in(
                daily_sales_orders,
                "order_id",
                (a.envelope.order_id for a in batch if isinstance(a.event, _COUNTED)),
            )
        )
        return state

    def fold(self, state: State, applied: Applied) -> None:
        envelope, event = applied.envelope, applied.event
        currencies = state["daily_sales_orders"]
        if isinstance(event, OrderCreated):
            currencies.put({"order_id": envelope.order_id, "currency": event.currency})
            return
        if not isinstance(event, _COUNTED):
            return
        link = currencies.get(envelope.order_id)
        if link is None:
            raise ProjectionBug(f"{envelope.type} of unknown order {envelope.order_id}")
        day, currency = _utc_day(envelope.occurred_at), link["currency"]
        row = dict(
            state["daily_sales"].get(day, currency)
            or {
                "day": day,
                "currency": currency,
                "orders_placed": 0,
                "orders_paid": 0,
                "orders_cancelled": 0,
                "revenue": 0,
                "refunded": 0,
            }
        )
        if isinstance(event, OrderPlaced):
            row["orders_placed"] += 1
        elif isinstance(event, OrderPaid):
            row["orders_paid"] += 1
            row["revenue"] += event.amount
        else:
            row["orders_cancelled"] += 1
            row["refunded"] += event.refunded_amount
        state["daily_sales"].put(row)


def _utc_day(moment: datetime) -> date:
    """The UTC day of an aware ``moment`` (decode refuses naive ones), converted only off UTC."""
    if moment.utcoffset():
        moment = moment.astimezone(UTC)
    return moment.date()
