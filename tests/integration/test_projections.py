"""The projections against the real broker and real Postgres (design.md, invariants 6 and 7).

Commands go through the HTTP API to a real ``Writer``; a projection runner consumes the topic
in-process (one consumer for the projections it runs, one transaction per batch covering all of
them); queries read what they wrote. The tables are compared with the oracle, a pure fold of
every event in the topic. Poison events are produced straight to the topic. Waiting is polling
with a deadline (``tests.support.projection_harness``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, date, datetime
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer, TopicPartition
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncEngine

from projections.batches import Group, Halt
from projections.bookkeeping.checkpoints import (
    StaleCheckpoint,
    advance_checkpoints,
    read_checkpoints,
)
from projections.models import catalog
from projections.projection import Applied, Db, Projection, State, begin
from projections.runner import ProjectionRunner, RunnerConfig
from projections.schema import (
    daily_sales,
    projection_checkpoints,
    projection_halts,
    projection_versions,
)
from projections.schema import orders as orders_table
from service.edge.http.app import Resources, create_app
from service.kernel import envelope
from service.kernel.access import Actor
from service.kernel.events import ItemAdded, OrderCreated, OrderPaid, OrderPlaced
from service.write.writer import Writer
from tests.support.http import serve
from tests.support.identity import access
from tests.support.log import read_topic
from tests.support.poison import envelope_json, produce
from tests.support.projection_harness import (
    Api,
    Contents,
    Done,
    Running,
    assert_tables_equal_oracle,
    checkpoints,
    decoded,
    differences,
    ends_of,
    eventually,
    normalise,
    oracle_contents,
    read_records,
    running,
    table_contents,
    wait_caught_up,
)

PARTITIONS = 4
ALL = ["orders", "order_history", "customer_summary", "daily_sales"]
# Queries carrying a consistency token wait at most this long (then 503, which fails a test).
CONSISTENCY_WAIT_MS = 15_000


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
async def client(writer: Writer, db: AsyncEngine, topic: str) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(
        Resources(writer=writer, engine=db, topic=topic, consistency_wait_ms=CONSISTENCY_WAIT_MS),
        access=access(),
    )
    async with serve(app) as client:
        yield client


@pytest.fixture
def api(client: httpx.AsyncClient) -> Api:
    return Api(client)


# -- helpers -----------------------------------------------------------------------------------


async def get_ok(client: httpx.AsyncClient, path: str, token: str | None = None) -> Any:
    headers = {"X-Consistency-Token": token} if token is not None else {}
    response = await client.get(path, headers=headers)
    assert response.status_code == 200, f"GET {path} ({token}): {response.text}"
    return response


async def create_on(
    api: Api, customer_id: str, wanted: set[int], *, currency: str = "EUR", attempts: int = 64
) -> Done:
    """Create orders for ``customer_id`` until one lands in one of the ``wanted`` partitions."""
    for _ in range(attempts):
        created = await api.create(customer_id, currency)
        if created.partition in wanted:
            return created
    raise AssertionError(f"no order landed in partitions {wanted} after {attempts} creates")


async def placed_order(api: Api, customer_id: str, wanted: set[int] | None = None) -> Done:
    """An order with one item, placed; in one of the ``wanted`` partitions when given."""
    if wanted is None:
        created = await api.create(customer_id)
    else:
        created = await create_on(api, customer_id, wanted)
    await api.add(created.order_id, "SKU-1", 2, 700)
    return await api.place(created.order_id)


async def first_offset_from(bootstrap: str, topic: str, partition: int, offset: int) -> int:
    """The offset of the first committed record a consumer reads after seeking to ``offset``."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, isolation_level="read_committed", enable_auto_commit=False
    )
    await consumer.start()
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, offset)

        async def check() -> tuple[bool, Any]:
            fetched = await consumer.getmany(tp, timeout_ms=200, max_records=1)
            records = fetched.get(tp, [])
            return bool(records), records[0].offset if records else None

        return int(await eventually(check, f"a record at or after {partition}:{offset}"))
    finally:
        await consumer.stop()


async def stored_positions(
    runner: ProjectionRunner, topic: str, partitions: Sequence[int]
) -> dict[int, dict[str, int]]:
    """The runner's projections' stored checkpoints, shaped like ``runner.positions``."""
    async with begin(runner.engine) as connection:
        stored = await read_checkpoints(connection, runner.targets, topic, partitions)
    return {p: {t.name: stored[(t.name, p)] for t in runner.targets} for p in partitions}


class Counting:
    """A real projection that counts the events each of its batches hands it.

    Counted in ``load``, inside the batch's transaction: a batch that rolled back afterwards
    would be counted too, so a count can only come out too high, never hide a double apply.
    """

    def __init__(self, inner: Projection) -> None:
        self.inner = inner
        self.name = inner.name
        self.tables = inner.tables
        self.events = 0

    async def load(self, db: Db, batch: Sequence[Applied]) -> State:
        self.events += len(batch)
        return await self.inner.load(db, batch)

    def fold(self, state: State, applied: Applied) -> None:
        self.inner.fold(state, applied)


def counted(runner: ProjectionRunner) -> dict[str, int]:
    """Events each (``Counting``) projection of ``runner`` was handed, by projection name."""
    return {p.name: p.events for p in runner.projections if isinstance(p, Counting)}


async def stored_halts(db: AsyncEngine, topic: str) -> dict[tuple[str, int], tuple[Any, ...]]:
    """The ``projection_halts`` rows of ``topic``: (projection, partition) -> the rest."""
    halts = projection_halts
    async with db.connect() as connection:
        rows = (
            await connection.execute(
                sa.select(
                    halts.c.projection,
                    halts.c.partition,
                    halts.c.version,
                    halts.c.offset,
                    halts.c.order_id,
                    halts.c.reason,
                ).where(halts.c.topic == topic)
            )
        ).all()
    return {(row[0], row[1]): tuple(row[2:]) for row in rows}


async def wait_halts_stored(db: AsyncEngine, topic: str, run: Running) -> None:
    """Wait until ``projection_halts`` holds exactly the runner's halts (version, offset, ...)."""
    versions = {t.name: t.version for t in run.runner.targets}
    wanted = {
        key: (versions[halt.projection], halt.offset, halt.order_id, halt.reason)
        for key, halt in run.runner.halted.items()
    }
    assert wanted, "no halt to look for"

    async def stored() -> tuple[bool, Any]:
        found = await stored_halts(db, topic)
        return found == wanted, (found, wanted)

    await eventually(stored, "the halts to be stored in projection_halts", alive=run)


async def wait_settled(
    db: AsyncEngine, bootstrap: str, topic: str, run: Running, name: str, partition: int
) -> int:
    """Wait until ``name``'s stored checkpoint and the runner's position in ``partition`` sit at
    the partition's end (past the last commit marker): nothing left there for the runner to
    move. Returns that end offset, where the partition's next record will go.
    """
    tp = TopicPartition(topic, partition)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
    await consumer.start()
    try:

        async def check() -> tuple[bool, Any]:
            end = (await consumer.end_offsets([tp]))[tp]
            stored = (await checkpoints(db, name, topic)).get(partition)
            position = run.runner.positions.get(partition, {}).get(name)
            return stored == position == end, (stored, position, end)

        detail = await eventually(check, f"{name} to settle at the end of {partition}", alive=run)
        return int(detail[2])
    finally:
        await consumer.stop()


# -- 1. end to end, one projection at a time ---------------------------------------------------


