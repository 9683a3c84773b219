"""The ``daily_sales`` read model: per UTC day and currency, orders placed, paid, cancelled."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from projections.projection import Applied, ProjectionBug, State, select_in
from projections.schema import daily_sales, daily_sales_orders
from service.domain import OrderCancelled, OrderCreated, OrderPaid, OrderPlaced

_COUNTED = (OrderPlaced, OrderPaid, OrderCancelled)


class DailySalesProjection:
    name = "daily_sales"
    tables: tuple[sa.Table, ...] = (daily_sales, daily_sales_orders)

    async def load(self, connection: AsyncConnection, batch: Sequence[Applied]) -> State:
        state = State(self.tables)
        currencies = state["daily_sales_orders"]
        currencies.remember(
            await select_in(
                connection,
                daily_sales_orders,
                "order_id",
                (a.envelope.order_id for a in batch if isinstance(a.event, _COUNTED)),
            )
        )
        created = {
            a.envelope.order_id: a.event.currency
            for a in batch
            if isinstance(a.event, OrderCreated)
        }
        keys = set()
        for applied in batch:
            if isinstance(applied.event, _COUNTED):
                link = currencies.get(applied.envelope.order_id)
                currency = link["currency"] if link else created.get(applied.envelope.order_id)
                if currency is not None:
                    keys.add((applied.envelope.occurred_at.date(), currency))
        if keys:
            result = await connection.execute(
                sa.select(daily_sales).where(
                    sa.tuple_(daily_sales.c.day, daily_sales.c.currency).in_(list(keys))
                )
            )
            state["daily_sales"].remember(result.all())
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
        day: date = envelope.occurred_at.date()
        days = state["daily_sales"]
        row = days.get(day, link["currency"]) or {
            "day": day,
            "currency": link["currency"],
            "orders_placed": 0,
            "orders_paid": 0,
            "orders_cancelled": 0,
            "revenue": 0,
            "refunded": 0,
        }
        row = dict(row)
        if isinstance(event, OrderPlaced):
            row["orders_placed"] += 1
        elif isinstance(event, OrderPaid):
            row["orders_paid"] += 1
            row["revenue"] += event.amount
        else:
            row["orders_cancelled"] += 1
            row["refunded"] += event.refunded_amount
        days.put(row)
