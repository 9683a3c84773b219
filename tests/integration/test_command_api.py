"""The command API against the real broker: every endpoint, every error, and the log it writes."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.errors import KafkaError

from service.edge.http.app import Resources, create_app
from service.infra.eventlog import TopicRepartitioned
from service.infra.topic import TopicWouldLoseHistory
from service.kernel.envelope import CURRENT_SCHEMA_VERSION
from service.write import staging
from service.write.contract import WriterConfig
from service.write.writer import Writer, WriterState
from tests.support.http import serve
from tests.support.identity import access
from tests.support.log import by_order, folded_orders, read_topic
from tests.support.topics import new_topic

GOLDEN = Path(__file__).parent.parent / "golden" / "events"
PARTITIONS = 4
Client = httpx.AsyncClient


def _config(bootstrap: str, topic: str, transactional_id: str) -> WriterConfig:
    return WriterConfig(
        kafka=bootstrap,
        topic=topic,
        transactional_id=transactional_id,
        commit_timeout=10,
        max_queue_delay=30,  # load shedding has its own tests; a busy machine stalls batches
    )


@pytest.fixture
async def topic(bootstrap: str) -> str:
    """The test's events topic, created as an operator does."""
    name = f"test.orders.{uuid.uuid4().hex[:12]}"
    await new_topic(bootstrap, name, PARTITIONS)
    return name


@pytest.fixture
def transactional_id() -> str:
    return f"writer-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def writer(bootstrap: str, topic: str, transactional_id: str) -> AsyncIterator[Writer]:
    writer = Writer(_config(bootstrap, topic, transactional_id))
    await writer.start()
    yield writer
    await writer.stop()


@pytest.fixture
async def client(writer: Writer) -> AsyncIterator[Client]:
    async with serve(create_app(Resources(writer=writer), access=access())) as client:
        yield client


async def _create(client: Client, customer: str = "c-1", **headers: str) -> str:
    response = await client.post(
        "/orders", json={"customer_id": customer, "currency": "EUR"}, headers=headers
    )
    assert response.status_code == 201, response.text
    order_id: str = response.json()["order_id"]
    return order_id


async def _add(
    client: Client,
    order_id: str,
    sku: str,
    quantity: int = 1,
    unit_price: int = 1000,
    **headers: str,
) -> Any:
    return await client.post(
        f"/orders/{order_id}/items",
        headers=headers,
        json={"sku": sku, "name": f"Item {sku}", "quantity": quantity, "unit_price": unit_price},
    )


