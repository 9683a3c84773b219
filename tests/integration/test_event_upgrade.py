"""The first real schema change carried through, the way an operator deploys it (issue 23).

The log holds version-1 events written before orders had shipping addresses (``OrderCreated``
and ``OrderShipped`` v1), and the database is at the revision before the change (0005) with
the read models that version left. New code then writes: addresses for old orders, new orders
with one. The documented path follows: ``orders migrate``, then ``orders projections rebuild
orders``, while queries keep answering. Afterwards the ``orders`` read model equals the oracle
(a pure fold of every event in the log, version-1 events upcast), and the old orders show the
addresses they got since.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from msgspec.structs import replace
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.edge.http.app import Resources, create_app
from service.infra.database import create_engine, migrate
from service.infra.eventlog import partition_for
from service.kernel import domain, envelope
from service.kernel.domain import Order
from tests.support.cli import OrdersCli
from tests.support.database import reset_read_side
from tests.support.http import serve
from tests.support.identity import access
from tests.support.log import read_topic
from tests.support.projection_harness import (
    Api,
    assert_tables_equal_oracle,
    ends_of,
    running,
    wait_caught_up,
)
from tests.support.topics import new_topic
from tests.support.writers import started_writer

PARTITIONS = 4
LEGACY_ORDERS = 24
BEFORE_ADDRESSES = "0005"  # the last revision before shipping addresses
ADDRESS = {
    "name": "Ada Lovelace",
    "lines": ["12 St James's Square"],
    "city": "London",
    "postal_code": "SW1Y 4JH",
    "country": "GB",
}


def _legacy_commands(order_id: str, n: int) -> list[domain.Command]:
    """Drafts, placed orders, and orders paid, shipped and delivered: ``n`` picks which."""
    at = datetime.now(UTC)
    commands: list[domain.Command] = [
        domain.CreateOrder(order_id=order_id, at=at, customer_id=f"c-{n % 5}", currency="EUR"),
        domain.AddItem(order_id=order_id, at=at, sku="A", name="a", quantity=1, unit_price=500),
    ]
    if n % 3 == 0:
        return commands  # a draft
    commands.append(domain.PlaceOrder(order_id=order_id, at=at))
    if n % 3 == 1:
        return commands  # placed
    return [
        *commands,
        domain.PayOrder(
            order_id=order_id, at=at, amount=500, currency="EUR", payment_reference=f"p-{n}"
        ),
        domain.ShipOrder(order_id=order_id, at=at, carrier="DHL", tracking_number=f"T{n}"),
        domain.DeliverOrder(order_id=order_id, at=at),
    ]


async def _write_version_1_history(bootstrap: str, topic: str, prefix: str) -> dict[str, Order]:
    """The orders as the code before the change wrote them: every record as it was then
    (OrderCreated and OrderShipped at schema version 1, with no address in their data)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True)
    await producer.start()
    orders: dict[str, Order] = {}
    try:
        for n in range(LEGACY_ORDERS):
            order_id = f"{prefix}-{n}"
            state: Order | None = None
            for number, command in enumerate(_legacy_commands(order_id, n)):
                [event] = domain.decide(command, state)
                state = domain.evolve(state, event, order_id)
                sealed = envelope.seal(
                    event,
                    event_id=str(uuid.uuid4()),
                    order_id=order_id,
                    version=state.version,
                    occurred_at=command.at,
                    command_id=f"{order_id}-cmd-{number}",
                    correlation_id=f"{order_id}-corr",
                )
                if sealed.type in ("OrderCreated", "OrderShipped"):
                    assert b"shipping_address" not in bytes(sealed.data)
                    sealed = replace(sealed, schema_version=1)
                await producer.send_and_wait(
                    topic,
                    envelope.encode(sealed),
                    key=order_id.encode(),
                    partition=partition_for(order_id.encode(), PARTITIONS),
                    headers=envelope.headers(sealed),
                )
            assert state is not None
            orders[order_id] = state
    finally:
        await producer.stop()
    return orders


async def _has_address_column(engine: AsyncEngine) -> bool:
    async with engine.connect() as connection:
        found = await connection.scalar(
            text(
                "SELECT count(*) FROM information_schema.columns "
                "WHERE table_schema = 'public' AND table_name = 'orders' "
                "AND column_name = 'shipping_address'"
            )
        )
    return bool(found)


