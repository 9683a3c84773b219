"""The projections against the real broker and real Postgres (design.md, invariants 6 and 7).

Commands go through the HTTP API to a real ``Writer``; the four projection runners consume the
topic in-process, each in its own consumer group; queries read what they wrote. The tables are
compared with the oracle, a pure fold of every event in the topic. Poison events are produced
straight to the topic. Waiting is polling with a deadline (``tests.support.projection_harness``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncEngine

from projections import catalog
from projections.runner import (
    ProjectionRunner,
    RunnerConfig,
    StaleCheckpoint,
    advance_checkpoints,
    read_checkpoints,
)
from projections.schema import orders as orders_table
from projections.schema import projection_checkpoints
from service import envelope
from service.api.app import Resources, create_app
from service.domain import ItemAdded, OrderPaid
from service.writer import Writer, WriterConfig
from tests.support.http import serve
from tests.support.log import read_topic
from tests.support.projection_harness import (
    Api,
    Done,
    Running,
    assert_tables_equal_oracle,
    checkpoints,
    clear_read_models,
    decoded,
    ends_of,
    eventually,
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
async def db(engine: AsyncEngine) -> AsyncEngine:
    """The module's database with every read-model table and checkpoint emptied."""
    await clear_read_models(engine)
    return engine


@pytest.fixture
def group_prefix() -> str:
    return f"test-projections-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def suffix() -> str:
    """Makes customer ids unique per test."""
    return uuid.uuid4().hex[:6]


@pytest.fixture
async def writer(bootstrap: str, topic: str) -> AsyncIterator[Writer]:
    writer = Writer(
        WriterConfig(
            bootstrap_servers=bootstrap,
            topic=topic,
            partitions=PARTITIONS,
            transactional_id=f"writer-{uuid.uuid4().hex[:8]}",
            commit_timeout=10,
        )
    )
    await writer.start()
    yield writer
    await writer.stop()


