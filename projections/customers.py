"""The ``customer_summary`` read model: orders, open orders and lifetime value per customer."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from projections.projection import Applied, ProjectionBug, State, select_in
from projections.schema import customer_summaries, customer_summary_orders
from service.domain import OrderCancelled, OrderCreated, OrderDelivered, OrderPaid


class CustomerSummaryProjection:
    name = "customer_summary"
    tables: tuple[sa.Table, ...] = (customer_summaries, customer_summary_orders)

    async def load(self, connection: AsyncConnection, batch: Sequence[Applied]) -> State:
        state = State(self.tables)
        links = state["customer_summary_orders"]
        links.remember(
            await select_in(
                connection,
                customer_summary_orders,
                "order_id",
                (a.envelope.order_id for a in batch),
            )
        )
        customers = {row["customer_id"] for row in links.rows.values()}
        customers |= {a.event.customer_id for a in batch if isinstance(a.event, OrderCreated)}
        state["customer_summaries"].remember(
            await select_in(connection, customer_summaries, "customer_id", customers)
        )
        return state

    def fold(self, state: State, applied: Applied) -> None:
        envelope, event = applied.envelope, applied.event
        links, summaries = state["customer_summary_orders"], state["customer_summaries"]
        if isinstance(event, OrderCreated):
            links.put(
                {
                    "order_id": envelope.order_id,
                    "customer_id": event.customer_id,
                    "currency": event.currency,
                    "open": True,
                }
            )
            created = summaries.get(event.customer_id) or {
                "customer_id": event.customer_id,
                "order_count": 0,
                "open_orders": 0,
                "lifetime_value": {},
                "updated_at": envelope.occurred_at,
            }
            summaries.put(
                {
                    **created,
                    "order_count": created["order_count"] + 1,
                    "open_orders": created["open_orders"] + 1,
                    "updated_at": envelope.occurred_at,
                }
            )
            return
        if not isinstance(event, OrderPaid | OrderCancelled | OrderDelivered):
            return
        link = links.get(envelope.order_id)
        if link is None:
            raise ProjectionBug(f"{envelope.type} of unknown order {envelope.order_id}")
        summary = summaries.get(link["customer_id"])
        if summary is None:
            raise ProjectionBug(f"no summary for customer {link['customer_id']}")
        updated = {**summary, "updated_at": envelope.occurred_at}
        value = dict(summary["lifetime_value"])
        currency = link["currency"]
        if isinstance(event, OrderPaid):
            value[currency] = value.get(currency, 0) + event.amount
        elif isinstance(event, OrderCancelled) and event.refunded_amount:
            value[currency] = value.get(currency, 0) - event.refunded_amount
        updated["lifetime_value"] = value
        if isinstance(event, OrderCancelled | OrderDelivered) and link["open"]:
            links.put({**link, "open": False})
            updated["open_orders"] = summary["open_orders"] - 1
        summaries.put(updated)
