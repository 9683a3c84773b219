"""Bytes the writer keeps per open order and per closed (delivered or cancelled) order.

In-process and exact: the events are encoded and decoded as from the wire (so every string is
a fresh object, as when the writer loads the log), folded into the writer's state
(``service.write.staging.Committed``), and the memory Python allocated for it is measured with
``tracemalloc``. The same closed orders are also measured kept whole (before the writer settled
them), for the ratio. ``python -m benchmarks.writer_state_size [ORDERS]`` prints one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

from benchmarks import events
from service.kernel import domain, envelope
from service.kernel.events import DomainEvent
from service.write.staging import Committed

AT = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def _commands(order_id: str, n: int, *, closed: bool) -> list[domain.Command]:
    """A placed order of two items from one of 500 customers; closed: paid, shipped and
    delivered (or, one in four, cancelled after payment)."""
    commands: list[domain.Command] = [
        domain.CreateOrder(order_id=order_id, at=AT, customer_id=f"c-{n % 500}", currency="EUR"),
        domain.AddItem(
            order_id=order_id, at=AT, sku="MUG-1", name="Mug", quantity=2, unit_price=1250
        ),
        domain.AddItem(
            order_id=order_id,
            at=AT,
            sku=f"TEA-{n % 50}",
            name="Green tea",
            quantity=1,
            unit_price=500,
        ),
        domain.PlaceOrder(order_id=order_id, at=AT),
    ]
    if not closed:
        return commands
    commands.append(
        domain.PayOrder(
            order_id=order_id, at=AT, amount=3000, currency="EUR", payment_reference=f"psp-{n}"
        )
    )
    if n % 4 == 3:
        return [*commands, domain.CancelOrder(order_id=order_id, at=AT, reason="changed mind")]
    return [
        *commands,
        domain.ShipOrder(order_id=order_id, at=AT, carrier="DHL", tracking_number=f"JD{n:012d}"),
        domain.DeliverOrder(order_id=order_id, at=AT),
    ]


def _records(orders: int, *, closed: bool) -> list[bytes]:
    """Each order's events as record values in the log (made before anything is measured)."""
    records = []
    for n in range(orders):
        order_id = str(uuid.UUID(int=n))
        for event in events.sealed(order_id, _commands(order_id, n, closed=closed)):
            records.append(envelope.encode(event))
    return records


def _read(records: list[bytes]) -> Iterator[tuple[envelope.Envelope, DomainEvent]]:
    """The events as the writer reads them: decoded, every string a fresh object."""
    for value in records:
        yield envelope.decode(value)


def _allocated(build: Callable[[], object]) -> int:
    """Bytes still allocated once ``build`` returned what it built (kept alive meanwhile)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = build()
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del kept
    return after - before


def _committed(records: list[bytes]) -> Committed:
    state = Committed()
    for offset, (sealed, event) in enumerate(_read(records)):
        state.fold(sealed, event, 0, offset)
    return state


def _whole(records: list[bytes]) -> dict[str, domain.Order]:
    """Closed orders as the writer kept them before it settled them: folded whole."""
    kept: dict[str, domain.Order] = {}
    for sealed, event in _read(records):
        kept[sealed.order_id] = domain.evolve(kept.get(sealed.order_id), event, sealed.order_id)
    return kept


def measure(orders: int) -> dict[str, float]:
    open_orders, closed_orders = _records(orders, closed=False), _records(orders, closed=True)
    open_bytes = _allocated(lambda: _committed(open_orders))
    closed_bytes = _allocated(lambda: _committed(closed_orders))
    whole_bytes = _allocated(lambda: _whole(closed_orders))
    return {
        "orders": orders,
        "bytes_per_open_order": open_bytes / orders,
        "bytes_per_closed_order": closed_bytes / orders,
        "bytes_per_closed_order_kept_whole": whole_bytes / orders,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("orders", type=int, nargs="?", default=20_000)
    print(json.dumps(measure(parser.parse_args().orders)), flush=True)


if __name__ == "__main__":
    main()