class Story:
    """Two customers, five orders, every step of the life cycle, one refund."""

    def __init__(self, suffix: str) -> None:
        self.alice = f"alice-{suffix}"
        self.bob = f"bob-{suffix}"
        self.first_day = datetime.now(UTC).date()
        self.last_day = self.first_day

    async def tell(self, api: Api) -> None:
        self.delivered = (await api.create(self.alice)).order_id
        await api.add(self.delivered, "MUG", 2, 1250)
        await api.add(self.delivered, "TEA", 1, 500)
        await api.change(self.delivered, "MUG", 3)
        await api.remove(self.delivered, "TEA")
        await api.place(self.delivered)  # total 3 x 1250
        await api.pay(self.delivered, 3750)
        await api.ship(self.delivered, "DHL", "JD0146")
        await api.deliver(self.delivered)  # v9

        self.refunded = (await api.create(self.alice)).order_id
        await api.add(self.refunded, "BOOK", 1, 999)
        await api.place(self.refunded)
        await api.pay(self.refunded, 999)
        await api.cancel(self.refunded, "changed mind")  # v5, refund 999

        self.placed = (await api.create(self.alice)).order_id
        await api.add(self.placed, "PEN", 2, 300)
        await api.add(self.placed, "INK", 1, 150)
        await api.place(self.placed)  # v4, total 750, still open

        self.dropped = (await api.create(self.alice)).order_id
        await api.add(self.dropped, "CUP", 1, 400)
        await api.cancel(self.dropped, "duplicate")  # v3, a draft: no refund

        self.dollars = (await api.create(self.bob, "USD")).order_id
        await api.add(self.dollars, "HAT", 1, 5000)
        await api.place(self.dollars)
        await api.pay(self.dollars, 5000, "USD")  # v4
        self.last_day = datetime.now(UTC).date()


async def told(
    api: Api, db: AsyncEngine, bootstrap: str, topic: str, group_prefix: str, name: str, suffix: str
) -> Story:
    """The story told through the API while ``name``'s runner runs; returns once it caught up."""
    story = Story(suffix)
    async with running(db, bootstrap, topic, group_prefix, [name], assigned=PARTITIONS) as run:
        await story.tell(api)
        await wait_caught_up(db, topic, [name], api.ends(), alive=run)
    return story


async def test_orders_projection_end_to_end(
    api: Api,
    client: httpx.AsyncClient,
    db: AsyncEngine,
    bootstrap: str,
    topic: str,
    group_prefix: str,
    suffix: str,
) -> None:
    story = await told(api, db, bootstrap, topic, group_prefix, "orders", suffix)

    response = await get_ok(client, f"/orders/{story.delivered}")
    assert response.headers["etag"] == '"9"'
    order = response.json()
    assert order["status"] == "delivered"
    assert order["customer_id"] == story.alice
    assert (order["currency"], order["total"], order["item_count"]) == ("EUR", 3750, 1)
    assert order["items"] == [{"sku": "MUG", "name": "Item MUG", "quantity": 3, "unit_price": 1250}]
    assert (order["version"], order["paid_amount"], order["refunded_amount"]) == (9, 3750, 0)
    assert (order["carrier"], order["tracking_number"]) == ("DHL", "JD0146")
    assert order["payment_reference"] == f"psp-{story.delivered[:8]}"
    for step in ("created_at", "placed_at", "paid_at", "shipped_at", "delivered_at"):
        assert order[step] is not None, step
    assert order["cancelled_at"] is None
    assert order["created_at"] < order["placed_at"] < order["paid_at"] < order["shipped_at"]

    refunded = (await get_ok(client, f"/orders/{story.refunded}")).json()
    assert (refunded["status"], refunded["version"], refunded["total"]) == ("cancelled", 5, 999)
    assert (refunded["paid_amount"], refunded["refunded_amount"]) == (999, 999)
    assert refunded["cancel_reason"] == "changed mind"
    assert refunded["paid_at"] is not None
    assert refunded["cancelled_at"] is not None

    placed = (await get_ok(client, f"/orders/{story.placed}")).json()
    assert (placed["status"], placed["version"], placed["total"]) == ("placed", 4, 750)
    assert placed["item_count"] == 2
    assert placed["paid_at"] is None

    dropped = (await get_ok(client, f"/orders/{story.dropped}")).json()
    assert (dropped["status"], dropped["version"], dropped["total"]) == ("cancelled", 3, 400)
    assert (dropped["refunded_amount"], dropped["placed_at"]) == (0, None)

    dollars = (await get_ok(client, f"/orders/{story.dollars}")).json()
    assert (dollars["status"], dollars["currency"], dollars["total"]) == ("paid", "USD", 5000)

    listed = (await get_ok(client, f"/orders?customer_id={story.alice}")).json()
    assert listed["next_cursor"] is None
    assert [(o["order_id"], o["status"], o["total"], o["version"]) for o in listed["items"]] == [
        (story.delivered, "delivered", 3750, 9),
        (story.refunded, "cancelled", 999, 5),
        (story.placed, "placed", 750, 4),
        (story.dropped, "cancelled", 400, 3),
    ]
    bobs = (await get_ok(client, f"/orders?customer_id={story.bob}")).json()["items"]
    assert [(o["order_id"], o["status"]) for o in bobs] == [(story.dollars, "paid")]
    assert (await client.get("/orders/no-such-order")).status_code == 404


async def test_order_history_projection_end_to_end(
    api: Api,
    client: httpx.AsyncClient,
    db: AsyncEngine,
    bootstrap: str,
    topic: str,
    group_prefix: str,
    suffix: str,
) -> None:
    story = await told(api, db, bootstrap, topic, group_prefix, "order_history", suffix)

    page = (await get_ok(client, f"/orders/{story.delivered}/history")).json()
    assert page["next_cursor"] is None
    history = page["items"]
    assert [(e["version"], e["type"]) for e in history] == list(
        enumerate(
            [
                "OrderCreated",
                "ItemAdded",
                "ItemAdded",
                "ItemQuantityChanged",
                "ItemRemoved",
                "OrderPlaced",
                "OrderPaid",
                "OrderShipped",
                "OrderDelivered",
            ],
            start=1,
        )
    )
    assert history[0]["data"] == {"customer_id": story.alice, "currency": "EUR"}
    assert history[3]["data"] == {"sku": "MUG", "quantity": 3}
    assert history[5]["data"] == {"total": 3750, "item_count": 1}
    assert history[6]["data"]["amount"] == 3750
    assert len({e["event_id"] for e in history}) == 9
    occurred = [e["occurred_at"] for e in history]
    assert occurred == sorted(occurred)

    refunded = (await get_ok(client, f"/orders/{story.refunded}/history")).json()["items"]
    assert [e["type"] for e in refunded][-1] == "OrderCancelled"
    assert refunded[-1]["data"] == {"reason": "changed mind", "refunded_amount": 999}
    dropped = (await get_ok(client, f"/orders/{story.dropped}/history")).json()["items"]
    assert [e["version"] for e in dropped] == [1, 2, 3]
    assert dropped[-1]["data"] == {"reason": "duplicate", "refunded_amount": 0}
    assert (await client.get("/orders/no-such-order/history")).status_code == 404


async def test_order_history_shows_the_actor_each_event_names_and_null_for_none(
    client: httpx.AsyncClient,
    db: AsyncEngine,
    bootstrap: str,
    topic: str,
    group_prefix: str,
    suffix: str,
) -> None:
    order_id = f"actors-{suffix}"
    sealed = [
        (
            OrderCreated(customer_id=f"c-{suffix}", currency="EUR"),
            Actor(sub="alice", client_id="web"),
        ),
        (ItemAdded(sku="MUG", name="Mug", quantity=1, unit_price=100), Actor(sub="svc-stock")),
        (OrderPlaced(total=100, item_count=1), None),  # authentication off, or written before
    ]
    offsets = []
    for version, (event, actor) in enumerate(sealed, start=1):
        command_id = str(uuid.uuid4())
        value = envelope.encode(
            envelope.seal(
                event,
                event_id=str(uuid.uuid4()),
                order_id=order_id,
                version=version,
                occurred_at=datetime.now(UTC),
                command_id=command_id,
                correlation_id=command_id,
                actor=actor,
            )
        )
        offsets.append(await produce(bootstrap, topic, 1, value, order_id.encode()))

    async with running(db, bootstrap, topic, group_prefix, ["order_history"]) as run:
        await wait_caught_up(db, topic, ["order_history"], {1: offsets[-1] + 1}, alive=run)

    history = (await get_ok(client, f"/orders/{order_id}/history")).json()["items"]
    assert [(e["version"], e["actor"]) for e in history] == [
        (1, {"sub": "alice", "client_id": "web"}),
        (2, {"sub": "svc-stock", "client_id": None}),
        (3, None),
    ]


