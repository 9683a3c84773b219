"""Hostile and malformed requests against the served service: each one is refused with the right
4xx as an RFC 9457 problem, and none of them changes an order.

The service runs as `orders api` + `orders projector` run it (real uvicorn on 127.0.0.1, writer on
the real broker, queries on the real Postgres), with its body limit taken from
ORDERS_MAX_BODY_BYTES, so what is tested is what is served.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from service.edge.http.app import Resources, create_app
from service.kernel import domain
from service.kernel.settings import Settings
from tests.support.http import client as http_client
from tests.support.http import serve
from tests.support.identity import access
from tests.support.served import Service, served, service_settings

BODY_LIMIT = 4096
ITEM = {"sku": "MUG-1", "name": "Mug", "quantity": 2, "unit_price": 1250}
INT64_MAX = 2**63 - 1
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def service(bootstrap: str, database_url: str) -> Iterator[Service]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ORDERS_MAX_BODY_BYTES", str(BODY_LIMIT))
        configured = Settings.from_env()
    settings = service_settings(
        bootstrap, database_url, max_body_bytes=configured.max_body_bytes, consistency_wait_ms=200
    )
    with served(settings) as running:
        yield running


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[httpx.Client]:
    with http_client(service.base_url) as client:
        yield client


def create_draft(client: httpx.Client) -> str:
    """A draft order with one item (2 x 12.50 EUR), at version 2."""
    created = client.post("/orders", json={"customer_id": "c-bad-input", "currency": "EUR"})
    assert created.status_code == 201, created.text
    order_id: str = created.json()["order_id"]
    added = client.post(f"/orders/{order_id}/items", json=ITEM)
    assert added.status_code == 200, added.text
    return order_id


# The tests share these orders: each test refuses requests and then checks that the order is
# still at its version, so a request that wrongly got through fails the test that sent it.
@pytest.fixture(scope="module")
def draft(client: httpx.Client) -> str:
    """A draft order at version 2, for requests that must all be refused."""
    return create_draft(client)


@pytest.fixture(scope="module")
def placed(client: httpx.Client) -> str:
    """A placed order at version 3 (total 25.00 EUR), for payments that must be refused."""
    order_id = create_draft(client)
    assert client.post(f"/orders/{order_id}/place").status_code == 200
    return order_id


def assert_problem(
    response: httpx.Response, status: int, code: str | None = None
) -> dict[str, Any]:
    """``response`` is an RFC 9457 problem with this status (and type, when given)."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/problem+json"), response
    body: dict[str, Any] = response.json()
    assert isinstance(body["type"], str), body
    assert isinstance(body["title"], str), body
    assert isinstance(body["detail"], str), body
    assert body["status"] == status, body
    if code is not None:
        assert body["type"].endswith("/" + code), body
    return body


def version_of(client: httpx.Client, order_id: str) -> int:
    """The writer's current version of an order, read without changing it (a 412 tells it)."""
    response = client.post(f"/orders/{order_id}/place", headers={"If-Match": '"999999"'})
    version: int = assert_problem(response, 412, "version-mismatch")["current_version"]
    return version


def post_raw(client: httpx.Client, path: str, body: bytes, **headers: str) -> httpx.Response:
    return client.post(path, content=body, headers={**JSON, **headers})


# -- 413: the configured body limit, as served --------------------------------------------------


def padded_create_body(size: int) -> bytes:
    """A valid create-order body of exactly ``size`` bytes (JSON allows trailing whitespace)."""
    body = json.dumps({"customer_id": "c-big", "currency": "EUR"}).encode()
    return body + b" " * (size - len(body))


def test_the_body_limit_comes_from_orders_max_body_bytes(service: Service) -> None:
    assert service.settings.max_body_bytes == BODY_LIMIT


def test_a_body_at_the_limit_is_taken_and_one_byte_more_is_413(client: httpx.Client) -> None:
    at_limit = post_raw(client, "/orders", padded_create_body(BODY_LIMIT))
    over = post_raw(client, "/orders", padded_create_body(BODY_LIMIT + 1))

    assert at_limit.status_code == 201, at_limit.text
    assert_problem(over, 413, "body-too-large")


def test_a_chunked_body_over_the_limit_is_413_without_a_content_length(
    client: httpx.Client,
) -> None:
    def chunks() -> Iterator[bytes]:
        body = padded_create_body(BODY_LIMIT * 4)
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]

    response = client.post("/orders", content=chunks(), headers=JSON)

    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert_problem(response, 413, "body-too-large")


@pytest.mark.parametrize("path", ["items", "pay", "ship", "cancel"])
def test_every_command_with_a_body_refuses_an_oversized_one(
    client: httpx.Client, draft: str, path: str
) -> None:
    huge = json.dumps({"reason": "x" * BODY_LIMIT}).encode()

    assert_problem(post_raw(client, f"/orders/{draft}/{path}", huge), 413, "body-too-large")
    assert version_of(client, draft) == 2


