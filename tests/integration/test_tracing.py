"""Traces: one trace from a command's HTTP request through its Kafka record and the projector's
transaction that applied it to the query that waited for its consistency token; and nothing
of it while tracing is off.

The tracer provider is the test's own (an in-memory exporter, every span sampled), installed
with ``service.infra.tracing.install``: never OpenTelemetry's global one,
which a process can set only once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from sqlalchemy.ext.asyncio import AsyncEngine

from service.edge.http.app import Resources, create_app
from service.edge.http.telemetry import RequestTelemetry
from service.infra import tracing
from service.infra.eventlog import read_to_end
from service.write.writer import Writer
from tests.integration.conftest import PARTITIONS
from tests.support.http import serve
from tests.support.identity import access
from tests.support.projection_harness import eventually, running


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    """Tracing on, for this test only: every span sampled, kept in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_ON, shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        yield provider, exporter
    finally:
        tracing.uninstall()
        provider.shutdown()


def _traceparent_of(span: trace.Span) -> dict[str, str]:
    """The headers an instrumented client sends from within ``span``."""
    headers: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(headers, context=trace.set_span_in_context(span))
    return headers


async def _records(bootstrap: str, topic: str) -> list[Any]:
    found = []
    async for batch in read_to_end(bootstrap, topic, range(PARTITIONS)):
        found.extend(batch)
    return found


def _one(found: list[ReadableSpan], what: str) -> ReadableSpan:
    assert len(found) == 1, f"{what}: {[(s.name, s.kind) for s in found]}"
    return found[0]


async def test_one_trace_goes_from_the_command_request_to_the_query_that_waited_for_it(
    spans: tuple[TracerProvider, InMemorySpanExporter],
    writer: Writer,
    db: AsyncEngine,
    bootstrap: str,
    topic: str,
    group_prefix: str,
) -> None:
    provider, exporter = spans
    # As the composition root serves it: the server span is RequestTelemetry's.
    app = RequestTelemetry(
        create_app(Resources(writer=writer, engine=db, topic=topic), access=access())
    )
    # The client's own span: it sends the same trace with the command and with the query. Not
    # current here: the app runs in this task, where it would be the server span's parent.
    client = provider.get_tracer("test client").start_span("client")
    trace_id = client.get_span_context().trace_id
    headers = _traceparent_of(client)
    try:
        async with serve(app) as http:
            created = await http.post(
                "/orders", json={"customer_id": "c-traced", "currency": "EUR"}, headers=headers
            )
            assert created.status_code == 201, created.text
            order_id, token = created.json()["order_id"], created.json()["consistency_token"]

            async with running(db, bootstrap, topic, group_prefix, ["orders"]) as projector:
                read = await http.get(
                    f"/orders/{order_id}", headers={**headers, "X-Consistency-Token": token}
                )
                assert read.status_code == 200, read.text

                async def applied() -> tuple[bool, Any]:
                    found = [s for s in exporter.get_finished_spans() if s.name == "apply orders"]
                    return bool(found), [s.name for s in exporter.get_finished_spans()]

                await eventually(applied, "the projector's apply span", alive=projector)
    finally:
        client.end()

    finished = exporter.get_finished_spans()
    in_trace = [s for s in finished if s.context.trace_id == trace_id]
    servers = [s for s in in_trace if s.kind is SpanKind.SERVER]
    assert len(servers) == 2, [(s.name, s.attributes) for s in servers]  # the command, the query
    command_span = _one(
        [s for s in servers if s.attributes and s.attributes.get("http.request.method") == "POST"],
        "the command's server span",
    )
    query_span = _one(
        [s for s in servers if s.attributes and s.attributes.get("http.request.method") == "GET"],
        "the query's server span",
    )
    # Named by route template, never by the raw path (which holds the order id).
    assert (command_span.name, query_span.name) == ("POST /orders", "GET /orders/{order_id}")
    produce = _one([s for s in in_trace if s.kind is SpanKind.PRODUCER], "the produce span")
    assert produce.parent is not None
    assert produce.parent.span_id == command_span.context.span_id
    partition, offset = (int(part) for part in token.split(":"))
    assert produce.attributes is not None
    assert produce.attributes["messaging.system"] == "kafka"
    assert produce.attributes["messaging.destination.name"] == topic
    assert produce.attributes["messaging.destination.partition.id"] == str(partition)
    assert produce.attributes["messaging.kafka.offset"] == offset

    apply = _one([s for s in in_trace if s.name == "apply orders"], "the projector's apply span")
    assert apply.parent is not None
    assert apply.parent.span_id == produce.context.span_id
    assert apply.attributes is not None
    assert apply.attributes["messaging.kafka.offset"] == offset
    # The projector's transaction span, a trace of its own, links to the record's producer.
    transaction = _one(
        [
            s
            for s in finished
            if s.name == "orders transaction"
            and any(link.context.span_id == produce.context.span_id for link in s.links)
        ],
        "the transaction span linked to the record",
    )
    assert transaction.context.trace_id != trace_id

    wait = _one([s for s in in_trace if s.name == "wait for consistency"], "the wait span")
    assert wait.parent is not None
    assert wait.parent.span_id == query_span.context.span_id
    assert wait.attributes is not None
    assert wait.attributes["orders.consistency.outcome"] == "reached"
    assert wait.attributes["messaging.kafka.offset"] == offset

    # The record on Kafka carries the producer span's context, and only the command's record.
    [record] = await _records(bootstrap, topic)
    carried = dict(record.headers)
    assert carried[tracing.TRACEPARENT].decode().split("-")[1:3] == [
        f"{trace_id:032x}",
        f"{produce.context.span_id:016x}",
    ]


async def test_with_tracing_off_no_span_is_made_and_no_record_carries_a_trace(
    writer: Writer, db: AsyncEngine, bootstrap: str, topic: str
) -> None:
    assert tracing.tracer() is None
    provider = TracerProvider(sampler=ALWAYS_ON, shutdown_on_exit=False)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = RequestTelemetry(
        create_app(Resources(writer=writer, engine=db, topic=topic), access=access())
    )
    # A caller that traces sends its traceparent all the same.
    client = provider.get_tracer("test client").start_span("client")
    async with serve(app) as http:
        created = await http.post(
            "/orders",
            json={"customer_id": "c-untraced", "currency": "EUR"},
            headers=_traceparent_of(client),
        )
        assert created.status_code == 201, created.text
    client.end()
    [record] = await _records(bootstrap, topic)
    names = [name for name, _value in record.headers]
    assert tracing.TRACEPARENT not in names
    assert tracing.TRACESTATE not in names
    assert [s.name for s in exporter.get_finished_spans()] == ["client"]
    provider.shutdown()