async def test_customer_summary_projection_end_to_end(
    api: Api,
    client: httpx.AsyncClient,
    db: AsyncEngine,
    bootstrap: str,
    topic: str,
    group_prefix: str,
    suffix: str,
) -> None:
    story = await told(api, db, bootstrap, topic, group_prefix, "customer_summary", suffix)

    alice = (await get_ok(client, f"/customers/{story.alice}/summary")).json()
    # Four orders; only the placed one is still open; paid 3750 + 999, refunded 999.
    assert alice == {
        "customer_id": story.alice,
        "order_count": 4,
        "open_orders": 1,
        "lifetime_value": {"EUR": 3750},
    }
    bob = (await get_ok(client, f"/customers/{story.bob}/summary")).json()
    assert bob == {
        "customer_id": story.bob,
        "order_count": 1,
        "open_orders": 1,
        "lifetime_value": {"USD": 5000},
    }
    assert (await client.get(f"/customers/nobody-{suffix}/summary")).status_code == 404


async def test_daily_sales_projection_end_to_end(
    api: Api,
    client: httpx.AsyncClient,
    db: AsyncEngine,
    bootstrap: str,
    topic: str,
    group_prefix: str,
    suffix: str,
) -> None:
    story = await told(api, db, bootstrap, topic, group_prefix, "daily_sales", suffix)

    query = f"/reports/daily-sales?from={story.first_day}&to={story.last_day}"
    report = (await get_ok(client, query)).json()
    assert (report["from"], report["to"]) == (str(story.first_day), str(story.last_day))
    totals: dict[str, dict[str, int]] = {}
    for row in report["rows"]:
        assert story.first_day <= date.fromisoformat(row["day"]) <= story.last_day
        into = totals.setdefault(row["currency"], dict.fromkeys(row, 0))
        for column, value in row.items():
            if isinstance(value, int):
                into[column] += value
    counted = {
        currency: {k: v for k, v in row.items() if k not in ("day", "currency")}
        for currency, row in totals.items()
    }
    assert counted == {
        "EUR": {
            "orders_placed": 3,
            "orders_paid": 2,
            "orders_cancelled": 2,
            "revenue": 3750 + 999,
            "refunded": 999,
        },
        "USD": {
            "orders_placed": 1,
            "orders_paid": 1,
            "orders_cancelled": 0,
            "revenue": 5000,
            "refunded": 0,
        },
    }
    if story.first_day == story.last_day:  # no UTC midnight during the test: one row each
        assert [(r["day"], r["currency"]) for r in report["rows"]] == [
            (str(story.first_day), "EUR"),
            (str(story.first_day), "USD"),
        ]
    empty = (await get_ok(client, "/reports/daily-sales?from=2000-01-01&to=2000-01-31")).json()
    assert empty["rows"] == []


# -- 2. read your writes -----------------------------------------------------------------------


async def test_a_query_with_the_consistency_token_sees_its_command(
    api: Api,
    client: httpx.AsyncClient,
    db: AsyncEngine,
    bootstrap: str,
    topic: str,
    group_prefix: str,
    suffix: str,
) -> None:
    customers = [f"ryw-{suffix}-{n}" for n in range(3)]
    created_by: dict[str, int] = dict.fromkeys(customers, 0)
    today = datetime.now(UTC).date()
    sales = {"orders_placed": 0, "orders_paid": 0, "orders_cancelled": 0}
    checked = 0

    async def sees(done: Done, event_type: str, customer_id: str) -> None:
        """Right after the command, each read model answers with that command in it."""
        nonlocal checked
        token = done.token
        order = await get_ok(client, f"/orders/{done.order_id}", token)
        assert order.headers["etag"] == f'"{done.version}"', event_type
        assert order.json()["version"] == done.version
        history = (await get_ok(client, f"/orders/{done.order_id}/history", token)).json()["items"]
        assert [e["version"] for e in history] == list(range(1, done.version + 1))
        assert history[-1]["type"] == event_type
        listed = (await get_ok(client, f"/orders?customer_id={customer_id}", token)).json()
        versions = {o["order_id"]: o["version"] for o in listed["items"]}
        assert versions[done.order_id] == done.version
        summary = (await get_ok(client, f"/customers/{customer_id}/summary", token)).json()
        assert summary["order_count"] == created_by[customer_id]
        report = await get_ok(client, f"/reports/daily-sales?from={today}&to={today}", token)
        counted = {k: sum(r[k] for r in report.json()["rows"]) for k in sales}
        if datetime.now(UTC).date() == today:
            assert counted == sales, event_type
        checked += 1

    # The read models lag (each batch waits 0.1 s in Postgres): a query that did not wait for
    # its token would see the state before its command.
    async with running(
        db, bootstrap, topic, group_prefix, ALL, assigned=PARTITIONS, lag_s=0.1
    ) as run:
        for round_ in range(2):
            for customer in customers:
                created = await api.create(customer)
                created_by[customer] += 1
                await sees(created, "OrderCreated", customer)
                order_id = created.order_id
                await sees(await api.add(order_id, "A", 1, 100), "ItemAdded", customer)
                await sees(await api.change(order_id, "A", 4), "ItemQuantityChanged", customer)
                placed = await api.place(order_id)
                sales["orders_placed"] += 1
                await sees(placed, "OrderPlaced", customer)
                paid = await api.pay(order_id, 400)
                sales["orders_paid"] += 1
                await sees(paid, "OrderPaid", customer)
                if round_ == 0:
                    cancelled = await api.cancel(order_id)
                    sales["orders_cancelled"] += 1
                    await sees(cancelled, "OrderCancelled", customer)
                else:
                    await sees(await api.ship(order_id), "OrderShipped", customer)
                    await sees(await api.deliver(order_id), "OrderDelivered", customer)
        run.check_alive()
    assert checked == len(api.accepted) == 2 * 3 * 6 + 3


# -- 3. every table equals the oracle after a mixed workload -----------------------------------


def address(n: int) -> dict[str, Any]:
    return {
        "name": f"Customer {n}",
        "lines": [f"{n} Rue de la Paix"] + ([f"Étage {n % 7}"] if n % 2 else []),
        "city": "Paris",
        "postal_code": f"750{n % 20:02d}",
        "country": "FR",
    }


async def lifecycle(api: Api, customer_id: str, kind: str, currency: str, n: int) -> None:
    """One order through the steps ``kind`` names; amounts vary with ``n``, and so does when
    it gets a shipping address (at creation, while draft, once placed, or never)."""
    at_creation = address(n) if n % 3 == 0 else None
    order_id = (await api.create(customer_id, currency, at_creation)).order_id
    if n % 3 == 1:
        await api.set_address(order_id, address(n + 1))
    items = {"A": (1 + n % 3, 100 * (n + 1))}
    await api.add(order_id, "A", *items["A"])
    if kind == "draft":
        return
    items["B"] = (2, 250 + n)
    await api.add(order_id, "B", *items["B"])
    items["A"] = (5, items["A"][1])
    await api.change(order_id, "A", 5)
    if kind == "draft-cancel":
        await api.cancel(order_id, f"cancelled draft {n}")
        return
    if n % 2:
        await api.remove(order_id, "B")
        del items["B"]
    await api.place(order_id)
    if n % 4 == 2:
        await api.set_address(order_id, address(n + 2))  # moved since
    if kind == "placed":
        return
    if kind == "placed-cancel":
        await api.cancel(order_id, f"cancelled placed {n}")
        return
    await api.pay(order_id, sum(q * p for q, p in items.values()), currency)
    if kind == "paid-cancel":
        await api.cancel(order_id, f"refund {n}")
        return
    if kind == "paid":
        return
    await api.ship(order_id, "UPS", f"1Z{n:04d}")
    if kind == "delivered":
        await api.deliver(order_id)


