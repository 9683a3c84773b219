"""The OpenAPI schema the app serves: every route named, every command body with an example."""

from __future__ import annotations

from typing import Any

from litestar.testing import TestClient
from sqlalchemy.ext.asyncio import create_async_engine

from service.edge.http.app import Resources, create_app
from service.infra.contracts import event_contract
from service.write.contract import WriterConfig
from service.write.writer import Writer
from tests.support.identity import access


def _spec() -> dict[str, Any]:
    # Nothing connects: the writer is never started, the engine never used, Kafka never asked.
    resources = Resources(
        writer=Writer(WriterConfig(kafka="127.0.0.1:1", topic="t")),
        engine=create_async_engine("postgresql+asyncpg://nobody@127.0.0.1:1/none"),
        kafka_bootstrap="127.0.0.1:1",
    )
    spec: dict[str, Any] = create_app(resources, access=access()).openapi_schema.to_schema()
    return spec


def test_every_route_has_an_operation_id() -> None:
    operations = [op for ops in _spec()["paths"].values() for op in ops.values()]
    assert len(operations) >= 21
    assert all(op.get("operationId") for op in operations)


def test_every_command_with_a_body_documents_an_example() -> None:
    with_body = {
        op["operationId"]: op["requestBody"]["content"]["application/json"]
        for ops in _spec()["paths"].values()
        for op in ops.values()
        if "requestBody" in op
    }
    assert set(with_body) == {
        "createOrder",
        "addItem",
        "changeItemQuantity",
        "payOrder",
        "shipOrder",
        "cancelOrder",
        "setShippingAddress",
        "parkHaltedEvent",
        "retryParkedEvents",
        "skipParkedEvent",
    }
    assert all(content["schema"].get("examples") for content in with_body.values())


COMMAND_HEADERS = {"Idempotency-Key", "X-Correlation-Id"}
ACCESS = {"401", "403", "429"}  # every route that needs a token
# operationId -> (path parameters, whether it takes If-Match, problem statuses documented)
COMMANDS = {
    "createOrder": (set(), False, {"400", "413", "415", "422", "503"}),
    "addItem": ({"order_id"}, True, {"400", "404", "409", "412", "413", "415", "422", "503"}),
    "changeItemQuantity": (
        {"order_id", "sku"},
        True,
        {"400", "404", "409", "412", "413", "415", "422", "503"},
    ),
    "removeItem": ({"order_id", "sku"}, True, {"400", "404", "409", "412", "422", "503"}),
    "placeOrder": ({"order_id"}, True, {"400", "404", "409", "412", "422", "503"}),
    "payOrder": ({"order_id"}, True, {"400", "404", "409", "412", "413", "415", "422", "503"}),
    "shipOrder": ({"order_id"}, True, {"400", "404", "409", "412", "413", "415", "422", "503"}),
    "deliverOrder": ({"order_id"}, True, {"400", "404", "409", "412", "422", "503"}),
    "cancelOrder": ({"order_id"}, True, {"400", "404", "409", "412", "413", "415", "422", "503"}),
    "setShippingAddress": (
        {"order_id"},
        True,
        {"400", "404", "409", "412", "413", "415", "422", "503"},
    ),
}


def test_every_command_documents_its_headers_path_parameters_and_problems() -> None:
    operations = {op["operationId"]: op for ops in _spec()["paths"].values() for op in ops.values()}
    for operation_id, (path, if_match, problems) in COMMANDS.items():
        operation = operations[operation_id]
        parameters = {(p["in"], p["name"]) for p in operation["parameters"]}
        headers = COMMAND_HEADERS | ({"If-Match"} if if_match else set())
        assert parameters == {("header", h) for h in headers} | {("path", p) for p in path}, (
            operation_id
        )
        required = {p["name"] for p in operation["parameters"] if p["required"]}
        # Only a create must carry its Idempotency-Key: a retry must not make a second order.
        creates = operation_id == "createOrder"
        assert required - {p for _, p in parameters if p in path} == (
            {"Idempotency-Key"} if creates else set()
        ), operation_id
        documented = {status for status in operation["responses"] if status >= "400"}
        assert documented == problems | ACCESS, operation_id
        for status in problems:
            content = operation["responses"][status]["content"]
            assert set(content) == {"application/problem+json"}, (operation_id, status)


# operationId -> the scope its description names
OPERATOR_ACTIONS = {
    "parkHaltedEvent": "ops:write",
    "retryParkedEvents": "ops:write",
    "skipParkedEvent": "ops:write",
}


def test_every_operator_action_documents_its_scope_path_and_problems() -> None:
    operations = {op["operationId"]: op for ops in _spec()["paths"].values() for op in ops.values()}
    for operation_id, scope in OPERATOR_ACTIONS.items():
        operation = operations[operation_id]
        assert f"`{scope}`" in operation["description"], operation_id
        assert {(p["in"], p["name"]) for p in operation["parameters"]} == {("path", "name")}
        documented = {status for status in operation["responses"] if status >= "400"}
        # 409: the refusals the CLI gives too (not halted there, nothing parked ...).
        assert documented == {"400", "404", "409", "413", "415", "503"} | ACCESS, operation_id
    listing = operations["listParkedEvents"]
    assert "`ops:read`" in listing["description"]
    assert {(p["in"], p["name"]) for p in listing["parameters"]} == {("query", "projection")}


def test_the_history_is_documented_as_pages_of_entries_with_their_actor() -> None:
    spec = _spec()
    operation = spec["paths"]["/orders/{order_id}/history"]["get"]
    schemas = spec["components"]["schemas"]

    query = {p["name"]: p["schema"] for p in operation["parameters"] if p["in"] == "query"}
    assert set(query) == {"limit", "cursor"}
    assert (query["limit"]["minimum"], query["limit"]["maximum"], query["limit"]["default"]) == (
        1,
        200,
        50,
    )
    page = operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert schemas[page.rsplit("/", 1)[-1]]["required"] == ["items", "next_cursor"]
    actor = schemas["HistoryEntry"]["properties"]["actor"]["oneOf"]
    assert {"type": "null"} in actor
    assert schemas["ActorView"]["properties"].keys() == {"sub", "client_id"}


def test_the_asyncapi_document_of_the_topic_is_served_beside_the_openapi_one() -> None:
    resources = Resources(
        writer=Writer(WriterConfig(kafka="127.0.0.1:1", topic="shop.orders")),
        topic="shop.orders",
    )
    with TestClient(create_app(resources, access=access())) as client:
        response = client.get("/schema/asyncapi.json")  # no token: it is public
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/json")
        assert response.json() == event_contract("shop.orders")
        assert client.get("/schema/openapi.json").status_code == 200  # still there
