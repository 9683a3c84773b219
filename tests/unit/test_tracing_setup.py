"""Tracing is off unless the OTEL_* environment turns it on; then it is what the environment
says, and a misconfiguration is refused at start-up."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_ON,
    ParentBasedTraceIdRatio,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags

from service.edge import tracing as setup
from service.infra import tracing
from service.kernel.errors import EnvironmentProblem
from service.write.records import records_of
from tests.unit.test_record_assembly import _events

ENDPOINT = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"OTEL_SERVICE_NAME": "orders", "OTEL_TRACES_SAMPLER": "always_on"},
        {"OTEL_TRACES_EXPORTER": "none", **ENDPOINT},
        {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"},
    ],
)
async def test_tracing_is_off_unless_an_exporter_or_an_endpoint_is_configured(
    environ: dict[str, str],
) -> None:
    assert not setup.wanted(environ)
    async with setup.traces("orders-api", environ) as provider:
        assert provider is None
        assert tracing.tracer() is None


@pytest.mark.parametrize(
    "environ",
    [
        ENDPOINT,
        {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"},
        {"OTEL_TRACES_EXPORTER": "otlp"},
    ],
)
def test_an_exporter_or_an_endpoint_turns_tracing_on(environ: dict[str, str]) -> None:
    assert setup.wanted(environ)


async def test_tracing_on_installs_a_provider_for_the_block_with_the_sampler_asked_for() -> None:
    environ = {
        **ENDPOINT,
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.01",
    }
    async with setup.traces("orders-api", environ) as provider:
        assert provider is not None
        assert isinstance(provider.sampler, ParentBasedTraceIdRatio)
        assert "0.01" in provider.sampler.get_description()
        assert provider.resource.attributes["service.name"] == "orders-api"
        assert tracing.tracer() is not None
    assert tracing.tracer() is None


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({**ENDPOINT, "OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER"),
        (
            {**ENDPOINT, "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "5"},
            "0 and 1",
        ),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "zipkin"),
        ({**ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "http/protobuf"),
    ],
)
def test_a_misconfiguration_is_refused_at_start_up(environ: dict[str, str], named: str) -> None:
    with pytest.raises(EnvironmentProblem, match=named):
        setup.provider_from(environ, service_name="orders-api")


def test_with_tracing_off_a_request_takes_no_trace_along() -> None:
    provider = TracerProvider(sampler=ALWAYS_ON, shutdown_on_exit=False)
    with provider.get_tracer("test").start_as_current_span("request"):
        assert tracing.sampled_context() is None  # nothing installed
        tracing.install(provider)
        try:
            assert tracing.sampled_context() is not None
        finally:
            tracing.uninstall()


def test_only_a_traced_commands_records_carry_its_trace_context() -> None:
    provider = TracerProvider(sampler=ALWAYS_ON, shutdown_on_exit=False)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    events = _events("o-1", count=2)
    assert all("traceparent" not in dict(r.headers) for r in records_of(events, 4))

    span = provider.get_tracer("test").start_span("send")
    headers = tracing.record_headers(span)
    traced = records_of(events, 4, headers)
    sent = span.get_span_context()
    for record in traced:
        carried = tracing.traced_in(record.headers)
        assert carried is not None
        assert (carried.trace_id, carried.span_id) == (sent.trace_id, sent.span_id)
    span.end()


def _sampling(sampler: Sampler) -> tuple[TracerProvider, InMemorySpanExporter]:
    provider = TracerProvider(
        sampler=sampler, id_generator=tracing.DrawnAheadIds(), shutdown_on_exit=False
    )
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    return provider, exporter


@pytest.fixture
def uninstalled() -> Iterator[None]:
    yield
    tracing.uninstall()


@pytest.mark.usefixtures("uninstalled")
@pytest.mark.parametrize("sampler", [TraceIdRatioBased(0.25), ParentBasedTraceIdRatio(0.25)])
def test_a_trace_id_drawn_ahead_decides_as_the_sampler_would(sampler: Sampler) -> None:
    _, exporter = _sampling(sampler)
    limit = TraceIdRatioBased.TRACE_ID_LIMIT
    bound = TraceIdRatioBased.get_bound_for_rate(0.25)
    started = [tracing.start_span("POST", SpanKind.SERVER, None) for _ in range(4000)]
    sampled = [span for span in started if span is not None]
    for span in sampled:
        span.end()
    # Every span started is one the sampler takes, about a quarter of them (5 sigma: 137).
    assert all(s.get_span_context().trace_id & limit < bound for s in sampled)
    assert abs(len(sampled) - 1000) < 137
    assert len(exporter.get_finished_spans()) == len(sampled)
    assert len({s.get_span_context().trace_id for s in sampled}) == len(sampled)


@pytest.mark.usefixtures("uninstalled")
def test_a_callers_sampled_trace_is_continued_and_an_unsampled_one_is_not() -> None:
    _sampling(ParentBasedTraceIdRatio(0.0))
    assert tracing.start_span("POST", SpanKind.SERVER, None) is None
    for flags, continued in ((TraceFlags.SAMPLED, True), (TraceFlags.DEFAULT, False)):
        caller = SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(flags))
        span = tracing.start_span("POST", SpanKind.SERVER, caller)
        assert (span is not None) is continued
        if span is not None:
            assert span.get_span_context().trace_id == 0xABC


@pytest.mark.usefixtures("uninstalled")
def test_without_ids_drawn_ahead_the_sdk_decides_alone() -> None:
    provider = TracerProvider(sampler=TraceIdRatioBased(0.5), shutdown_on_exit=False)
    tracing.install(provider)
    started = [tracing.start_span("GET", SpanKind.SERVER, None) for _ in range(400)]
    assert 100 < sum(span is not None for span in started) < 300