KINDS = [
    "draft",
    "draft-cancel",
    "placed",
    "placed-cancel",
    "paid",
    "paid-cancel",
    "shipped",
    "delivered",
]


async def mixed_workload(api: Api, tag: str, count: int) -> None:
    """``count`` orders of every kind over four customers, concurrently (group commits)."""
    await asyncio.gather(
        *(
            lifecycle(
                api, f"{tag}-c{n % 4}", KINDS[n % len(KINDS)], "USD" if n % 5 == 0 else "EUR", n
            )
            for n in range(count)
        )
    )


async def test_every_read_model_table_equals_the_oracle_after_a_mixed_workload(
    api: Api,
    client: httpx.AsyncClient,
    db: AsyncEngine,
    bootstrap: str,
    topic: str,
    group_prefix: str,
    suffix: str,
) -> None:
    first, second = f"first-{suffix}", f"second-{suffix}"
    async with running(db, bootstrap, topic, group_prefix, ALL, assigned=PARTITIONS) as run:
        # Customers whose orders sit in several partitions, applied one command at a time (read
        # your writes), so the tables see the events in time order. ``first``'s latest event is
        # in partition y, ``second``'s in x, and both have an earlier one in the other: a
        # summary that keeps "the last applied" rather than an order-independent value differs
        # from a fold that takes the partitions in any fixed order.
        async def create_applied(customer_id: str, wanted: set[int]) -> Done:
            for _ in range(64):
                created = await api.create(customer_id)
                await get_ok(client, f"/customers/{customer_id}/summary", created.token)
                if created.partition in wanted:
                    return created
            raise AssertionError(f"no order of {customer_id} landed in {wanted}")

        x = (await create_applied(first, set(range(PARTITIONS)))).partition
        y = (await create_applied(first, set(range(PARTITIONS)) - {x})).partition
        await create_applied(second, {y})
        await create_applied(second, {x})

        # Then everything at once: every life cycle, several customers, both currencies.
        await mixed_workload(api, f"mixed-{suffix}", 40)
        await wait_caught_up(db, topic, ALL, api.ends(), alive=run)

    events = [logged.applied() for logged in await read_topic(bootstrap, topic, PARTITIONS)]
    assert len(events) == len(api.accepted)
    assert {e.envelope.type for e in events} >= {
        "OrderCreated",
        "ItemAdded",
        "ItemQuantityChanged",
        "ItemRemoved",
        "OrderPlaced",
        "OrderPaid",
        "OrderShipped",
        "OrderDelivered",
        "OrderCancelled",
        "ShippingAddressSet",
    }
    contents = await assert_tables_equal_oracle(db, ALL, events)
    rows = contents["orders"]["orders"].values()
    refunds = [o for o in rows if o["refunded_amount"] > 0]
    assert refunds, "the workload has no cancelled paid order"
    shipped = [o for o in rows if o["status"] in ("shipped", "delivered") and o["shipping_address"]]
    assert shipped, "the workload shipped no order with an address"
    response = await get_ok(client, f"/orders/{shipped[0]['order_id']}")
    assert response.json()["shipping_address"] == {"region": None, **shipped[0]["shipping_address"]}
    shipped_event = next(
        e.event
        for e in events
        if e.envelope.order_id == shipped[0]["order_id"] and e.envelope.type == "OrderShipped"
    )
    assert (
        msgspec.json.decode(msgspec.json.encode(shipped_event))["shipping_address"]
        == shipped[0]["shipping_address"]
    )


Checkpoints = dict[str, dict[int, int]]