# -- 400: malformed JSON ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"{not json",
        b"{'customer_id': 'c', 'currency': 'EUR'}",
        b'{"customer_id": "c", "currency": "EUR"} trailing',
        b'{"customer_id": "c", "currency": "EUR",}',
        b"\xff\xfe{}",
        b'{"customer_id": "c\xff", "currency": "EUR"}',
        b'{"customer_id": "\\ud800", "currency": "EUR"}',
        b"null",
        b"[]",
        b'"an order"',
        b"[" * 2000 + b"]" * 2000,
    ],
)
def test_malformed_json_is_400(client: httpx.Client, body: bytes) -> None:
    assert_problem(post_raw(client, "/orders", body), 400, "invalid-request")


def test_malformed_json_changes_nothing(client: httpx.Client, draft: str) -> None:
    for path in ("items", "pay", "ship", "cancel"):
        assert_problem(post_raw(client, f"/orders/{draft}/{path}", b"{"), 400)
    response = client.patch(f"/orders/{draft}/items/MUG-1", content=b"{", headers=JSON)
    assert_problem(response, 400)

    assert version_of(client, draft) == 2


# -- 400: unknown and missing fields, wrong types ---------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/orders", {"customer_id": "c", "currency": "EUR", "total": 0}),
        ("items", {**ITEM, "sku": "TEA-1", "discount": 100}),
        ("pay", {"amount": 2500, "currency": "EUR", "payment_reference": "p", "status": "paid"}),
        ("cancel", {"reason": "r", "refund": 0}),
        ("/orders", {"customer_id": "c"}),
        ("items", {"sku": "TEA-1", "name": "Tea", "quantity": 1}),
        ("/orders", {"customer_id": ["c"], "currency": "EUR"}),
        ("items", {**ITEM, "sku": "TEA-1", "name": None}),
        ("ship", {"carrier": {"name": "DHL"}, "tracking_number": "1"}),
        # Python's "$" also matches before a final newline: an id must still end there.
        ("/orders", {"customer_id": "c\n", "currency": "EUR"}),
        ("items", {**ITEM, "sku": "TEA-1\n"}),
    ],
)
def test_unknown_missing_or_mistyped_fields_are_400(
    client: httpx.Client, draft: str, path: str, body: dict[str, Any]
) -> None:
    url = path if path.startswith("/") else f"/orders/{draft}/{path}"

    assert_problem(client.post(url, json=body), 400, "invalid-request")
    assert version_of(client, draft) == 2


# -- 400: numbers out of range ----------------------------------------------------------------


@pytest.mark.parametrize(
    "quantity",
    [0, -1, domain.MAX_QUANTITY + 1, INT64_MAX, INT64_MAX + 1, 2**64 + 1, -(2**63) - 1, 10**40],
)
def test_a_quantity_out_of_range_is_400(client: httpx.Client, draft: str, quantity: int) -> None:
    added = client.post(
        f"/orders/{draft}/items", json={**ITEM, "sku": "TEA-1", "quantity": quantity}
    )
    changed = client.patch(f"/orders/{draft}/items/MUG-1", json={"quantity": quantity})

    assert_problem(added, 400, "invalid-request")
    assert_problem(changed, 400, "invalid-request")
    assert version_of(client, draft) == 2


@pytest.mark.parametrize(
    "raw", [b"1.5", b"2.0", b"1e3", b"1e400", b"-0.0", b"NaN", b"Infinity", b'"2"', b"true"]
)
def test_a_quantity_that_is_not_an_integer_is_400(
    client: httpx.Client, draft: str, raw: bytes
) -> None:
    body = b'{"sku": "TEA-1", "name": "Tea", "quantity": ' + raw + b', "unit_price": 1}'

    assert_problem(post_raw(client, f"/orders/{draft}/items", body), 400, "invalid-request")
    assert version_of(client, draft) == 2


@pytest.mark.parametrize("unit_price", [-1, domain.MAX_UNIT_PRICE + 1, INT64_MAX + 1, 10**40])
def test_a_unit_price_out_of_range_is_400(
    client: httpx.Client, draft: str, unit_price: int
) -> None:
    item = {**ITEM, "sku": "TEA-1", "unit_price": unit_price}

    assert_problem(client.post(f"/orders/{draft}/items", json=item), 400, "invalid-request")
    assert version_of(client, draft) == 2


@pytest.mark.parametrize("amount", [-1, domain.MAX_ORDER_TOTAL + 1, INT64_MAX + 1, 10**40])
def test_a_payment_amount_out_of_range_is_400(
    client: httpx.Client, placed: str, amount: int
) -> None:
    payment = {"amount": amount, "currency": "EUR", "payment_reference": "psp-1"}

    assert_problem(client.post(f"/orders/{placed}/pay", json=payment), 400, "invalid-request")
    assert version_of(client, placed) == 3


