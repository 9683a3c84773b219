"""Order life cycles as domain commands, for tests that need many real events quickly."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime

from service.kernel import domain
from service.write.contract import Accepted, CommandRequest
from service.write.writer import Writer

CURRENCIES = ("EUR", "USD", "GBP")


def lifecycle(order_id: str, n: int, *, customers: int = 97) -> list[domain.Command]:
    """6 to 8 commands per order, ending delivered, cancelled (some after payment) or paid."""
    at = datetime.now(UTC)
    price = 100 + n % 900
    currency = CURRENCIES[n % 3]
    commands: list[domain.Command] = [
        domain.CreateOrder(
            order_id=order_id, at=at, customer_id=f"c-{n % customers}", currency=currency
        ),
        domain.AddItem(order_id=order_id, at=at, sku="A", name="a", quantity=2, unit_price=price),
        domain.AddItem(order_id=order_id, at=at, sku="B", name="b", quantity=1, unit_price=price),
        domain.ChangeItemQuantity(order_id=order_id, at=at, sku="B", quantity=3),
        domain.PlaceOrder(order_id=order_id, at=at),
        domain.PayOrder(
            order_id=order_id,
            at=at,
            amount=5 * price,
            currency=currency,
            payment_reference=f"p-{n}",
        ),
    ]
    if n % 3 == 0:
        commands += [
            domain.ShipOrder(order_id=order_id, at=at, carrier="DHL", tracking_number=f"t-{n}"),
            domain.DeliverOrder(order_id=order_id, at=at),
        ]
    elif n % 3 == 1:
        commands.append(domain.CancelOrder(order_id=order_id, at=at, reason="r"))
    return commands


async def write_orders(
    writer: Writer, order_ids: Sequence[str], *, first: int = 0, clients: int = 32
) -> list[Accepted]:
    """Run each order's whole life cycle through the writer; orders run concurrently."""
    accepted: list[Accepted] = []
    queue = list(enumerate(order_ids, start=first))

    async def client() -> None:
        while queue:
            n, order_id = queue.pop()
            for command in lifecycle(order_id, n):
                accepted.append(await writer.submit(CommandRequest(command=command)))

    await asyncio.gather(*(client() for _ in range(clients)))
    return accepted