def keyed(table: sa.Table, rows: Any) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Rows as plain comparable values, by primary key (as the harness compares them)."""
    keys = [column.name for column in table.primary_key.columns]
    plain = [{name: normalise(value) for name, value in row.items()} for row in rows]
    return {tuple(row[k] for k in keys): row for row in plain}


async def snapshot(db: AsyncEngine, topic: str) -> tuple[Checkpoints, dict[str, Contents]]:
    """The live checkpoints and every read-model table, read in ONE repeatable-read snapshot."""
    async with db.connect() as plain:
        connection = await plain.execution_options(isolation_level="REPEATABLE READ")
        async with connection.begin():
            rows = (
                await connection.execute(
                    sa.text(
                        "SELECT c.projection, c.partition, c.next_offset "
                        "FROM projection_checkpoints c "
                        "JOIN projection_versions v USING (projection, version) "
                        "WHERE v.state = 'live' AND c.topic = :t"
                    ),
                    {"t": topic},
                )
            ).all()
            contents: dict[str, Contents] = {}
            for name in ALL:
                contents[name] = {}
                for table in catalog.PROJECTIONS[name].tables:
                    result = await connection.execute(sa.select(table))
                    contents[name][table.name] = keyed(table, (r._mapping for r in result))
    stored: Checkpoints = {name: {} for name in ALL}
    for projection, partition, next_offset in rows:
        stored[projection][partition] = next_offset
    return stored, contents


async def test_each_projection_commits_its_rows_and_its_checkpoints_together(
    api: Api, db: AsyncEngine, bootstrap: str, topic: str, group_prefix: str, suffix: str
) -> None:
    """One runner (one consumer) for the four projections: each projection's rows of a batch
    and its checkpoints commit together (the four transactions run side by side). So in any
    snapshot of the database taken while it applies a mixed workload, every projection's
    tables equal the oracle of exactly the events below its own checkpoints.
    """
    snapshots: list[tuple[Checkpoints, dict[str, Contents]]] = []
    async with running(db, bootstrap, topic, group_prefix, ALL, assigned=PARTITIONS) as run:
        workload = asyncio.create_task(mixed_workload(api, f"one-tx-{suffix}", 40))
        try:
            while not workload.done():
                snapshots.append(await snapshot(db, topic))
                run.check_alive()
                await asyncio.wait({workload}, timeout=0.1)  # sampling interval
            await workload
        finally:
            if not workload.done():
                workload.cancel()
        ends = api.ends()
        await wait_caught_up(db, topic, ALL, ends, alive=run)
        snapshots.append(await snapshot(db, topic))
        assert run.runner.stats.stale_batches == 0

    events = decoded(await read_records(bootstrap, topic, PARTITIONS))
    assert len(events) == len(api.accepted)
    final = snapshots[-1][0]["orders"]
    assert all(final[p] >= end for p, end in ends.items()), (final, ends)
    midway = 0
    for number, (stored, contents) in enumerate(snapshots):
        for name in ALL:
            assert stored[name].keys() == set(range(PARTITIONS)), (number, name, stored)
        if any(0 < stored["orders"][p] < final[p] for p in final):
            midway += 1
        for name in ALL:
            below = [e for e in events if e.offset < stored[name][e.partition]]
            expected = oracle_contents(catalog.PROJECTIONS[name], below)
            problems = differences(contents[name], expected)
            assert not problems, (number, stored, name, problems)
    assert midway, f"no snapshot of {len(snapshots)} caught the runner half-way"
    await assert_tables_equal_oracle(db, ALL, events)


async def test_a_projection_added_later_fills_itself_from_offset_0(
    api: Api, db: AsyncEngine, bootstrap: str, topic: str, group_prefix: str, suffix: str
) -> None:
    """A runner of three projections, then one of all four (same group prefix): the fourth
    starts from offset 0 while the three go on from their checkpoints, applying nothing twice.
    """
    three = ["orders", "order_history", "customer_summary"]
    added = "daily_sales"
    async with running(
        db, bootstrap, topic, group_prefix, three, assigned=PARTITIONS, wrap=Counting
    ) as before:
        await mixed_workload(api, f"early-{suffix}", 24)
        await wait_caught_up(db, topic, three, api.ends(), alive=before)
    early = decoded(await read_records(bootstrap, topic, PARTITIONS))
    assert len(early) == len(api.accepted)
    assert counted(before.runner) == dict.fromkeys(three, len(early))
    assert await checkpoints(db, added, topic) == {}, f"a runner without {added} touched it"
    await assert_tables_equal_oracle(db, three, early)
    async with db.connect() as connection:
        assert not await connection.scalar(sa.select(sa.func.count()).select_from(daily_sales))

    async with running(
        db, bootstrap, topic, group_prefix, ALL, assigned=PARTITIONS, wrap=Counting
    ) as after:
        assert after.runner.group_id != before.runner.group_id
        await mixed_workload(api, f"late-{suffix}", 16)
        await wait_caught_up(db, topic, ALL, api.ends(), alive=after)

    events = decoded(await read_records(bootstrap, topic, PARTITIONS))
    assert len(events) == len(api.accepted)
    late = len(events) - len(early)
    assert late > 0
    # The new projection was handed every event; the three only the ones after their
    # checkpoints, that is the new ones.
    assert counted(after.runner) == {**dict.fromkeys(three, late), added: len(events)}
    assert after.runner.stats.events == len(events) + len(three) * late
    assert after.runner.stats.stale_batches == 0
    await assert_tables_equal_oracle(db, ALL, events)


# -- 4. a stale instance writes nothing --------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
async def test_a_stale_instance_whose_checkpoint_moved_writes_nothing(
    name: str, api: Api, db: AsyncEngine, bootstrap: str, topic: str, suffix: str
) -> None:
    await mixed_workload(api, f"stale-{suffix}", 12)
    fetched = await read_records(bootstrap, topic, PARTITIONS)
    assert len(fetched) >= 2, "the workload should span several partitions"
    projection = catalog.PROJECTIONS[name]
    config = RunnerConfig(kafka=bootstrap, topic=topic, group_prefix="unused")
    everything = list(range(PARTITIONS))

    # Both instances (each a runner of this one projection) believe they own every partition
    # at offset 0 ...
    zombie = ProjectionRunner([projection], db, config)
    owner = ProjectionRunner([projection], db, config)
    for instance in (zombie, owner):
        await instance.load_targets()
        instance.positions = await stored_positions(instance, topic, everything)
    at_zero = {p: {name: 0} for p in everything}
    assert zombie.positions == at_zero
    (target,) = zombie.targets

    # ... but after a rebalance partition ``taken`` belongs to ``owner``, which applies it.
    taken = min(fetched, key=lambda tp: tp.partition)
    await owner.apply({taken: fetched[taken]})
    moved = await checkpoints(db, name, topic)
    assert moved[taken.partition] == fetched[taken][-1].offset + 1
    before = await table_contents(db, projection)
    assert any(before.values())

    # The zombie applies its whole fetch: the compare-and-set on ``taken`` fails, so the one
    # transaction rolls back, the other partitions' rows and checkpoints included. ``apply``
    # either raises StaleCheckpoint or handles it itself by re-seeking its consumer (a real
    # one, manually assigned, so that a re-seek has something to act on; with a group of its
    # own, for the informational offset commits).
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=f"zombie-{uuid.uuid4().hex[:8]}",
        isolation_level="read_committed",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in everything])
        zombie.consumer = consumer
        try:
            await zombie.apply(fetched)
        except StaleCheckpoint:
            assert zombie.positions == at_zero
        else:
            assert zombie.stats.stale_batches == 1, "apply neither raised nor handled the CAS"
            assert zombie.positions == {p: {name: offset} for p, offset in moved.items()}, (
                "after a stale batch: re-read the checkpoints"
            )
        assert await table_contents(db, projection) == before
        assert await checkpoints(db, name, topic) == moved
        assert zombie.stats.events == 0

        # The compare-and-set alone: a move from an offset that is not stored changes nothing,
        # not even for the partition whose expected offset is right.
        with pytest.raises(StaleCheckpoint):
            async with begin(db) as connection:
                await advance_checkpoints(
                    connection,
                    topic,
                    [
                        Group(target, taken.partition, 0, 1),
                        Group(target, taken.partition ^ 1, 0, 1),
                    ],
                )
        assert await checkpoints(db, name, topic) == moved

        # Re-read the checkpoints (what the runner does on StaleCheckpoint and on assignment)
        # and apply again: every event is in the tables exactly once.
        zombie.positions = await stored_positions(zombie, topic, everything)
        await zombie.apply(fetched)
    finally:
        zombie.consumer = None
        await consumer.stop()
    events = decoded(fetched)
    await assert_tables_equal_oracle(db, [name], events)
    assert owner.stats.events + zombie.stats.events == len(events)
    assert await checkpoints(db, name, topic) == {
        p: fetched[TopicPartition(topic, p)][-1].offset + 1
        if TopicPartition(topic, p) in fetched
        else 0
        for p in everything
    }


async def test_a_running_runner_handles_a_checkpoint_moved_behind_its_back(
    api: Api, db: AsyncEngine, bootstrap: str, topic: str, group_prefix: str, suffix: str
) -> None:
    customer = f"moved-{suffix}"
    async with running(db, bootstrap, topic, group_prefix, ["orders"], assigned=PARTITIONS) as run:
        runner = run.runner
        (target,) = runner.targets
        first = await api.create(customer)
        partition = first.partition
        await wait_caught_up(db, topic, ["orders"], api.ends(), alive=run)
        # Idle, the runner moves its checkpoint over the commit marker to the partition's end:
        # wait for that, so that only another instance can move the checkpoint from here on.
        stored = await wait_settled(db, bootstrap, topic, run, "orders", partition)
        assert stored == first.offset + 2, "the checkpoint should be past the commit marker"

        # Another instance took the partition and applied its next transaction (the event at
        # ``stored``, its commit marker at ``stored + 1``): it moved the checkpoint.
        claimed = stored + 2
        async with begin(db) as raw:
            await advance_checkpoints(raw, topic, [Group(target, partition, stored, claimed)])

        zombie_write = await create_on(api, customer, {partition})
        assert zombie_write.offset == stored, "the next event should sit at the partition's end"

        async def stale() -> tuple[bool, Any]:
            return runner.stats.stale_batches >= 1, runner.stats

        await eventually(stale, "the runner to meet the moved checkpoint", alive=run)

        # It wrote nothing for that event and left the checkpoint where the other instance put it.
        async with db.connect() as connection:
            row = (
                await connection.execute(
                    sa.select(orders_table.c.order_id).where(
                        orders_table.c.order_id == zombie_write.order_id
                    )
                )
            ).first()
        assert row is None, "a stale runner wrote an event another instance owns"
        assert (await checkpoints(db, "orders", topic))[partition] == claimed

        # It re-sought to the stored checkpoint and goes on from there, all partitions alike.
        later = await create_on(api, customer, {partition})
        assert later.offset == claimed
        for other in set(range(PARTITIONS)) - {partition}:
            await create_on(api, customer, {other})
        ends = api.ends()
        await wait_caught_up(db, topic, ["orders"], ends, alive=run)
        # ends[partition] is the last commit marker; the runner's position goes just past it.
        settled = await wait_settled(db, bootstrap, topic, run, "orders", partition)
        assert settled == ends[partition] + 1
        assert runner.positions[partition]["orders"] == settled
        rows = await table_contents(db, catalog.PROJECTIONS["orders"])
        present = {key[0] for key in rows["orders"]}
        expected = {d.order_id for d in api.accepted} - {zombie_write.order_id}
        assert present == expected


# -- 5. poison events halt only their partition ------------------------------------------------


def _unknown_type(order_id: str) -> bytes:
    return envelope_json(order_id, type="OrderTeleported", schema_version=1, data={"to": "mars"})


def _paid_but_never_created(order_id: str) -> bytes:
    command_id = str(uuid.uuid4())
    sealed = envelope.seal(
        OrderPaid(amount=1400, currency="EUR", payment_reference="psp-ghost"),
        event_id=str(uuid.uuid4()),
        order_id=order_id,
        version=2,
        occurred_at=datetime.now(UTC),
        command_id=command_id,
        correlation_id=command_id,
    )
    return envelope.encode(sealed)


def _not_json(order_id: str) -> bytes:
    return b"\x00\x9f{ this is not json"


POISONS: dict[str, tuple[Callable[[str], bytes], list[str], str]] = {
    "not-json": (_not_json, ALL, "not a valid envelope"),
    "unknown-type": (_unknown_type, ALL, "unknown event type 'OrderTeleported'"),
    # order_history keeps any well-formed event (an audit trail); the others must refuse it.
    "refused-by-fold": (
        _paid_but_never_created,
        ["orders", "customer_summary", "daily_sales"],
        "unknown order",
    ),
}


async def check_stopped_at(
    db: AsyncEngine,
    bootstrap: str,
    topic: str,
    run: Running,
    halting: Sequence[str],
    partition: int,
    applied_before: int,
    poison_offset: int,
) -> None:
    """Each ``halting`` projection's checkpoint in ``partition`` stops at the poison: past
    ``applied_before`` (the offset of the last event before it), and the next record a consumer
    reads from there (past commit markers) is the poison. The runner's position agrees.
    """
    for name in halting:
        stored = (await checkpoints(db, name, topic))[partition]
        assert applied_before < stored <= poison_offset, name
        assert await first_offset_from(bootstrap, topic, partition, stored) == poison_offset, name
        assert run.runner.positions[partition][name] == stored, name


@pytest.mark.parametrize("kind", list(POISONS))
async def test_a_poison_event_halts_only_its_partition(
    kind: str,
    api: Api,
    db: AsyncEngine,
    bootstrap: str,
    topic: str,
    group_prefix: str,
    suffix: str,
) -> None:
    """One runner for all four projections: the poison halts the projections that cannot
    apply it, in its partition only; the other projections and partitions go on.
    """
    make_poison, halting, reason = POISONS[kind]
    going_on = [name for name in ALL if name not in halting]
    everything = set(range(PARTITIONS))

    # Before the poison: orders in the poisoned partition and in others.
    first = await placed_order(api, f"{kind}-{suffix}-0")
    poisoned = first.partition
    before_on_poisoned = [first, await placed_order(api, f"{kind}-{suffix}-1", {poisoned})]
    before_elsewhere = await placed_order(api, f"{kind}-{suffix}-2", everything - {poisoned})

    ghost = f"ghost-{suffix}"
    poison_offset = await produce(bootstrap, topic, poisoned, make_poison(ghost), ghost.encode())

    # After it: more events in the poisoned partition (never to be applied while halted) ...
    await api.pay(first.order_id, 1400)
    after_on_poisoned = await placed_order(api, f"{kind}-{suffix}-3", {poisoned})
    # ... and in the others (to be applied).
    after_elsewhere = await placed_order(api, f"{kind}-{suffix}-4", everything - {poisoned})
    assert all(d.offset < poison_offset for d in before_on_poisoned)
    assert after_on_poisoned.offset > poison_offset

    def expected_events(fetched: Any) -> list[Any]:
        """The events a correct runner has applied: all but the poison and what follows it."""
        kept = {
            tp: [r for r in records if tp.partition != poisoned or r.offset < poison_offset]
            for tp, records in fetched.items()
        }
        return decoded(kept)

    async def check_halted(run: Running) -> dict[tuple[str, int], Halt]:
        runner = run.runner
        wanted = {(name, poisoned) for name in halting}

        async def halted() -> tuple[bool, Any]:
            return wanted <= set(runner.halted), dict(runner.halted)

        await eventually(halted, f"{halting} to halt partition {poisoned}", alive=run)
        others = {p: end for p, end in api.ends().items() if p != poisoned}
        await wait_caught_up(db, topic, halting, others, alive=run)
        # The projections that can apply the poison go on in its partition too.
        await wait_caught_up(db, topic, going_on, api.ends(), alive=run)
        assert set(runner.halted) == wanted
        for name in halting:
            halt = runner.halted[(name, poisoned)]
            assert (halt.projection, halt.partition, halt.offset) == (name, poisoned, poison_offset)
            assert reason in halt.reason, (name, halt.reason)
            assert halt.order_id == ghost, name
            if kind == "refused-by-fold":
                assert ghost in halt.reason
        await check_stopped_at(
            db,
            bootstrap,
            topic,
            run,
            halting,
            poisoned,
            before_on_poisoned[-1].offset,
            poison_offset,
        )
        await wait_halts_stored(db, topic, run)
        fetched = await read_records(bootstrap, topic, PARTITIONS)
        await assert_tables_equal_oracle(db, halting, expected_events(fetched))
        if going_on:
            await assert_tables_equal_oracle(db, going_on, decoded(fetched))
        return dict(runner.halted)

    async with running(db, bootstrap, topic, group_prefix, ALL, assigned=PARTITIONS) as run:
        halts = await check_halted(run)
        stopped_at = {name: (await checkpoints(db, name, topic))[poisoned] for name in halting}

        # While halted, the other partitions keep being applied; the poisoned one stays put.
        await api.pay(before_elsewhere.order_id, 1400)
        await api.pay(after_elsewhere.order_id, 1400)
        await placed_order(api, f"{kind}-{suffix}-5", {poisoned})
        assert await check_halted(run) == halts
        assert {n: (await checkpoints(db, n, topic))[poisoned] for n in halting} == stopped_at

    # A restarted runner (same group) tries the stored halts again, stops at the same poison
    # and applies nothing twice (no event of any projection).
    async with running(db, bootstrap, topic, group_prefix, ALL, assigned=PARTITIONS) as again:
        assert await check_halted(again) == halts
        assert {n: (await checkpoints(db, n, topic))[poisoned] for n in halting} == stopped_at
        assert again.runner.stats.events == 0


@pytest.mark.parametrize("kind", list(POISONS))
async def test_the_events_before_a_poison_in_the_same_batch_are_applied(
    kind: str, api: Api, db: AsyncEngine, bootstrap: str, topic: str, suffix: str
) -> None:
    """The deterministic form of the batch case above: the runner's ``apply`` gets ONE fetch
    holding events and then the poison. Each halting projection applies the events before the
    poison and stops at it; the others apply the whole fetch.
    """
    make_poison, halting, reason = POISONS[kind]
    going_on = [name for name in ALL if name not in halting]
    first = await placed_order(api, f"{kind}-{suffix}-0")
    poisoned = first.partition
    before = await placed_order(api, f"{kind}-{suffix}-1", {poisoned})
    ghost = f"ghost-{suffix}"
    poison_offset = await produce(bootstrap, topic, poisoned, make_poison(ghost), ghost.encode())
    after = await placed_order(api, f"{kind}-{suffix}-2", {poisoned})
    assert before.offset < poison_offset < after.offset

    tp = TopicPartition(topic, poisoned)
    batch = {tp: (await read_records(bootstrap, topic, PARTITIONS))[tp]}
    config = RunnerConfig(kafka=bootstrap, topic=topic, group_prefix="unused")
    runner = ProjectionRunner([catalog.PROJECTIONS[name] for name in ALL], db, config)
    await runner.load_targets()
    runner.positions = await stored_positions(runner, topic, [poisoned])
    await runner.apply(batch)

    assert set(runner.halted) == {(name, poisoned) for name in halting}
    for name in halting:
        assert runner.halted[(name, poisoned)].offset == poison_offset, name
        assert reason in runner.halted[(name, poisoned)].reason, name
        stored = (await checkpoints(db, name, topic))[poisoned]
        assert before.offset < stored <= poison_offset, (name, stored)
        assert runner.positions[poisoned][name] == stored, name
    kept = {tp: [r for r in batch[tp] if r.offset < poison_offset]}
    await assert_tables_equal_oracle(db, halting, decoded(kept))
    if going_on:
        assert (await checkpoints(db, "order_history", topic))[poisoned] == after.offset + 1
        await assert_tables_equal_oracle(db, going_on, decoded(batch))


class FailingOnce(Counting):
    """A real projection whose first batch fails as a lost serialization race would (40001,
    transient): its transaction rolls back while the other projections' commit."""

    def __init__(self, inner: Projection) -> None:
        super().__init__(inner)
        self.failed = False

    async def load(self, db: Db, batch: Sequence[Applied]) -> State:
        await super().load(db, batch)
        if not self.failed:
            self.failed = True
            raise asyncpg.exceptions.SerializationError("could not serialize access (test)")
        return await self.inner.load(db, batch)


