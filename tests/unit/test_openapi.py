"""The OpenAPI schema the app serves: every route named, every command body with an example."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import create_async_engine

from service.edge.http.app import Resources, create_app
from service.write.contract import WriterConfig
from service.write.writer import Writer


def _spec() -> dict[str, Any]:
    # Nothing connects: the writer is never started and the engine never used.
    resources = Resources(
        writer=Writer(WriterConfig(bootstrap_servers="127.0.0.1:1", topic="t")),
        engine=create_async_engine("postgresql+asyncpg://nobody@127.0.0.1:1/none"),
    )
    spec: dict[str, Any] = create_app(resources).openapi_schema.to_schema()
    return spec


def test_every_route_has_an_operation_id() -> None:
    operations = [op for ops in _spec()["paths"].values() for op in ops.values()]
    assert len(operations) >= 16
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
    }
    assert all(content["schema"].get("examples") for content in with_body.values())


COMMAND_HEADERS = {"Idempotency-Key", "X-Correlation-Id"}
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
        assert all(not p["required"] for p in operation["parameters"] if p["in"] == "header")
        documented = {status for status in operation["responses"] if status >= "400"}
        assert documented == problems, operation_id
        for status in problems:
            content = operation["responses"][status]["content"]
            assert set(content) == {"application/problem+json"}, (operation_id, status)


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