def test_the_largest_allowed_values_are_taken(client: httpx.Client) -> None:
    created = client.post("/orders", json={"customer_id": "c-max", "currency": "JPY"})
    order_id = created.json()["order_id"]
    item = {
        "sku": "GOLD",
        "name": "x" * 200,
        "quantity": domain.MAX_QUANTITY,
        "unit_price": domain.MAX_UNIT_PRICE,
    }

    added = client.post(f"/orders/{order_id}/items", json=item)

    assert added.status_code == 200, added.text


# -- 400: currencies ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "currency", ["eur", "EURO", "EU", "", " EUR", "XYZ", "XXX", "XTS", "XAU", 978, None]
)
def test_a_wrong_or_unknown_currency_is_400(
    client: httpx.Client, placed: str, currency: Any
) -> None:
    created = client.post("/orders", json={"customer_id": "c", "currency": currency})
    payment = {"amount": 2500, "currency": currency, "payment_reference": "psp-1"}
    paid = client.post(f"/orders/{placed}/pay", json=payment)

    assert_problem(created, 400, "invalid-request")
    assert_problem(paid, 400, "invalid-request")
    assert version_of(client, placed) == 3


def test_paying_in_another_known_currency_is_a_422_payment_mismatch(
    client: httpx.Client, placed: str
) -> None:
    payment = {"amount": 2500, "currency": "USD", "payment_reference": "psp-1"}

    response = client.post(f"/orders/{placed}/pay", json=payment)

    assert_problem(response, 422, "payment-mismatch")
    assert version_of(client, placed) == 3


# -- 404, 405 -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/nope"),
        ("GET", "/orders/o-1/nope"),
        ("POST", "/orders/o-1/place/now"),
        ("DELETE", "/orders/o-1/items/A/B"),
        ("GET", "/customers"),
        ("GET", "/reports"),
        ("GET", "/reports/weekly-sales"),
        ("POST", "/order"),
    ],
)
def test_an_unknown_route_is_404(client: httpx.Client, method: str, path: str) -> None:
    assert_problem(client.request(method, path), 404, "not-found")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/orders"),
        ("DELETE", "/orders"),
        ("PATCH", "/orders/o-1"),
        ("DELETE", "/orders/o-1"),
        ("GET", "/orders/o-1/place"),
        ("PUT", "/orders/o-1/items/MUG-1"),
        ("POST", "/orders/o-1/history"),
        ("POST", "/customers/c-1/summary"),
        ("POST", "/reports/daily-sales"),
        ("POST", "/health"),
    ],
)
def test_a_wrong_method_is_405(client: httpx.Client, method: str, path: str) -> None:
    response = client.request(method, path)
    assert_problem(response, 405, "method-not-allowed")
    allowed = {m.strip() for m in response.headers["allow"].split(",")}  # RFC 9110 15.5.6
    assert method not in allowed
    assert allowed - {"OPTIONS"}, "the route allows some method"


# -- 415: the body must be declared JSON --------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/xml",
        "application/jsonp",
        "json",
    ],
)
def test_a_body_not_declared_json_is_415(
    client: httpx.Client, draft: str, content_type: str | None
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    body = json.dumps({**ITEM, "sku": "TEA-1"}).encode()

    created = client.post(
        "/orders", content=b'{"customer_id":"c","currency":"EUR"}', headers=headers
    )
    added = client.post(f"/orders/{draft}/items", content=body, headers=headers)

    assert_problem(created, 415, "unsupported-media-type")
    assert_problem(added, 415, "unsupported-media-type")
    assert version_of(client, draft) == 2


@pytest.mark.parametrize(
    "content_type",
    ["application/json; charset=utf-8", "Application/JSON", "application/vnd.orders+json"],
)
def test_json_with_parameters_or_a_json_suffix_is_taken(
    client: httpx.Client, content_type: str
) -> None:
    body = b'{"customer_id": "c", "currency": "EUR"}'

    response = client.post("/orders", content=body, headers={"content-type": content_type})

    assert response.status_code == 201, response.text


# -- 400: headers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "if_match",
    [
        "banana",
        "*",
        '"1", "2"',
        '""',
        '"-1"',
        '"1.5"',
        'W/"x"',
        '"1234567890123456789"',
        "0x2",
        '"2',
        '2"',
        'W/"2',
    ],
)
def test_a_malformed_if_match_is_400(client: httpx.Client, draft: str, if_match: str) -> None:
    response = client.post(
        f"/orders/{draft}/items", json={**ITEM, "sku": "TEA-1"}, headers={"If-Match": if_match}
    )

    assert_problem(response, 400, "invalid-request")
    assert version_of(client, draft) == 2