async def test_a_projection_whose_transaction_fails_is_retried_alone(
    api: Api, db: AsyncEngine, bootstrap: str, topic: str, suffix: str
) -> None:
    """The projections of a batch commit side by side, each in its own transaction. When one
    of them fails (transiently), the others stay committed; the retry of the same batch
    applies it to the failed projection only, and nothing twice (the oracle comparison would
    show a customer's lifetime value or a day's revenue counted twice)."""
    first = await placed_order(api, f"retry-{suffix}-0")
    partition = first.partition
    last = await placed_order(api, f"retry-{suffix}-1", {partition})
    await api.pay(last.order_id, 1400)
    tp = TopicPartition(topic, partition)
    batch = {tp: (await read_records(bootstrap, topic, PARTITIONS))[tp]}
    end = batch[tp][-1].offset + 1

    failing = FailingOnce(catalog.PROJECTIONS["customer_summary"])
    others = [Counting(catalog.PROJECTIONS[name]) for name in ALL if name != failing.name]
    config = RunnerConfig(kafka=bootstrap, topic=topic, group_prefix="unused")
    runner = ProjectionRunner([*others, failing], db, config)
    await runner.load_targets()
    runner.positions = await stored_positions(runner, topic, [partition])
    before = dict(runner.positions[partition])

    with pytest.raises(asyncpg.exceptions.SerializationError):
        await runner.apply(batch)
    for other in others:
        assert (await checkpoints(db, other.name, topic))[partition] == end, other.name
        assert runner.positions[partition][other.name] == end, other.name
    assert (await checkpoints(db, failing.name, topic))[partition] == before[failing.name]
    assert runner.positions[partition][failing.name] == before[failing.name]

    await runner.apply(batch)  # what _with_retry does after a transient error

    assert {p.name: p.events for p in others} == {p.name: len(batch[tp]) for p in others}
    assert failing.events == 2 * len(batch[tp])  # the failed attempt and the retry
    for name in ALL:
        assert (await checkpoints(db, name, topic))[partition] == end, name
    await assert_tables_equal_oracle(db, ALL, decoded(batch))