async def _keep_reading(
    client: httpx.AsyncClient, order_id: str, stop: asyncio.Event
) -> Counter[int]:
    """GET one order until ``stop``: what queries see while the rebuild runs."""
    statuses: Counter[int] = Counter()
    while not stop.is_set():
        statuses[(await client.get(f"/orders/{order_id}")).status_code] += 1
    return statuses


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[AsyncEngine]:
    """The module's database at head, every read model empty (the test takes it back)."""
    engine = create_engine(database_url)
    await migrate(engine)
    await reset_read_side(engine)
    try:
        yield engine
    finally:
        await engine.dispose()


async def test_migrate_then_rebuild_fills_the_address_for_orders_of_version_1_events(
    db: AsyncEngine, database_url: str, bootstrap: str, topic: str
) -> None:
    prefix = f"legacy-{uuid.uuid4().hex[:6]}"
    group_prefix = f"test-upgrade-{uuid.uuid4().hex[:8]}"
    await new_topic(bootstrap, topic, PARTITIONS)
    legacy = await _write_version_1_history(bootstrap, topic, prefix)

    # The read models as the code before the change left them: projected, then the schema
    # taken back to the revision before the change (which drops the address column).
    events = [logged.applied() for logged in await read_topic(bootstrap, topic, PARTITIONS)]
    async with running(db, bootstrap, topic, group_prefix, ["orders"], assigned=PARTITIONS) as run:
        await wait_caught_up(
            db, topic, ["orders"], ends_of((e.partition, e.offset) for e in events), alive=run
        )
    await migrate(db, revision=BEFORE_ADDRESSES, action="downgrade")
    assert not await _has_address_column(db)

    # The new code writes, before the read side is upgraded: addresses for old drafts and
    # placed orders, and a new order with one, shipped.
    # The writer replays the version-1 events at start: it upcasts them too.
    async with started_writer(bootstrap, topic) as writer:
        app = create_app(Resources(writer=writer, engine=db, topic=topic), access=access())
        async with serve(app) as client:
            api = Api(client)
            addressed = {
                order_id: {**ADDRESS, "name": f"Customer of {order_id}"}
                for order_id, order in legacy.items()
                if order.status in (domain.OrderStatus.DRAFT, domain.OrderStatus.PLACED)
            }
            for order_id, address in addressed.items():
                await api.set_address(order_id, address)
            new = (await api.create("c-new", "EUR", ADDRESS)).order_id
            await api.add(new, "B", 2, 700)
            await api.place(new)
            await api.pay(new, 1400)
            await api.ship(new)
            delivered = next(
                order_id
                for order_id, order in legacy.items()
                if order.status is domain.OrderStatus.DELIVERED
            )

            # The operator's path: migrate, then rebuild the orders projection.
            cli = OrdersCli(bootstrap, database_url, topic, group_prefix)
            code, out, err = await cli.run("migrate")
            assert code == 0, out + err
            assert await _has_address_column(db)

            stop = asyncio.Event()
            reading = asyncio.create_task(_keep_reading(client, delivered, stop))
            try:
                code, out, err = await cli.run("projections", "rebuild", "orders")
            finally:
                stop.set()
                statuses = await reading
            assert code == 0, out + err
            assert set(statuses) == {200}, f"queries during the rebuild: {statuses}"

            # What an old order looks like now.
            order_id, address = next(iter(addressed.items()))
            shown = (await client.get(f"/orders/{order_id}")).json()
            assert shown["shipping_address"] == {**address, "region": None}
            assert (await client.get(f"/orders/{delivered}")).json()["shipping_address"] is None
            shipped = (await client.get(f"/orders/{new}")).json()
            assert (shipped["status"], shipped["shipping_address"]) == (
                "shipped",
                {**ADDRESS, "region": None},
            )

    logged = await read_topic(bootstrap, topic, PARTITIONS)
    versions = Counter(
        (e.envelope.type, dict(e.record.headers)["schema_version"].decode()) for e in logged
    )
    assert versions["OrderCreated", "1"] == LEGACY_ORDERS
    assert versions["OrderShipped", "1"] > 0
    assert versions["OrderCreated", "2"] == 1
    assert versions["OrderShipped", "2"] == 1
    assert versions["ShippingAddressSet", "1"] == len(addressed)
    await assert_tables_equal_oracle(db, ["orders"], [e.applied() for e in logged])
