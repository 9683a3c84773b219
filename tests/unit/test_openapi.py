"""The OpenAPI schema the app serves: every route named, every command body with an example."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import create_async_engine

from service.edge.http.app import Resources, create_app
from service.write.writer import Writer, WriterConfig


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