async def test_an_event_the_database_refuses_halts_only_its_partition(
    api: Api, db: AsyncEngine, bootstrap: str, topic: str, group_prefix: str, suffix: str
) -> None:
    """An item name with a NUL character in the log (the API and the domain refuse to write
    one today, but the log may hold events from older code or other writers).

    Postgres stores no U+0000 in text or jsonb, so the orders projection (items are jsonb) and
    order_history (data is jsonb) cannot store the event. That is an event the projection
    cannot apply: its partition must halt with the reason, and the other partitions go on; so
    do the projections of the same runner that store no item name (customer_summary,
    daily_sales), in every partition.
    """
    halting = ["orders", "order_history"]
    going_on = ["customer_summary", "daily_sales"]
    everything = set(range(PARTITIONS))
    bad = await api.create(f"nul-{suffix}-0")
    poisoned = bad.partition
    refused_by_api = await api.client.post(
        f"/orders/{bad.order_id}/items",
        json={"sku": "MUG", "name": "Mug\x00", "quantity": 1, "unit_price": 100},
    )
    assert refused_by_api.status_code == 400
    command_id = str(uuid.uuid4())
    nul_item = envelope.encode(
        envelope.seal(
            ItemAdded(sku="MUG", name="Mug\x00", quantity=1, unit_price=100),
            event_id=str(uuid.uuid4()),
            order_id=bad.order_id,
            version=2,
            occurred_at=datetime.now(UTC),
            command_id=command_id,
            correlation_id=command_id,
        )
    )
    refused_offset = await produce(bootstrap, topic, poisoned, nul_item, bad.order_id.encode())
    elsewhere = await placed_order(api, f"nul-{suffix}-1", everything - {poisoned})
    after = await placed_order(api, f"nul-{suffix}-2", {poisoned})
    assert elsewhere.partition != poisoned
    assert after.offset > refused_offset

    async with running(db, bootstrap, topic, group_prefix, ALL, assigned=PARTITIONS) as run:
        runner = run.runner
        wanted = {(name, poisoned) for name in halting}

        async def halted() -> tuple[bool, Any]:
            return wanted <= set(runner.halted), (runner.halted, runner.stats)

        await eventually(halted, f"{halting} to halt partition {poisoned}", alive=run, timeout=20)
        others = {p: end for p, end in api.ends().items() if p != poisoned}
        await wait_caught_up(db, topic, halting, others, alive=run, timeout=20)
        await wait_caught_up(db, topic, going_on, api.ends(), alive=run, timeout=20)
        assert set(runner.halted) == wanted
        for name in halting:
            halt = runner.halted[(name, poisoned)]
            assert (halt.offset, halt.order_id) == (refused_offset, bad.order_id), name
            assert "the database refused it" in halt.reason, name
        await check_stopped_at(
            db, bootstrap, topic, run, halting, poisoned, bad.offset, refused_offset
        )
        await wait_halts_stored(db, topic, run)

    fetched = await read_records(bootstrap, topic, PARTITIONS)
    kept = {
        tp: [r for r in records if tp.partition != poisoned or r.offset < refused_offset]
        for tp, records in fetched.items()
    }
    await assert_tables_equal_oracle(db, halting, decoded(kept))
    await assert_tables_equal_oracle(db, going_on, decoded(fetched))


# -- 6. restarts resume from the checkpoints ---------------------------------------------------