@pytest.mark.parametrize("if_match", ['"2"', 'W/"2"', "2"])
def test_a_version_in_any_entity_tag_form_is_understood(
    client: httpx.Client, if_match: str
) -> None:
    order_id = create_draft(client)
    response = client.post(
        f"/orders/{order_id}/items", json={**ITEM, "sku": "TEA-1"}, headers={"If-Match": if_match}
    )

    assert response.status_code == 200, response.text
    assert response.headers["etag"] == '"3"'


@pytest.mark.parametrize("header", ["Idempotency-Key", "X-Correlation-Id"])
@pytest.mark.parametrize(
    "value", [b"", b"two words", b"k" * 129, b"caf\xe9", b"tab\there", b"\xff\xfe"]
)
def test_a_malformed_idempotency_key_or_correlation_id_is_400(
    client: httpx.Client, draft: str, header: str, value: bytes
) -> None:
    response = client.post(f"/orders/{draft}/place", headers={header.encode(): value})

    assert_problem(response, 400, "invalid-request")
    assert version_of(client, draft) == 2


@pytest.mark.parametrize("token", ["banana", "0", "0:", ":1", "-1:0", "0:-1", "1:2:3", "0:1e3"])
def test_a_malformed_consistency_token_is_400(client: httpx.Client, token: str) -> None:
    for path in ("/orders", "/orders/o-1", "/orders/o-1/history", "/customers/c-1/summary"):
        assert_problem(client.get(path, headers={"X-Consistency-Token": token}), 400)


# -- 400: paths and query strings -------------------------------------------------------------


@pytest.mark.parametrize(
    "segment",
    ["%00", "a%00b", "a%20b", "%C3%A9", "%FF", "a" * 65, "a;b", "a%0Ab", "a%0A", "a,b"],
)
def test_an_id_that_cannot_be_one_is_400(client: httpx.Client, segment: str) -> None:
    for method, path in [
        ("GET", f"/orders/{segment}"),
        ("GET", f"/orders/{segment}/history"),
        ("GET", f"/customers/{segment}/summary"),
        ("POST", f"/orders/{segment}/place"),
        ("DELETE", f"/orders/o-1/items/{segment}"),
    ]:
        assert_problem(client.request(method, path), 400, "invalid-request")


def cursor_of(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=201",
        "limit=-1",
        "limit=abc",
        f"limit={2**64}",
        "limit=1.5",
        "status=bogus",
        "created_from=yesterday",
        "created_from=2025-01-01T00:00:00",
        "created_from=2025-02-01T00:00:00Z&created_to=2025-01-01T00:00:00Z",
        "customer_id=",
        "customer_id=a%00b",
        "customer_id=" + "c" * 65,
        "cursor=!!!",
        "cursor=" + cursor_of(b"not json"),
        "cursor=" + cursor_of(b'["2025-01-01T00:00:00Z", "a\\u0000b"]'),
        "cursor=" + cursor_of(b'["2025-01-01T00:00:00", "o-1"]'),
        "cursor=" + cursor_of(b'["yesterday", "o-1"]'),
        "cursor=" + "A" * 257,
    ],
)
def test_a_bad_list_query_is_400(client: httpx.Client, query: str) -> None:
    assert_problem(client.get(f"/orders?{query}"), 400)


@pytest.mark.parametrize(
    "query",
    [
        "",
        "from=2025-01-01",
        "to=2025-01-01",
        "from=2025-13-01&to=2025-12-31",
        "from=2025-02-30&to=2025-03-01",
        "from=2025-02-01&to=2025-01-01",
        "from=2024-01-01&to=2025-01-01",
        "from=0001-01-01&to=9999-12-31",
        "from=today&to=tomorrow",
    ],
)
def test_a_bad_report_query_is_400(client: httpx.Client, query: str) -> None:
    assert_problem(client.get(f"/reports/daily-sales?{query}"), 400)


# -- 503, not 500: the database unreachable ----------------------------------------------------


@pytest.fixture
async def app_without_a_database() -> AsyncIterator[httpx.AsyncClient]:
    """Queries on an engine pointed at a port where nothing listens: Postgres is down."""
    engine = create_async_engine("postgresql+asyncpg://orders@127.0.0.1:9/orders")
    async with serve(create_app(Resources(engine=engine), access=access())) as client:
        yield client
    await engine.dispose()


@pytest.mark.parametrize(
    "path",
    ["/orders", "/orders/o-1", "/orders/o-1/history", "/customers/c-1/summary"],
)
async def test_a_query_while_the_database_is_unreachable_is_503_with_retry_after(
    app_without_a_database: httpx.AsyncClient, path: str
) -> None:
    response = await app_without_a_database.get(path)

    assert_problem(response, 503, "unavailable")
    assert response.headers["retry-after"] == "1"