def _problem(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["type"].endswith("/" + code)
    assert body["status"] == status
    return body


async def test_an_order_goes_through_its_whole_life_over_rest(client: Client) -> None:
    created = await client.post("/orders", json={"customer_id": "c-1", "currency": "EUR"})
    assert created.status_code == 201
    order_id = created.json()["order_id"]
    assert created.headers["location"] == f"/orders/{order_id}"
    assert created.headers["etag"] == '"1"'
    assert created.json()["version"] == 1

    steps = [
        await _add(client, order_id, "MUG", quantity=2, unit_price=1250),
        await _add(client, order_id, "TEA", quantity=1, unit_price=500),
        await client.patch(f"/orders/{order_id}/items/MUG", json={"quantity": 3}),
        await client.delete(f"/orders/{order_id}/items/TEA"),
        await client.post(f"/orders/{order_id}/place"),
        await client.post(
            f"/orders/{order_id}/pay",
            json={"amount": 3750, "currency": "EUR", "payment_reference": "psp-1"},
        ),
        await client.post(
            f"/orders/{order_id}/ship", json={"carrier": "DHL", "tracking_number": "JD01"}
        ),
        await client.post(f"/orders/{order_id}/deliver"),
    ]
    for version, response in enumerate(steps, start=2):
        assert response.status_code == 200, response.text
        assert response.headers["etag"] == f'"{version}"'
        partition, offset = response.headers["x-consistency-token"].split(":")
        assert int(partition) in range(PARTITIONS)
        assert int(offset) >= 0
        assert response.json()["version"] == version


ADDRESS = {
    "name": "Erika Mustermann",
    "lines": ["Heidestraße 17"],
    "city": "Berlin",
    "postal_code": "10557",
    "country": "DE",
}


async def test_the_shipping_address_is_set_changed_and_recorded_by_shipping(
    client: Client, bootstrap: str, topic: str
) -> None:
    created = await client.post(
        "/orders",
        json={"customer_id": "c-1", "currency": "EUR", "shipping_address": ADDRESS},
        headers={"Idempotency-Key": "create-1"},
    )
    assert created.status_code == 201, created.text
    order_id = created.json()["order_id"]
    path = f"/orders/{order_id}/shipping-address"
    moved = {**ADDRESS, "lines": ["Unter den Linden 1", "3. OG"], "postal_code": "10117"}

    changed = await client.put(
        path, json=moved, headers={"If-Match": '"1"', "Idempotency-Key": "move-1"}
    )
    assert changed.status_code == 200, changed.text
    assert changed.headers["etag"] == '"2"'
    body = changed.json()
    assert body["version"] == 2
    assert body["consistency_token"] == changed.headers["x-consistency-token"]
    again = await client.put(
        path, json=moved, headers={"If-Match": '"1"', "Idempotency-Key": "move-1"}
    )
    assert (again.status_code, again.json()) == (200, body)
    assert again.headers["idempotent-replayed"] == "true"
    stale = await client.put(path, json=ADDRESS, headers={"If-Match": '"1"'})
    assert stale.status_code == 412, stale.text

    bad = {
        "country": {**moved, "country": "XX"},
        "lines": {**moved, "lines": ["a", "b", "c", "d"]},
        "postal_code": {**moved, "postal_code": "1" * 17},
        "unknown": {**moved, "floor": 3},
        "missing": {k: v for k, v in moved.items() if k != "city"},
    }
    for what, address in bad.items():
        response = await client.put(path, json=address)
        assert response.status_code == 400, (what, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")

    await _add(client, order_id, "MUG", quantity=1, unit_price=1250)
    assert (await client.post(f"/orders/{order_id}/place")).status_code == 200
    last = {**moved, "region": "Berlin"}
    assert (await client.put(path, json=last)).status_code == 200  # still allowed once placed
    paid = await client.post(
        f"/orders/{order_id}/pay",
        json={"amount": 1250, "currency": "EUR", "payment_reference": "psp-1"},
    )
    assert paid.status_code == 200
    too_late = await client.put(path, json=ADDRESS)
    assert too_late.status_code == 409, too_late.text
    assert too_late.json()["type"].endswith("/invalid-transition")
    shipped = await client.post(
        f"/orders/{order_id}/ship", json={"carrier": "DHL", "tracking_number": "JD01"}
    )
    assert shipped.status_code == 200

    events = by_order(await read_topic(bootstrap, topic, PARTITIONS))[order_id]
    written = [(e.envelope.type, e.envelope.schema_version) for e in events]
    assert written == [
        ("OrderCreated", 2),
        ("ShippingAddressSet", 1),
        ("ItemAdded", 1),
        ("OrderPlaced", 1),
        ("ShippingAddressSet", 1),
        ("OrderPaid", 1),
        ("OrderShipped", 2),
    ]
    data = [json.loads(e.record.value)["data"] for e in events]
    assert data[0]["shipping_address"] == ADDRESS
    assert data[1]["shipping_address"] == moved
    assert data[6] == {"carrier": "DHL", "tracking_number": "JD01", "shipping_address": last}


async def test_cancelling_a_paid_order_records_the_refund(
    client: Client,
    bootstrap: str,
    topic: str,
) -> None:
    order_id = await _create(client)
    await _add(client, order_id, "MUG", unit_price=999)
    await client.post(f"/orders/{order_id}/place")
    await client.post(
        f"/orders/{order_id}/pay", json={"amount": 999, "currency": "EUR", "payment_reference": "p"}
    )
    cancelled = await client.post(f"/orders/{order_id}/cancel", json={"reason": "changed mind"})
    assert cancelled.status_code == 200
    events = by_order(await read_topic(bootstrap, topic, PARTITIONS))[order_id]
    assert events[-1].envelope.type == "OrderCancelled"
    assert json.loads(bytes(events[-1].envelope.data)) == {
        "reason": "changed mind",
        "refunded_amount": 999,
    }


async def test_each_error_is_a_problem_response_with_the_right_status(client: Client) -> None:
    order_id = await _create(client)
    _problem(await client.post("/orders/no-such-order/place"), 404, "order-not-found")
    _problem(await client.post(f"/orders/{order_id}/place"), 409, "empty-order")
    _problem(
        await client.post(
            f"/orders/{order_id}/ship", json={"carrier": "DHL", "tracking_number": "1"}
        ),
        409,
        "invalid-transition",
    )
    await _add(client, order_id, "MUG")
    _problem(await _add(client, order_id, "MUG"), 409, "duplicate-item")
    _problem(await client.delete(f"/orders/{order_id}/items/NOPE"), 404, "item-not-found")
    _problem(
        await client.post(f"/orders/{order_id}/place", headers={"If-Match": '"1"'}),
        412,
        "version-mismatch",
    )
    _problem(
        await client.post(f"/orders/{order_id}/place", headers={"If-Match": "banana"}),
        400,
        "invalid-request",
    )
    await client.post(f"/orders/{order_id}/place")
    _problem(
        await client.post(
            f"/orders/{order_id}/pay",
            json={"amount": 1, "currency": "EUR", "payment_reference": "p"},
        ),
        422,
        "payment-mismatch",
    )
    _problem(
        await client.post(
            f"/orders/{order_id}/pay",
            json={"amount": 1000, "currency": "USD", "payment_reference": "p"},
        ),
        422,
        "payment-mismatch",
    )


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/orders", b"{not json"),
        ("/orders", b'{"customer_id": "c", "currency": "EUR", "extra": 1}'),
        ("/orders", b'{"customer_id": "c", "currency": "euro"}'),
        ("/orders", b'{"customer_id": "", "currency": "EUR"}'),
        ("/orders", b'{"customer_id": 7, "currency": "EUR"}'),
        ("/orders/x/items", b'{"sku": "A", "name": "n", "quantity": 0, "unit_price": 1}'),
        ("/orders/x/items", b'{"sku": "A", "name": "n", "quantity": 1, "unit_price": -1}'),
        ("/orders/x/items", b'{"sku": "A", "name": "n", "quantity": 1e40, "unit_price": 1}'),
        ("/orders/x/items", b'{"sku": "A", "name": "n", "quantity": 1.5, "unit_price": 1}'),
        ("/orders/x/pay", b'{"amount": 1, "currency": "EUR"}'),
    ],
)
async def test_malformed_requests_are_rejected_with_400(
    client: Client, path: str, body: bytes
) -> None:
    response = await client.post(path, content=body, headers={"content-type": "application/json"})
    _problem(response, 400, "invalid-request")


async def test_oversized_bodies_unknown_routes_and_wrong_methods(client: Client) -> None:
    huge = json.dumps({"customer_id": "c" * 100_000, "currency": "EUR"})
    _problem(
        await client.post(
            "/orders", content=huge.encode(), headers={"content-type": "application/json"}
        ),
        413,
        "body-too-large",
    )
    _problem(await client.get("/no/such/route"), 404, "not-found")
    _problem(await client.put("/orders"), 405, "method-not-allowed")


async def test_events_on_the_topic_are_keyed_headed_gapless_and_shaped_like_the_golden_files(
    client: Client,
    bootstrap: str,
    topic: str,
) -> None:
    orders = [await _create(client, customer=f"c-{n}") for n in range(3)]
    for order_id in orders:
        await _add(client, order_id, "A")
        await _add(client, order_id, "B")
        await client.post(f"/orders/{order_id}/place")
    events = await read_topic(bootstrap, topic, PARTITIONS)
    grouped = by_order(events)
    assert set(grouped) == set(orders)
    for order_id, logged in grouped.items():
        assert [e.envelope.version for e in logged] == [1, 2, 3, 4]
        assert len({e.record.partition for e in logged}) == 1
        for item in logged:
            assert item.record.key == order_id.encode()
            headers = dict(item.record.headers)
            assert headers["type"] == item.envelope.type.encode()
            version = CURRENT_SCHEMA_VERSION[item.envelope.type]
            assert headers["schema_version"] == str(version).encode()
            assert headers["correlation_id"] == item.envelope.correlation_id.encode()
            golden = json.loads((GOLDEN / f"{item.envelope.type}.v{version}.json").read_text())
            written = json.loads(item.record.value)
            # The golden files predate the envelope's optional actor (issue 19).
            assert set(written) == set(golden) | {"actor"}
            # These orders have no address: an absent optional field is left out.
            assert set(written["data"]) == set(golden["data"]) - {"shipping_address"}
            assert written["actor"] == {"sub": "back-office", "client_id": None}


async def test_fifty_racing_commands_with_the_same_if_match_let_exactly_one_win(
    client: Client,
) -> None:
    order_id = await _create(client)
    responses = await asyncio.gather(
        *(_add(client, order_id, f"SKU-{n}", **{"If-Match": '"1"'}) for n in range(50))
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [412] * 49


async def test_without_if_match_racing_commands_are_serialised_without_gaps(
    client: Client,
    bootstrap: str,
    topic: str,
) -> None:
    order_id = await _create(client)
    responses = await asyncio.gather(*(_add(client, order_id, f"SKU-{n}") for n in range(50)))
    assert all(r.status_code == 200 for r in responses)
    assert sorted(r.json()["version"] for r in responses) == list(range(2, 52))
    versions = [
        e.envelope.version
        for e in by_order(await read_topic(bootstrap, topic, PARTITIONS))[order_id]
    ]
    assert versions == list(range(1, 52))


async def test_a_retry_with_the_same_idempotency_key_appends_nothing(
    client: Client,
    bootstrap: str,
    topic: str,
) -> None:
    first = await client.post(
        "/orders",
        json={"customer_id": "c", "currency": "EUR"},
        headers={"Idempotency-Key": "create-1"},
    )
    again = await client.post(
        "/orders",
        json={"customer_id": "c", "currency": "EUR"},
        headers={"Idempotency-Key": "create-1"},
    )
    assert again.status_code == 201
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    different = await client.post(
        "/orders",
        json={"customer_id": "other", "currency": "EUR"},
        headers={"Idempotency-Key": "create-1"},
    )
    _problem(different, 422, "idempotency-key-reused")
    assert len(await read_topic(bootstrap, topic, PARTITIONS)) == 1


async def test_concurrent_duplicates_append_once(
    client: Client,
    bootstrap: str,
    topic: str,
) -> None:
    order_id = await _create(client)
    responses = await asyncio.gather(
        *(_add(client, order_id, "MUG", **{"Idempotency-Key": "add-mug"}) for _ in range(20))
    )
    assert {r.status_code for r in responses} == {200}
    assert {r.json()["version"] for r in responses} == {2}
    assert len(by_order(await read_topic(bootstrap, topic, PARTITIONS))[order_id]) == 2


async def test_idempotency_survives_a_restart_of_the_service(
    bootstrap: str,
    topic: str,
    transactional_id: str,
) -> None:
    body = {"customer_id": "c", "currency": "EUR"}
    first_writer = Writer(_config(bootstrap, topic, transactional_id))
    await first_writer.start()
    async with serve(create_app(Resources(writer=first_writer), access=access())) as client:
        first = await client.post("/orders", json=body, headers={"Idempotency-Key": "k-9"})
    await first_writer.stop()

    second_writer = Writer(_config(bootstrap, topic, transactional_id))
    await second_writer.start()
    try:
        async with serve(create_app(Resources(writer=second_writer), access=access())) as client:
            again = await client.post("/orders", json=body, headers={"Idempotency-Key": "k-9"})
            other = await client.post(
                "/orders", json={**body, "customer_id": "d"}, headers={"Idempotency-Key": "k-9"}
            )
    finally:
        await second_writer.stop()
    assert again.status_code == 201
    assert again.json() == first.json()
    assert again.headers["x-consistency-token"] == first.headers["x-consistency-token"]
    _problem(other, 422, "idempotency-key-reused")
    assert len(await read_topic(bootstrap, topic, PARTITIONS)) == 1


async def test_restarting_rebuilds_a_state_equal_to_the_fold_of_the_topic(
    client: Client,
    writer: Writer,
    bootstrap: str,
    topic: str,
    transactional_id: str,
) -> None:
    orders = [await _create(client, customer=f"c-{n % 3}") for n in range(12)]
    for n, order_id in enumerate(orders):
        await _add(client, order_id, "A", quantity=n + 1)
        if n % 2:
            await client.post(f"/orders/{order_id}/place")
        if n % 3 == 0:
            await client.post(f"/orders/{order_id}/cancel", json={"reason": "r"})
    restarted = Writer(_config(bootstrap, topic, transactional_id))
    await restarted.start()  # fences the fixture's writer, which is fine here
    try:
        expected = folded_orders(await read_topic(bootstrap, topic, PARTITIONS))
        assert restarted.orders == expected
        assert restarted.orders == writer.orders
    finally:
        await restarted.stop()


async def test_a_bug_in_deciding_fails_its_command_with_a_500_and_the_writer_goes_on(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected error fails its own command only: the rest of its batch is written, and
    the decision loop goes on (without that, every later command would wait forever while
    readiness still said yes)."""
    order_id = await _create(client)
    decide = staging.decide

    def decide_with_a_bug(command: Any, state: Any) -> Any:
        if getattr(command, "sku", None) == "BUG-1":
            raise RuntimeError("a bug in decide")
        return decide(command, state)

    others = [await _create(client, f"c-{n}") for n in range(8)]
    monkeypatch.setattr(staging, "decide", decide_with_a_bug)

    # Sent together, so that group commit puts them in one batch with the bug.
    failed, *alongside = await asyncio.wait_for(
        asyncio.gather(
            _add(client, order_id, "BUG-1"), *(_add(client, other, "CUP-1") for other in others)
        ),
        30,
    )
    later = await asyncio.wait_for(_add(client, order_id, "MUG-1"), 30)

    _problem(failed, 500, "internal-error")
    assert [response.status_code for response in alongside] == [200] * len(others)
    assert later.status_code == 200, later.text
    assert later.json()["version"] == 2


async def test_a_second_writer_fences_the_first_which_never_writes_again(
    client: Client,
    writer: Writer,
    bootstrap: str,
    topic: str,
    transactional_id: str,
) -> None:
    order_id = await _create(client)
    usurper = Writer(_config(bootstrap, topic, transactional_id))
    await usurper.start()
    try:
        refused = await _add(client, order_id, "MUG")
        body = _problem(refused, 503, "unavailable")
        assert "fenced" in body["detail"]
        assert writer.state is WriterState.FENCED
        _problem(await _add(client, order_id, "TEA"), 503, "unavailable")
        assert (await client.get("/health/ready")).status_code == 503
        events = await read_topic(bootstrap, topic, PARTITIONS)
        assert [e.envelope.type for e in events] == ["OrderCreated"]
    finally:
        await usurper.stop()


async def test_a_writer_recovering_when_a_second_took_over_is_fenced_and_leaves_it_the_log(
    client: Client,
    writer: Writer,
    bootstrap: str,
    topic: str,
    transactional_id: str,
) -> None:
    """Reopening its producer after a failure, the first writer must not fence the writer that
    started meanwhile (and then write again): it finds out and stops for good."""
    order_id = await _create(client)
    second_started = asyncio.Event()
    appender = writer._appender
    open_producer, append = appender.open, appender.append

    async def open_once_the_second_started(*, resume: bool = False) -> None:
        await second_started.wait()
        await open_producer(resume=resume)

    async def fail_once(*args: Any) -> Any:
        appender.append = append  # type: ignore[method-assign]
        raise KafkaError("a failure of unknown outcome")

    appender.open = open_once_the_second_started  # type: ignore[method-assign]
    appender.append = fail_once  # type: ignore[method-assign]
    _problem(await _add(client, order_id, "MUG"), 503, "unavailable")
    assert writer.state is WriterState.RECOVERING

    second = Writer(_config(bootstrap, topic, transactional_id))
    await second.start()
    try:
        second_started.set()
        deadline = asyncio.get_running_loop().time() + 30
        while writer.state is WriterState.RECOVERING:
            assert asyncio.get_running_loop().time() < deadline, "the first never finished"
            await asyncio.sleep(0.05)  # polling the first writer's recovery, bounded
        assert writer.state is WriterState.FENCED
        _problem(await _add(client, order_id, "TEA"), 503, "unavailable")
        async with serve(create_app(Resources(writer=second), access=access())) as second_client:
            added = await _add(second_client, order_id, "CUP")
        assert added.status_code == 200, added.text
        assert added.json()["version"] == 2
        assert second.state is WriterState.READY
    finally:
        await second.stop()


async def test_commands_wait_for_the_writer_to_load_and_readiness_says_so(
    bootstrap: str,
    topic: str,
    transactional_id: str,
) -> None:
    writer = Writer(_config(bootstrap, topic, transactional_id))
    async with serve(create_app(Resources(writer=writer), access=access())) as client:
        assert (await client.get("/health/ready")).status_code == 503
        refused = await client.post("/orders", json={"customer_id": "c", "currency": "EUR"})
        _problem(refused, 503, "unavailable")
        assert refused.headers["retry-after"] == "1"
        await writer.start()
        try:
            assert (await client.get("/health/ready")).status_code == 200
        finally:
            await writer.stop()


async def test_the_writer_refuses_a_topic_whose_partitions_were_added_after_orders(
    client: Client, writer: Writer, bootstrap: str, topic: str, transactional_id: str
) -> None:
    """Kafka places a key by the partition count: with partitions added, an order's next
    events would land in another partition than its first ones (invariant 2)."""
    for n in range(16):  # each is misplaced by 12 partitions with a probability of 2/3
        await _create(client, f"c-{n}")
    await writer.stop()
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_partitions({topic: NewPartitions(total_count=3 * PARTITIONS)})
    finally:
        await admin.close()
    restarted = Writer(_config(bootstrap, topic, transactional_id))

    with pytest.raises(TopicRepartitioned, match=r"partitions were added"):
        await restarted.start()

    assert restarted.state is WriterState.STARTING


@pytest.mark.parametrize(
    "config",
    [
        {"retention.ms": "604800000"},
        {"cleanup.policy": "compact"},
        {"retention.bytes": "1073741824"},
    ],
)
async def test_the_writer_refuses_a_topic_that_would_lose_history(
    bootstrap: str,
    transactional_id: str,
    config: dict[str, str],
) -> None:
    topic = f"test.lossy.{uuid.uuid4().hex[:12]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, num_partitions=2, replication_factor=1, topic_configs=config)]
        )
    finally:
        await admin.close()
    with pytest.raises(TopicWouldLoseHistory, match="ORDERS_ALLOW_DELETING_TOPIC"):
        await Writer(_config(bootstrap, topic, transactional_id)).start()
    overridden = Writer(
        WriterConfig(
            kafka=bootstrap,
            topic=topic,
            transactional_id=transactional_id,
            allow_deleting_topic=True,
        )
    )
    await overridden.start()
    await overridden.stop()
    assert overridden.partition_count == 2