async def commit_group_offsets(
    bootstrap: str, group_id: str, offsets: dict[TopicPartition, int]
) -> None:
    """Set a consumer group's committed Kafka offsets (the group must have no members)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False
    )
    await consumer.start()
    try:
        consumer.assign(list(offsets))
        await consumer.commit(offsets)
        for tp, offset in offsets.items():
            assert await consumer.committed(tp) == offset
    finally:
        await consumer.stop()


def group_id_of(names: Sequence[str], db: AsyncEngine, topic: str, group_prefix: str) -> str:
    """The consumer group of a runner of the named projections."""
    config = RunnerConfig(kafka="unused", topic=topic, group_prefix=group_prefix)
    return ProjectionRunner([catalog.PROJECTIONS[n] for n in names], db, config).group_id


async def rewind_kafka_offsets(bootstrap: str, topic: str, group_id: str) -> None:
    """Commit offset 0 for every partition in the (empty) consumer group ``group_id``.

    Kafka's committed offsets are informational only: a runner that trusted them would
    apply everything again after this.
    """
    tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    await commit_group_offsets(bootstrap, group_id, dict.fromkeys(tps, 0))


async def test_a_restarted_runner_resumes_from_the_checkpoints_and_applies_nothing_twice(
    api: Api,
    client: httpx.AsyncClient,
    db: AsyncEngine,
    bootstrap: str,
    topic: str,
    group_prefix: str,
    suffix: str,
) -> None:
    """One runner for all four projections, stopped and restarted (same group) three times."""
    instances: list[Running] = []

    async with running(
        db, bootstrap, topic, group_prefix, ALL, assigned=PARTITIONS, wrap=Counting
    ) as first:
        instances.append(first)
        await mixed_workload(api, f"one-{suffix}", 16)
        await wait_caught_up(db, topic, ALL, api.ends(), alive=first)
    stopped = {name: await checkpoints(db, name, topic) for name in ALL}

    await rewind_kafka_offsets(bootstrap, topic, first.runner.group_id)
    # While no runner runs: new orders, and more steps for the existing ones.
    await mixed_workload(api, f"two-{suffix}", 16)
    assert {name: await checkpoints(db, name, topic) for name in ALL} == stopped

    # Restart; then stop and restart again while commands keep coming.
    more = asyncio.create_task(mixed_workload(api, f"three-{suffix}", 24))
    try:
        async with running(
            db, bootstrap, topic, group_prefix, ALL, assigned=PARTITIONS, wrap=Counting
        ) as second:
            instances.append(second)

            async def progressed() -> tuple[bool, Any]:
                moved = [(await checkpoints(db, name, topic)) != stopped[name] for name in ALL]
                return all(moved), moved

            await eventually(progressed, "the restarted runners to apply something", alive=second)
        async with running(
            db, bootstrap, topic, group_prefix, ALL, assigned=PARTITIONS, wrap=Counting
        ) as third:
            instances.append(third)
            await more
            await wait_caught_up(db, topic, ALL, api.ends(), alive=third)
    finally:
        if not more.done():
            more.cancel()

    events = decoded(await read_records(bootstrap, topic, PARTITIONS))
    assert len(events) == len(api.accepted)
    await assert_tables_equal_oracle(db, ALL, events)
    # Each projection was handed every event once over the three runs, and no more.
    for name in ALL:
        applied = [counted(instance.runner)[name] for instance in instances]
        assert sum(applied) == len(events), (name, applied)
    applied = [instance.runner.stats.events for instance in instances]
    assert sum(applied) == len(ALL) * len(events), applied
    assert all(i.runner.stats.stale_batches == 0 for i in instances)

    # Customer order counts are the orders created: nothing counted twice.
    created: dict[str, int] = {}
    for logged in events:
        if logged.envelope.type == "OrderCreated":
            customer = json.loads(bytes(logged.envelope.data))["customer_id"]
            created[customer] = created.get(customer, 0) + 1
    for customer, count in created.items():
        summary = (await get_ok(client, f"/customers/{customer}/summary")).json()
        assert summary["order_count"] == count, customer


# -- the rebalance listener --------------------------------------------------------------------


async def test_a_database_error_during_assignment_does_not_leave_partitions_unapplied(
    api: Api,
    db: AsyncEngine,
    bootstrap: str,
    topic: str,
    group_prefix: str,
    suffix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Postgres refusing the checkpoint read at assignment (an outage, a restart) is transient.

    Here the checkpoint table is briefly renamed while the runner joins its group, so the
    rebalance listener's read of the checkpoints fails; then the table is back. The runner
    must still apply the topic (retry the seek, or fail loudly), not idle forever.
    """
    await placed_order(api, f"assign-{suffix}")
    caplog.set_level(logging.WARNING, logger="projections.runner")
    async with db.begin() as connection:
        await connection.execute(sa.text("ALTER TABLE projection_checkpoints RENAME TO cp_away"))
    restored = False
    try:
        async with running(db, bootstrap, topic, group_prefix, ["orders"]) as run:

            async def listener_failed() -> tuple[bool, Any]:
                return any(
                    "could not read the checkpoints" in r.getMessage() for r in caplog.records
                ), None

            await eventually(listener_failed, "the assignment to meet the missing table", alive=run)
            async with db.begin() as connection:
                await connection.execute(
                    sa.text("ALTER TABLE cp_away RENAME TO projection_checkpoints")
                )
            restored = True
            for n in range(4):
                await placed_order(api, f"assign-{suffix}-{n}")
            await wait_caught_up(db, topic, ["orders"], api.ends(), alive=run, timeout=20)
    finally:
        if not restored:
            async with db.begin() as connection:
                await connection.execute(
                    sa.text("ALTER TABLE cp_away RENAME TO projection_checkpoints")
                )
    events = decoded(await read_records(bootstrap, topic, PARTITIONS))
    await assert_tables_equal_oracle(db, ["orders"], events)


async def test_records_fetched_while_the_listener_reads_the_checkpoints_are_not_misapplied(
    api: Api, db: AsyncEngine, bootstrap: str, topic: str, group_prefix: str, suffix: str
) -> None:
    """aiokafka runs the rebalance listener in its coordinator task, not inside ``getmany``.

    The group's Kafka offsets stand in the middle of the topic while the projection's
    checkpoints do not exist yet (a plain rebuild reset them, or the projection is new under
    an old group): Kafka's offsets are informational, the checkpoints say where to start.
    While ``on_partitions_assigned`` waits for Postgres (here: another transaction holds the
    checkpoint rows it must insert), the fetcher already fetches from Kafka's offsets and
    ``getmany`` hands those records out. Whatever the runner does with them, it must end up
    having applied every event of the topic exactly once.
    """
    for n in range(4):
        await placed_order(api, f"race-{suffix}-{n}")
    kafka_offsets = api.ends()
    await commit_group_offsets(
        bootstrap,
        group_id_of(["orders"], db, topic, group_prefix),
        {TopicPartition(topic, p): end for p, end in kafka_offsets.items()},
    )
    before = len(api.accepted)
    for n in range(4):
        await placed_order(api, f"race-{suffix}-new-{n}")
    fresh = ends_of((d.partition, d.offset) for d in api.accepted[before:])

    async def listener_waits() -> tuple[bool, Any]:
        async with db.connect() as connection:
            waiting = await connection.scalar(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND query ILIKE '%projection_checkpoints%'"
                )
            )
        return bool(waiting), waiting

    async with db.connect() as connection:
        live = await connection.scalar(
            sa.select(projection_versions.c.version).where(
                projection_versions.c.projection == "orders", projection_versions.c.state == "live"
            )
        )
    blocker = await db.connect()
    try:
        transaction = await blocker.begin()
        await blocker.execute(
            pg_insert(projection_checkpoints),
            [
                {
                    "projection": "orders",
                    "version": live,
                    "topic": topic,
                    "partition": p,
                    "next_offset": 0,
                }
                for p in range(PARTITIONS)
            ],
        )  # uncommitted: the listener's INSERT ... ON CONFLICT DO NOTHING waits for it
        async with running(db, bootstrap, topic, group_prefix, ["orders"]) as run:
            runner = run.runner
            try:
                await eventually(listener_waits, "the listener to wait for the checkpoint rows")

                # A window for getmany to hand out the records after Kafka's offsets while the
                # listener waits: the consumer's position passes them only once it has (a
                # runner that pauses partitions until they are sought hands out nothing: then
                # this merely times out, which is fine).
                async def handed_out() -> tuple[bool, Any]:
                    assert runner.consumer is not None
                    positions = {}
                    for partition in fresh:
                        tp = TopicPartition(topic, partition)
                        if tp in runner.consumer.assignment():
                            positions[partition] = await runner.consumer.position(tp)
                    done = all(positions.get(p, -1) >= end for p, end in fresh.items())
                    return done or run.tasks["orders"].done(), (positions, fresh)

                with contextlib.suppress(AssertionError):
                    await eventually(handed_out, "getmany to hand out the new records", timeout=5)
                run.check_alive()
            finally:
                # Let the listener go on (also on failure: stopping waits for it).
                await transaction.rollback()
            await wait_caught_up(db, topic, ["orders"], api.ends(), alive=run)
    finally:
        await blocker.close()
    events = decoded(await read_records(bootstrap, topic, PARTITIONS))
    await assert_tables_equal_oracle(db, ["orders"], events)