@pytest.fixture
async def client(writer: Writer, db: AsyncEngine, topic: str) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(
        Resources(writer=writer, engine=db, topic=topic, consistency_wait_ms=CONSISTENCY_WAIT_MS)
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


async def produce(bootstrap: str, topic: str, partition: int, value: bytes, key: bytes) -> int:
    """One record written straight to ``partition`` (no writer, no transaction): its offset."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        metadata = await producer.send_and_wait(topic, value=value, key=key, partition=partition)
    finally:
        await producer.stop()
    assert metadata.partition == partition
    return int(metadata.offset)


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

    history = (await get_ok(client, f"/orders/{story.delivered}/history")).json()
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

    refunded = (await get_ok(client, f"/orders/{story.refunded}/history")).json()
    assert [e["type"] for e in refunded][-1] == "OrderCancelled"
    assert refunded[-1]["data"] == {"reason": "changed mind", "refunded_amount": 999}
    dropped = (await get_ok(client, f"/orders/{story.dropped}/history")).json()
    assert [e["version"] for e in dropped] == [1, 2, 3]
    assert dropped[-1]["data"] == {"reason": "duplicate", "refunded_amount": 0}
    assert (await client.get("/orders/no-such-order/history")).status_code == 404


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
        history = (await get_ok(client, f"/orders/{done.order_id}/history", token)).json()
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


async def lifecycle(api: Api, customer_id: str, kind: str, currency: str, n: int) -> None:
    """One order through the steps ``kind`` names; amounts vary with ``n``."""
    order_id = (await api.create(customer_id, currency)).order_id
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
    }
    contents = await assert_tables_equal_oracle(db, ALL, events)
    refunds = [o for o in contents["orders"]["orders"].values() if o["refunded_amount"] > 0]
    assert refunds, "the workload has no cancelled paid order"


# -- 4. a stale instance writes nothing --------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
async def test_a_stale_instance_whose_checkpoint_moved_writes_nothing(
    name: str, api: Api, db: AsyncEngine, bootstrap: str, topic: str, suffix: str
) -> None:
    await mixed_workload(api, f"stale-{suffix}", 12)
    fetched = await read_records(bootstrap, topic, PARTITIONS)
    assert len(fetched) >= 2, "the workload should span several partitions"
    projection = catalog.PROJECTIONS[name]
    config = RunnerConfig(bootstrap_servers=bootstrap, topic=topic, group_prefix="unused")
    everything = list(range(PARTITIONS))

    # Both instances believe they own every partition at offset 0 ...
    zombie = ProjectionRunner(projection, db, config)
    owner = ProjectionRunner(projection, db, config)
    for instance in (zombie, owner):
        async with db.begin() as connection:
            instance.positions = await read_checkpoints(connection, name, topic, everything)
    assert zombie.positions == dict.fromkeys(everything, 0)

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
            assert zombie.positions == dict.fromkeys(everything, 0)
        else:
            assert zombie.stats.stale_batches == 1, "apply neither raised nor handled the CAS"
            assert zombie.positions == moved, "after a stale batch: re-read the checkpoints"
        assert await table_contents(db, projection) == before
        assert await checkpoints(db, name, topic) == moved
        assert zombie.stats.events == 0

        # The compare-and-set alone: a move from an offset that is not stored changes nothing,
        # not even for the partition whose expected offset is right.
        with pytest.raises(StaleCheckpoint):
            async with db.begin() as connection:
                await advance_checkpoints(
                    connection,
                    name,
                    topic,
                    {taken.partition: (0, 1), taken.partition ^ 1: (0, 1)},
                )
        assert await checkpoints(db, name, topic) == moved

        # Re-read the checkpoints (what the runner does on StaleCheckpoint and on assignment)
        # and apply again: every event is in the tables exactly once.
        async with db.begin() as connection:
            zombie.positions = await read_checkpoints(connection, name, topic, everything)
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
        runner = run.runners["orders"]
        first = await api.create(customer)
        partition = first.partition
        await wait_caught_up(db, topic, ["orders"], api.ends(), alive=run)
        stored = (await checkpoints(db, "orders", topic))[partition]
        assert runner.positions[partition] == stored

        # Another instance took the partition and applied its next transaction (the event at
        # ``stored + 1``, after the commit marker at ``stored``): it moved the checkpoint.
        claimed = stored + 2
        async with db.begin() as connection:
            await advance_checkpoints(connection, "orders", topic, {partition: (stored, claimed)})

        zombie_write = await create_on(api, customer, {partition})
        assert zombie_write.offset == stored + 1, "the next event should sit at stored + 1"

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
        assert later.offset == claimed + 1
        for other in set(range(PARTITIONS)) - {partition}:
            await create_on(api, customer, {other})
        ends = api.ends()
        await wait_caught_up(db, topic, ["orders"], ends, alive=run)
        assert runner.positions[partition] == ends[partition]
        rows = await table_contents(db, catalog.PROJECTIONS["orders"])
        present = {key[0] for key in rows["orders"]}
        expected = {d.order_id for d in api.accepted} - {zombie_write.order_id}
        assert present == expected


# -- 5. poison events halt only their partition ------------------------------------------------


def _unknown_type(order_id: str) -> bytes:
    return json.dumps(
        {
            "event_id": str(uuid.uuid4()),
            "type": "OrderTeleported",
            "schema_version": 1,
            "order_id": order_id,
            "version": 1,
            "occurred_at": datetime.now(UTC).isoformat(),
            "command_id": str(uuid.uuid4()),
            "correlation_id": str(uuid.uuid4()),
            "data": {"to": "mars"},
        }
    ).encode()


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
    make_poison, names, reason = POISONS[kind]
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

    async def check_halted(run: Running) -> None:
        async def halted() -> tuple[bool, Any]:
            return all(poisoned in r.halted for r in run.runners.values()), {
                n: r.halted for n, r in run.runners.items()
            }

        await eventually(halted, f"every runner to halt partition {poisoned}", alive=run)
        others = {p: end for p, end in api.ends().items() if p != poisoned}
        await wait_caught_up(db, topic, names, others, alive=run)
        for name, runner in run.runners.items():
            assert set(runner.halted) == {poisoned}, name
            halt = runner.halted[poisoned]
            assert (halt.partition, halt.offset) == (poisoned, poison_offset), name
            assert reason in halt.reason, (name, halt.reason)
            if kind == "refused-by-fold":
                assert halt.order_id == ghost
                assert ghost in halt.reason
            stored = (await checkpoints(db, name, topic))[poisoned]
            # Everything before the poison is applied; the checkpoint stops at the poison: the
            # next record a consumer reads from there (past commit markers) is the poison.
            assert before_on_poisoned[-1].offset < stored <= poison_offset, name
            assert await first_offset_from(bootstrap, topic, poisoned, stored) == poison_offset
            assert runner.positions[poisoned] == stored
        fetched = await read_records(bootstrap, topic, PARTITIONS)
        await assert_tables_equal_oracle(db, names, expected_events(fetched))

    async with running(db, bootstrap, topic, group_prefix, names, assigned=PARTITIONS) as run:
        await check_halted(run)
        halts = {name: runner.halted[poisoned] for name, runner in run.runners.items()}
        stopped_at = {name: (await checkpoints(db, name, topic))[poisoned] for name in names}

        # While halted, the other partitions keep being applied; the poisoned one stays put.
        await api.pay(before_elsewhere.order_id, 1400)
        await api.pay(after_elsewhere.order_id, 1400)
        await placed_order(api, f"{kind}-{suffix}-5", {poisoned})
        await check_halted(run)
        assert {name: r.halted[poisoned] for name, r in run.runners.items()} == halts

    # A restarted runner (same group) stops at the same poison again and applies nothing twice.
    async with running(db, bootstrap, topic, group_prefix, names, assigned=PARTITIONS) as again:
        await check_halted(again)
        assert {name: r.halted[poisoned] for name, r in again.runners.items()} == halts
        assert {name: (await checkpoints(db, name, topic))[poisoned] for name in names} == (
            stopped_at
        )
        assert {name: r.stats.events for name, r in again.runners.items()} == dict.fromkeys(
            names, 0
        )


async def test_an_event_the_database_refuses_halts_only_its_partition(
    api: Api, db: AsyncEngine, bootstrap: str, topic: str, group_prefix: str, suffix: str
) -> None:
    """An item name with a NUL character in the log (the API and the domain refuse to write
    one today, but the log may hold events from older code or other writers).

    Postgres stores no U+0000 in text or jsonb, so the orders projection (items are jsonb) and
    order_history (data is jsonb) cannot store the event. That is an event the projection
    cannot apply: its partition must halt with the reason, and the other partitions go on.
    """
    names = ["orders", "order_history"]
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

    async with running(db, bootstrap, topic, group_prefix, names, assigned=PARTITIONS) as run:

        async def halted() -> tuple[bool, Any]:
            return all(poisoned in r.halted for r in run.runners.values()), {
                n: (r.halted, r.stats) for n, r in run.runners.items()
            }

        await eventually(
            halted, f"both runners to halt partition {poisoned}", alive=run, timeout=20
        )
        others = {p: end for p, end in api.ends().items() if p != poisoned}
        await wait_caught_up(db, topic, names, others, alive=run, timeout=20)
        for name, runner in run.runners.items():
            assert runner.halted[poisoned].offset == refused_offset, name
            assert "the database refused it" in runner.halted[poisoned].reason, name
            assert (await checkpoints(db, name, topic))[poisoned] == bad.offset + 1, name
        assert elsewhere.partition != poisoned


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


async def rewind_kafka_offsets(bootstrap: str, topic: str, group_prefix: str) -> None:
    """Commit offset 0 for every partition in each projection's (empty) consumer group.

    Kafka's committed offsets are informational only: a runner that trusted them would
    apply everything again after this.
    """
    tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    for name in ALL:
        await commit_group_offsets(bootstrap, f"{group_prefix}.{name}", dict.fromkeys(tps, 0))


async def test_a_restarted_runner_resumes_from_the_checkpoints_and_applies_nothing_twice(
    api: Api,
    client: httpx.AsyncClient,
    db: AsyncEngine,
    bootstrap: str,
    topic: str,
    group_prefix: str,
    suffix: str,
) -> None:
    instances: list[Running] = []

    async with running(db, bootstrap, topic, group_prefix, ALL, assigned=PARTITIONS) as first:
        instances.append(first)
        await mixed_workload(api, f"one-{suffix}", 16)
        await wait_caught_up(db, topic, ALL, api.ends(), alive=first)
    stopped = {name: await checkpoints(db, name, topic) for name in ALL}

    await rewind_kafka_offsets(bootstrap, topic, group_prefix)
    # While no runner runs: new orders, and more steps for the existing ones.
    await mixed_workload(api, f"two-{suffix}", 16)
    assert {name: await checkpoints(db, name, topic) for name in ALL} == stopped

    # Restart; then stop and restart again while commands keep coming.
    more = asyncio.create_task(mixed_workload(api, f"three-{suffix}", 24))
    try:
        async with running(db, bootstrap, topic, group_prefix, ALL, assigned=PARTITIONS) as second:
            instances.append(second)

            async def progressed() -> tuple[bool, Any]:
                moved = [(await checkpoints(db, name, topic)) != stopped[name] for name in ALL]
                return all(moved), moved

            await eventually(progressed, "the restarted runners to apply something", alive=second)
        async with running(db, bootstrap, topic, group_prefix, ALL, assigned=PARTITIONS) as third:
            instances.append(third)
            await more
            await wait_caught_up(db, topic, ALL, api.ends(), alive=third)
    finally:
        if not more.done():
            more.cancel()

    events = decoded(await read_records(bootstrap, topic, PARTITIONS))
    assert len(events) == len(api.accepted)
    await assert_tables_equal_oracle(db, ALL, events)
    for name in ALL:
        applied = [instance.runners[name].stats.events for instance in instances]
        assert sum(applied) == len(events), (name, applied)
        assert all(i.runners[name].stats.stale_batches == 0 for i in instances)

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
        f"{group_prefix}.orders",
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

    blocker = await db.connect()
    try:
        transaction = await blocker.begin()
        await blocker.execute(
            pg_insert(projection_checkpoints),
            [
                {"projection": "orders", "topic": topic, "partition": p, "next_offset": 0}
                for p in range(PARTITIONS)
            ],
        )  # uncommitted: the listener's INSERT ... ON CONFLICT DO NOTHING waits for it
        async with running(db, bootstrap, topic, group_prefix, ["orders"]) as run:
            runner = run.runners["orders"]
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
