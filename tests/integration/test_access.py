"""Who may call what (design.md 9): every route but health and schema needs a token, every
scope of the table allows its routes and nothing else, and a customer sees and touches only
its own orders, never learning that another customer's exist. Over the real app, writer,
broker, projector and database."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import date, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from service.edge.http.app import Resources, create_app
from service.edge.http.auth import Access
from service.edge.http.limits import TokenBuckets
from service.kernel.access import Scope
from service.write.writer import Writer
from tests.support.http import serve
from tests.support.identity import access, token
from tests.support.projection_harness import running

ALL_PROJECTIONS = ["orders", "order_history", "customer_summary", "daily_sales"]
CONSISTENT = 15_000  # ms a query with a token may wait for the projector


@pytest.fixture
async def app(writer: Writer, db: AsyncEngine, topic: str, bootstrap: str) -> Any:
    return create_app(
        Resources(
            writer=writer,
            engine=db,
            topic=topic,
            partitions=4,
            consistency_wait_ms=CONSISTENT,
            kafka_bootstrap=bootstrap,
        ),
        access=access(),
    )


@pytest.fixture
async def projector(
    db: AsyncEngine, bootstrap: str, topic: str, group_prefix: str
) -> AsyncIterator[None]:
    async with running(db, bootstrap, topic, group_prefix, ALL_PROJECTIONS):
        yield


def _as(app: Any, sub: str, scopes: str) -> httpx.AsyncClient:
    return serve(app, token=token(sub, scopes))


def _customer(app: Any, sub: str) -> httpx.AsyncClient:
    return _as(app, sub, "orders:read orders:write")


async def _create(client: httpx.AsyncClient, customer_id: str, **headers: str) -> httpx.Response:
    return await client.post(
        "/orders", json={"customer_id": customer_id, "currency": "EUR"}, headers=headers
    )


async def _created(client: httpx.AsyncClient, customer_id: str) -> tuple[str, str]:
    """A new order of ``customer_id``: its id and consistency token."""
    response = await _create(client, customer_id)
    assert response.status_code == 201, response.text
    return response.json()["order_id"], response.headers["x-consistency-token"]


# -- authentication -----------------------------------------------------------------------------


def _every_operation(app: Any) -> list[tuple[str, str, bool]]:
    """(method, path with placeholders filled, public?) of every operation the app documents."""
    operations = []
    for path, item in app.openapi_schema.to_schema()["paths"].items():
        concrete = path.replace("{order_id}", "o-1").replace("{sku}", "S-1")
        concrete = concrete.replace("{customer_id}", "c-9").replace("{name}", "orders")
        for method, operation in item.items():
            operations.append((method.upper(), concrete, operation.get("security") == [{}]))
    return operations


async def test_no_route_but_health_and_schema_answers_without_a_token(app: Any) -> None:
    operations = _every_operation(app)
    assert len(operations) >= 16
    async with serve(app, token=None, raw=True) as anonymous:
        for method, path, public in operations:
            response = await anonymous.request(method, path)
            if public:
                assert response.status_code == 200, (method, path, response.text)
                continue
            assert response.status_code == 401, (method, path, response.text)
            assert response.headers["www-authenticate"] == 'Bearer realm="orders"'
            assert response.headers["content-type"].startswith("application/problem+json")
        assert (await anonymous.get("/schema/openapi.json")).status_code == 200
        assert set(path for _, path, public in operations if public) == {
            "/health",
            "/health/ready",
            "/schema/asyncapi.json",  # the event contract, as /schema/openapi.json
        }


@pytest.mark.parametrize(
    "authorization",
    ["Bearer", "Bearer not.a.token", "Basic dXNlcjpwYXNz", "Bearer a b", "bearer\tx"],
)
async def test_a_malformed_or_invalid_token_is_401_invalid_token(
    app: Any, authorization: str
) -> None:
    async with serve(app, token=None) as client:
        response = await client.get("/orders", headers={"Authorization": authorization})
    assert response.status_code == 401, response.text
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="orders", error="invalid_token"'), challenge
    assert response.json()["type"].endswith("/unauthenticated")


async def test_an_expired_token_is_401_saying_so(app: Any) -> None:
    expired = token("back-office", "orders:read:any", ttl=timedelta(minutes=-5))
    async with serve(app, token=expired) as client:
        response = await client.get("/orders")
    assert response.status_code == 401
    assert "expired" in response.headers["www-authenticate"]


# -- the scope table ------------------------------------------------------------------------------

# (method, path, body, the scopes any one of which lets the route run), for a caller "c-9"
# acting on an order of its own.
ROUTES: list[tuple[str, str, dict[str, Any] | None, set[Scope]]] = [
    (
        "POST",
        "/orders",
        {"customer_id": "c-9", "currency": "EUR"},
        {Scope.ORDERS_WRITE, Scope.ORDERS_WRITE_ANY},
    ),
    (
        "POST",
        "/orders/{id}/items",
        {"sku": "S-2", "name": "Mug", "quantity": 1, "unit_price": 100},
        {Scope.ORDERS_WRITE, Scope.ORDERS_WRITE_ANY},
    ),
    (
        "PATCH",
        "/orders/{id}/items/S-1",
        {"quantity": 2},
        {Scope.ORDERS_WRITE, Scope.ORDERS_WRITE_ANY},
    ),
    ("DELETE", "/orders/{id}/items/S-1", None, {Scope.ORDERS_WRITE, Scope.ORDERS_WRITE_ANY}),
    ("POST", "/orders/{id}/place", None, {Scope.ORDERS_WRITE, Scope.ORDERS_WRITE_ANY}),
    (
        "POST",
        "/orders/{id}/cancel",
        {"reason": "changed my mind"},
        {Scope.ORDERS_WRITE, Scope.ORDERS_WRITE_ANY},
    ),
    (
        "PUT",
        "/orders/{id}/shipping-address",
        {"name": "N", "lines": ["1 Main St"], "city": "C", "postal_code": "1", "country": "DE"},
        {Scope.ORDERS_WRITE, Scope.ORDERS_WRITE_ANY},
    ),
    (
        "POST",
        "/orders/{id}/pay",
        {"amount": 100, "currency": "EUR", "payment_reference": "psp-1"},
        {Scope.PAYMENTS_WRITE},
    ),
    (
        "POST",
        "/orders/{id}/ship",
        {"carrier": "DHL", "tracking_number": "T1"},
        {Scope.FULFILMENT_WRITE},
    ),
    ("POST", "/orders/{id}/deliver", None, {Scope.FULFILMENT_WRITE}),
    ("GET", "/orders?customer_id=c-9", None, {Scope.ORDERS_READ, Scope.ORDERS_READ_ANY}),
    ("GET", "/orders", None, {Scope.ORDERS_READ_ANY}),
    ("GET", "/orders/{id}", None, {Scope.ORDERS_READ, Scope.ORDERS_READ_ANY}),
    ("GET", "/orders/{id}/history", None, {Scope.ORDERS_READ, Scope.ORDERS_READ_ANY}),
    ("GET", "/customers/c-9/summary", None, {Scope.ORDERS_READ, Scope.ORDERS_READ_ANY}),
    (
        "GET",
        f"/reports/daily-sales?from={date.today()}&to={date.today()}",
        None,
        {Scope.REPORTS_READ},
    ),
    ("GET", "/ops/projections", None, {Scope.OPS_READ}),
    ("GET", "/ops/projections/parked", None, {Scope.OPS_READ}),
    ("POST", "/ops/projections/orders/park", {"partition": 0, "offset": 0}, {Scope.OPS_WRITE}),
    ("POST", "/ops/projections/orders/retry", {}, {Scope.OPS_WRITE}),
    ("POST", "/ops/projections/orders/skip", {"partition": 0, "offset": 0}, {Scope.OPS_WRITE}),
]


def _route_id(route: tuple[str, str, Any, Any]) -> str:
    return f"{route[0]} {route[1]}"


@pytest.mark.parametrize("route", ROUTES, ids=_route_id)
async def test_each_scope_allows_its_routes_and_every_other_scope_is_403(
    app: Any, route: tuple[str, str, dict[str, Any] | None, set[Scope]]
) -> None:
    method, template, body, allowed = route
    async with serve(app) as back_office:
        order_id, _ = await _created(back_office, "c-9")
        added = await back_office.post(
            f"/orders/{order_id}/items",
            json={"sku": "S-1", "name": "Cup", "quantity": 1, "unit_price": 100},
        )
        assert added.status_code == 200, added.text
    path = template.replace("{id}", order_id)
    headers = {"Idempotency-Key": str(uuid.uuid4())}
    for scope in Scope:
        async with _as(app, "c-9", scope.value) as client:
            response = await client.request(method, path, json=body, headers=headers)
        if scope in allowed:
            # Allowed: whatever the order's state makes of it, never a refusal of access.
            assert response.status_code not in (401, 403), (scope, response.text)
        else:
            assert response.status_code == 403, (scope, response.status_code, response.text)
            problem = response.json()
            assert problem["type"].endswith("/insufficient-scope")
            assert set(problem["required_scopes"]) <= {s.value for s in Scope}
            assert 'error="insufficient_scope"' in response.headers["www-authenticate"]


async def test_a_customer_creates_orders_only_for_itself(app: Any) -> None:
    async with _customer(app, "c-1") as customer:
        mine = await _create(customer, "c-1")
        theirs = await _create(customer, "c-2")
    assert mine.status_code == 201, mine.text
    assert theirs.status_code == 403, theirs.text
    assert theirs.json()["required_scopes"] == [Scope.ORDERS_WRITE_ANY]


async def test_a_customer_never_marks_its_own_order_paid(app: Any) -> None:
    async with _customer(app, "c-1") as customer:
        order_id, _ = await _created(customer, "c-1")
        paid = await customer.post(
            f"/orders/{order_id}/pay",
            json={"amount": 0, "currency": "EUR", "payment_reference": "free"},
        )
    assert paid.status_code == 403


# -- customer isolation ---------------------------------------------------------------------------


@pytest.mark.usefixtures("projector")
async def test_another_customers_order_is_not_found_on_every_route(app: Any) -> None:
    async with _customer(app, "alice") as alice, _customer(app, "mallory") as mallory:
        order_id, consistency = await _created(alice, "alice")
        waited = {"X-Consistency-Token": consistency}
        for path in (f"/orders/{order_id}", f"/orders/{order_id}/history"):
            assert (await alice.get(path, headers=waited)).status_code == 200
            theirs = await mallory.get(path, headers=waited)
            assert theirs.status_code == 404, (path, theirs.text)
        # Alice's summary exists; for Mallory it is as missing as a customer never seen.
        summary = "/customers/alice/summary"
        assert (await alice.get(summary, headers=waited)).status_code == 200
        assert (await mallory.get(summary, headers=waited)).status_code == 404
        assert (await mallory.get("/customers/nobody/summary")).status_code == 404
        # Her list is hers to read; Mallory cannot list it, nor everyone's.
        assert (await mallory.get("/orders?customer_id=alice")).status_code == 403
        assert (await mallory.get("/orders")).status_code == 403


@pytest.mark.usefixtures("projector")
async def test_another_customers_order_cannot_be_changed_and_looks_missing(
    app: Any, writer: Writer
) -> None:
    async with _customer(app, "alice") as alice, _customer(app, "mallory") as mallory:
        order_id, _ = await _created(alice, "alice")
        item = {"sku": "S-1", "name": "Cup", "quantity": 1, "unit_price": 100}
        assert (await alice.post(f"/orders/{order_id}/items", json=item)).status_code == 200
        unknown = uuid.uuid4()
        missing = await mallory.post(f"/orders/{unknown}/place")
        # With If-Match: what a missing order answers (412, at version 0), never the real
        # version of the order.
        missing_at = await mallory.post(f"/orders/{unknown}/place", headers={"If-Match": '"7"'})
        theirs_at = await mallory.post(f"/orders/{order_id}/place", headers={"If-Match": '"7"'})
        assert missing_at.status_code == theirs_at.status_code == 412
        assert theirs_at.headers["etag"] == missing_at.headers["etag"] == '"0"'
        assert theirs_at.json()["current_version"] == 0
        attempts = [
            await mallory.post(f"/orders/{order_id}/items", json={**item, "sku": "S-2"}),
            await mallory.patch(f"/orders/{order_id}/items/S-1", json={"quantity": 5}),
            await mallory.delete(f"/orders/{order_id}/items/S-1"),
            await mallory.post(f"/orders/{order_id}/place"),
            await mallory.post(f"/orders/{order_id}/cancel", json={"reason": "mine now"}),
        ]
        assert missing.status_code == 404
        for attempt in attempts:
            assert attempt.status_code == 404, attempt.text
            assert attempt.json()["type"] == missing.json()["type"]
            assert attempt.json()["detail"] == f"order {order_id!r} does not exist"
        # Nothing of Mallory's reached the order: created, one item added.
        assert writer.orders[order_id].version == 2


@pytest.mark.usefixtures("projector")
async def test_a_keyset_cursor_of_another_customer_lists_only_the_callers_orders(
    app: Any,
) -> None:
    async with _customer(app, "alice") as alice, _customer(app, "bob") as bob:
        for _ in range(3):
            await _created(alice, "alice")
        _, last = await _created(bob, "bob")
        waited = {"X-Consistency-Token": last}
        page = await alice.get("/orders?customer_id=alice&limit=1", headers=waited)
        assert page.status_code == 200, page.text
        alices_cursor = page.json()["next_cursor"]
        assert alices_cursor is not None
        # Bob replays Alice's cursor (or forges one) with his own filter: his orders only.
        listed = await bob.get(f"/orders?customer_id=bob&limit=50&cursor={alices_cursor}")
        assert listed.status_code == 200, listed.text
        assert {o["customer_id"] for o in listed.json()["items"]} <= {"bob"}
        without_filter = await bob.get(f"/orders?cursor={alices_cursor}")
        assert without_filter.status_code == 403


# -- the caller recorded, idempotency keys per caller ---------------------------------------------


@pytest.mark.usefixtures("projector")
async def test_the_history_shows_who_did_what(app: Any) -> None:
    async with (
        serve(app, token=token("c-5", "orders:read orders:write", client_id="web-shop")) as shop,
        _as(app, "psp", "payments:write") as payments,
    ):
        order_id, _ = await _created(shop, "c-5")
        item = {"sku": "S-1", "name": "Cup", "quantity": 1, "unit_price": 100}
        assert (await shop.post(f"/orders/{order_id}/items", json=item)).status_code == 200
        assert (await shop.post(f"/orders/{order_id}/place")).status_code == 200
        paid = await payments.post(
            f"/orders/{order_id}/pay",
            json={"amount": 100, "currency": "EUR", "payment_reference": "psp-1"},
        )
        assert paid.status_code == 200, paid.text
        history = await shop.get(
            f"/orders/{order_id}/history",
            headers={"X-Consistency-Token": paid.headers["x-consistency-token"]},
        )
    assert history.status_code == 200, history.text
    body = history.json()
    entries = body["items"] if isinstance(body, dict) else body
    actors = [(entry["type"], entry["actor"]) for entry in entries]
    assert actors == [
        ("OrderCreated", {"sub": "c-5", "client_id": "web-shop"}),
        ("ItemAdded", {"sub": "c-5", "client_id": "web-shop"}),
        ("OrderPlaced", {"sub": "c-5", "client_id": "web-shop"}),
        ("OrderPaid", {"sub": "psp", "client_id": None}),
    ]


async def test_two_callers_may_use_the_same_idempotency_key(app: Any) -> None:
    key = {"Idempotency-Key": "checkout-1"}
    async with _customer(app, "c-1") as first, _customer(app, "c-2") as second:
        one = await _create(first, "c-1", **key)
        other = await _create(second, "c-2", **key)
        again = await _create(first, "c-1", **key)
    assert one.status_code == other.status_code == 201, (one.text, other.text)
    assert one.json()["order_id"] != other.json()["order_id"]
    assert again.json()["order_id"] == one.json()["order_id"]
    assert again.headers["idempotent-replayed"] == "true"


async def test_a_create_without_an_idempotency_key_is_400(app: Any) -> None:
    async with serve(app, raw=True) as client:
        response = await client.post("/orders", json={"customer_id": "c-1", "currency": "EUR"})
    assert response.status_code == 400, response.text
    assert "Idempotency-Key" in response.text


async def test_the_same_key_with_another_if_match_is_another_request(app: Any) -> None:
    async with serve(app) as client:
        order_id, _ = await _created(client, "c-1")
        item = {"sku": "S-1", "name": "Cup", "quantity": 1, "unit_price": 100}
        key = {"Idempotency-Key": f"add-{order_id}"}
        first = await client.post(
            f"/orders/{order_id}/items", json=item, headers={**key, "If-Match": '"1"'}
        )
        assert first.status_code == 200, first.text
        replayed = await client.post(
            f"/orders/{order_id}/items", json=item, headers={**key, "If-Match": '"1"'}
        )
        assert replayed.headers.get("idempotent-replayed") == "true"
        other = await client.post(
            f"/orders/{order_id}/items", json=item, headers={**key, "If-Match": '"2"'}
        )
    assert other.status_code == 422, other.text
    assert other.json()["type"].endswith("/idempotency-key-reused")


# -- rate limits, and authentication off ----------------------------------------------------------


async def test_a_burst_past_the_callers_rate_limit_is_429_with_retry_after(
    writer: Writer, db: AsyncEngine, topic: str
) -> None:
    limited = access(rate_limit=TokenBuckets(rate=0.5, burst=5))
    app = create_app(Resources(writer=writer, engine=db, topic=topic), access=limited)
    async with (
        _as(app, "greedy", "reports:read") as greedy,
        _as(app, "patient", "reports:read") as patient,
    ):
        path = f"/reports/daily-sales?from={date.today()}&to={date.today()}"
        statuses = [(await greedy.get(path)).status_code for _ in range(8)]
        assert statuses == [200] * 5 + [429] * 3
        refused = await greedy.get(path)
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["type"].endswith("/rate-limited")
        # Another caller has its own bucket.
        assert (await patient.get(path)).status_code == 200
        # Health is not rate limited.
        for _ in range(10):
            assert (await greedy.get("/health")).status_code == 200


async def test_with_authentication_off_anyone_may_call_and_health_says_so(
    writer: Writer, db: AsyncEngine, topic: str
) -> None:
    app = create_app(Resources(writer=writer, engine=db, topic=topic), access=Access(None))
    async with serve(app, token=None) as anonymous:
        health = await anonymous.get("/health")
        created = await _create(anonymous, "c-1")
    assert health.json()["auth"] == "off"
    assert created.status_code == 201, created.text
    async with serve(create_app(Resources(writer=writer), access=access()), token=None) as on:
        assert (await on.get("/health")).json()["auth"] == "on"


def test_the_route_table_covers_every_operation_the_app_has(app: Any) -> None:
    documented = {(m, p.split("?")[0]) for m, p, public in _every_operation(app) if not public}
    tested = {(m, p.split("?")[0].replace("{id}", "o-1")) for m, p, _, _ in ROUTES}
    assert documented - tested <= {("OPTIONS", p) for _, p in documented}, documented - tested


def test_the_schema_documents_the_scopes_each_route_accepts(app: Any) -> None:
    paths = app.openapi_schema.to_schema()["paths"]
    for method, template, _, allowed in ROUTES:
        if template == "/orders" and method == "GET":
            continue  # documented with ?customer_id (orders:read), its own row above
        path = template.split("?")[0].replace("{id}", "{order_id}").replace("S-1", "{sku}")
        path = path.replace("c-9", "{customer_id}").replace("/orders/orders/", "/orders/{name}/")
        path = path.replace("/projections/orders/", "/projections/{name}/")
        security = paths[path][method.lower()]["security"]
        documented = {scope for requirement in security for scope in requirement["bearer"]}
        assert documented == {scope.value for scope in allowed}, (method, path, security)


async def test_the_schema_can_be_kept_behind_a_token(writer: Writer) -> None:
    private = Access(access().verifier, public_schema=False)
    app = create_app(Resources(writer=writer), access=private)
    async with serve(app, token=None) as anonymous:
        assert (await anonymous.get("/schema/openapi.json")).status_code == 401
        assert (await anonymous.get("/health")).status_code == 200
    async with serve(app) as client:
        assert (await client.get("/schema/openapi.json")).status_code == 200
