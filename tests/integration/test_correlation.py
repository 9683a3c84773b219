"""A correlation id sent with a command follows it everywhere an operator looks (invariant 13):
the response echoes it, the event on Kafka carries it, the access log line names it, and so
does the projector's line when that event halts its projection. The real broker, database,
app, middleware and projector; waiting is polling with a deadline."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from projections.models import catalog
from projections.projection import Applied, Db, Projection, State
from service.edge.http.admission import CommandAdmission
from service.edge.http.app import Resources, create_app
from service.edge.http.limits import Backlog
from service.edge.http.telemetry import RequestTelemetry
from service.edge.logs import ACCESS_LOGGER, JsonFormatter
from service.write.writer import Writer
from tests.integration.conftest import PARTITIONS
from tests.support.identity import BACK_OFFICE, access, bearer
from tests.support.log import read_topic
from tests.support.projection_harness import eventually, running


class RefusingCorrelated:
    """The real ``orders`` projection, whose fold refuses the events of chosen correlation ids
    (a handler bug that only those commands' events meet)."""

    def __init__(self, inner: Projection, refused: set[str]) -> None:
        self.inner = inner
        self.name = inner.name
        self.tables = inner.tables
        self.refused = refused

    async def load(self, db: Db, batch: Sequence[Applied]) -> State:
        return await self.inner.load(db, batch)

    def fold(self, state: State, applied: Applied) -> None:
        if applied.envelope.correlation_id in self.refused:
            raise RuntimeError("handler bug")
        self.inner.fold(state, applied)


def _client(writer: Writer, db: AsyncEngine, topic: str) -> httpx.AsyncClient:
    """The app as ``orders api`` serves it: the access log outside admission control."""
    app = create_app(Resources(writer=writer, engine=db, topic=topic), access=access())
    served = RequestTelemetry(CommandAdmission(app, Backlog(30.0)))
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=served),
        base_url="http://test",
        headers=bearer(BACK_OFFICE),
    )


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record as the JSON log line shows it."""
    line: dict[str, Any] = json.loads(JsonFormatter().format(record))
    return line


async def test_a_correlation_id_is_in_the_response_the_event_the_access_log_and_the_halt(
    writer: Writer,
    db: AsyncEngine,
    bootstrap: str,
    topic: str,
    group_prefix: str,
    suffix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    created_as, added_as = f"checkout-{uuid.uuid4().hex[:8]}", f"add-{uuid.uuid4().hex[:8]}"
    refusing = RefusingCorrelated(catalog.PROJECTIONS["orders"], {added_as})

    async with (
        _client(writer, db, topic) as client,
        running(
            db,
            bootstrap,
            topic,
            group_prefix,
            ["orders"],
            assigned=PARTITIONS,
            wrap=lambda _: refusing,
        ) as run,
    ):
        created = await client.post(
            "/orders",
            json={"customer_id": f"c-{suffix}", "currency": "EUR"},
            headers={"X-Correlation-Id": created_as, "Idempotency-Key": uuid.uuid4().hex},
        )
        assert created.status_code == 201, created.text
        order_id = created.json()["order_id"]
        added = await client.post(
            f"/orders/{order_id}/items",
            json={"sku": "MUG", "name": "Mug", "quantity": 1, "unit_price": 1250},
            headers={"X-Correlation-Id": added_as},
        )
        assert added.status_code == 200, added.text
        partition, offset = map(int, added.json()["consistency_token"].split(":"))

        # The response echoes it.
        assert created.headers["x-correlation-id"] == created_as
        assert added.headers["x-correlation-id"] == added_as

        # The access log names it, with the route, the caller and the order.
        access_lines = [_fields(r) for r in caplog.records if r.name == ACCESS_LOGGER]
        assert [
            (line["method"], line["route"], line["status"], line["sub"], line["order_id"])
            for line in access_lines
            if line["correlation_id"] == added_as
        ] == [("POST", "/orders/{order_id}/items", 200, "back-office", order_id)]
        assert [line["route"] for line in access_lines if line["correlation_id"] == created_as] == [
            "/orders"
        ]

        # The projector halts at the event, and its line says which command it came from.
        async def halt_logged() -> tuple[bool, Any]:
            halts = [
                _fields(r)
                for r in caplog.records
                if r.name == "projections.runner" and r.levelno == logging.ERROR
            ]
            return bool(halts), halts

        [halt] = await eventually(halt_logged, "the projector's halt line", alive=run)
        assert run.halt("orders", partition) is not None
        assert halt["level"] == "ERROR"
        assert "HALTED" in halt["msg"]
        assert {key: halt.get(key) for key in ("projection", "partition", "offset")} == {
            "projection": "orders",
            "partition": partition,
            "offset": offset,
        }
        assert (halt["order_id"], halt["correlation_id"]) == (order_id, added_as)

    # The events on Kafka carry what the responses echoed.
    events = [e.envelope for e in await read_topic(bootstrap, topic, PARTITIONS)]
    assert [(e.version, e.correlation_id) for e in events if e.order_id == order_id] == [
        (1, created_as),
        (2, added_as),
    ]


async def test_a_command_without_one_carries_the_id_its_response_echoes(
    writer: Writer, db: AsyncEngine, bootstrap: str, topic: str, suffix: str
) -> None:
    trace_id = uuid.uuid4().hex
    async with _client(writer, db, topic) as client:
        generated = await client.post(
            "/orders",
            json={"customer_id": f"c-{suffix}", "currency": "EUR"},
            headers={"Idempotency-Key": uuid.uuid4().hex},
        )
        traced = await client.post(
            f"/orders/{generated.json()['order_id']}/items",
            json={"sku": "MUG", "name": "Mug", "quantity": 1, "unit_price": 1250},
            headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
        )
    assert (generated.status_code, traced.status_code) == (201, 200)
    assert traced.headers["x-correlation-id"] == trace_id

    events = [e.envelope for e in await read_topic(bootstrap, topic, PARTITIONS)]
    assert [e.correlation_id for e in events] == [
        generated.headers["x-correlation-id"],
        trace_id,
    ]


async def test_the_writers_line_about_a_fenced_batch_names_its_correlation_ids(
    writer: Writer, db: AsyncEngine, topic: str, suffix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    correlation_id = f"fenced-{uuid.uuid4().hex[:8]}"
    async with _client(writer, db, topic) as client:
        created = await client.post(
            "/orders",
            json={"customer_id": f"c-{suffix}", "currency": "EUR"},
            headers={"Idempotency-Key": uuid.uuid4().hex},
        )
        assert created.status_code == 201, created.text
        usurper = Writer(writer.config)  # the same transactional id: the first is fenced
        await usurper.start()
        try:
            refused = await client.post(
                f"/orders/{created.json()['order_id']}/items",
                json={"sku": "MUG", "name": "Mug", "quantity": 1, "unit_price": 1250},
                headers={"X-Correlation-Id": correlation_id},
            )
        finally:
            await usurper.stop()

    assert (refused.status_code, refused.headers["x-correlation-id"]) == (503, correlation_id)
    [fenced] = [
        _fields(r)
        for r in caplog.records
        if r.name == "service.write.writer" and "FENCED" in r.getMessage()
    ]
    assert (fenced["level"], fenced["commands"]) == ("ERROR", 1)
    assert fenced["correlation_ids"] == [correlation_id]
