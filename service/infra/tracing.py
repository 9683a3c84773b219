"""Traces, both sides: the tracer this process traces with (none unless tracing is on), and
the W3C trace context carried in Kafka record headers from a command's producer span to the
projector that applies its events (docs/telemetry.md, "Traces").

Off is the default and costs nothing: no tracer is installed, every helper here answers None
or nothing at once, and no record gets a trace header. The composition root installs a tracer
when the ``OTEL_*`` environment asks for one (``service.edge.tracing``); a test installs one
of its own provider. Not OpenTelemetry's global tracer provider, which can be set only once in
a process: this one can be replaced, and uninstalled.

Only sampled spans travel: a record carries ``traceparent`` (and ``tracestate``) only when its
command's producer span is sampled, so the projector's per-event work is a header lookup on
the records of a fetch, and only while a tracer is installed.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Final

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import Decision, Sampler
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACER_NAME: Final = "orders"
TRACEPARENT: Final = "traceparent"
TRACESTATE: Final = "tracestate"

# Messaging semantic conventions (OpenTelemetry 1.27+), for the Kafka spans.
MESSAGING_SYSTEM: Final = "messaging.system"
MESSAGING_OPERATION_TYPE: Final = "messaging.operation.type"
MESSAGING_OPERATION_NAME: Final = "messaging.operation.name"
MESSAGING_DESTINATION: Final = "messaging.destination.name"
MESSAGING_PARTITION: Final = "messaging.destination.partition.id"
MESSAGING_OFFSET: Final = "messaging.kafka.offset"
MESSAGING_KEY: Final = "messaging.kafka.message.key"
MESSAGING_BATCH_COUNT: Final = "messaging.batch.message_count"

_W3C = TraceContextTextMapPropagator()
_NO_CONTEXT: Final = Context()


class DrawnAheadIds(RandomIdGenerator):
    """Random ids, as OpenTelemetry's, except that the next trace id can be drawn before its
    span is started (``start_span``): give a provider these for the cheap unsampled spans."""

    def __init__(self) -> None:
        self.drawn = 0  # no trace id is 0: none drawn

    def generate_trace_id(self) -> int:
        trace_id, self.drawn = self.drawn, 0
        return trace_id or super().generate_trace_id()


class _Installed:
    tracer: Tracer | None = None
    sampler: Sampler | None = None
    ids: DrawnAheadIds | None = None


def install(provider: TracerProvider) -> None:
    """Trace with ``provider`` from now on (replacing any tracer installed before)."""
    _Installed.tracer = provider.get_tracer(TRACER_NAME)
    _Installed.sampler = provider.sampler
    ids = provider.id_generator
    _Installed.ids = ids if isinstance(ids, DrawnAheadIds) else None


def uninstall() -> None:
    """Trace no more: every helper here is a no-op again."""
    _Installed.tracer = _Installed.sampler = _Installed.ids = None


def tracer() -> Tracer | None:
    """The tracer to trace with; None when tracing is off."""
    return _Installed.tracer


def start_span(name: str, kind: SpanKind, caller: SpanContext | None) -> Span | None:
    """A span continuing ``caller``'s trace, or starting a trace without one, when it is
    sampled; None when it is not, or tracing is off.

    A trace's first span is where sampling is decided (a caller's spans carry the decision),
    and the trace id decides it (a ratio sampler takes the ids below its bound). So when the
    provider's ids are ``DrawnAheadIds``, the trace id is drawn first and put to the sampler:
    the unsampled majority (99 in 100 at a 1% ratio) cost a draw and a decision, not a span
    made only to be dropped (a third of the HTTP telemetry's cost); a sampled span is then
    started with that id, and its sampler decides the same."""
    tracer, ids, sampler = _Installed.tracer, _Installed.ids, _Installed.sampler
    if tracer is None:
        return None
    if caller is not None:
        span = tracer.start_span(name, context=parent(caller), kind=kind)
    else:
        if ids is not None and sampler is not None:
            trace_id = random.getrandbits(128) or 1
            decided = sampler.should_sample(_NO_CONTEXT, trace_id, name, kind)
            if decided.decision is Decision.DROP:
                return None
            ids.drawn = trace_id
        span = tracer.start_span(name, context=_NO_CONTEXT, kind=kind)
    return span if span.is_recording() else None


def sampled_context() -> SpanContext | None:
    """The current span's context when tracing is on and that span is sampled, else None:
    what a command takes along to the writer's task, where the request's context does not
    flow (the writer decides commands in a task of its own)."""
    if _Installed.tracer is None:
        return None
    context = trace.get_current_span().get_span_context()
    return context if context.trace_flags.sampled else None


def parent(span_context: SpanContext) -> Context:
    """A context whose current span is ``span_context``: for starting its children."""
    return trace.set_span_in_context(NonRecordingSpan(span_context))


def record_headers(span: Span) -> list[tuple[str, bytes]]:
    """The W3C trace context headers that make ``span`` the parent of whoever reads the
    record; none for a span that is not sampled."""
    span_context = span.get_span_context()
    if not span_context.trace_flags.sampled:
        return []
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, context=trace.set_span_in_context(span))
    return [(name, value.encode()) for name, value in carrier.items()]


def traced_in(headers: Iterable[tuple[str, bytes]] | None) -> SpanContext | None:
    """The span context a record's ``traceparent`` header names (with its ``tracestate``), or
    None: no such header, or a malformed one."""
    if not headers:
        return None
    carrier: dict[str, str] = {}
    for name, value in headers:
        if name in (TRACEPARENT, TRACESTATE):
            carrier[name] = value.decode(errors="replace")
    if TRACEPARENT not in carrier:
        return None
    span_context = trace.get_current_span(_W3C.extract(carrier)).get_span_context()
    return span_context if span_context.is_valid else None


def links_to(contexts: Iterable[SpanContext]) -> list[Link]:
    return [Link(context) for context in contexts]


def kafka_attributes(topic: str, partition: int, operation: str) -> dict[str, str | int]:
    """The messaging attributes of a span that sends (``operation="send"``) or processes
    (``"process"``) records of ``topic``'s ``partition``."""
    return {
        MESSAGING_SYSTEM: "kafka",
        MESSAGING_OPERATION_TYPE: operation,
        MESSAGING_OPERATION_NAME: operation,
        MESSAGING_DESTINATION: topic,
        MESSAGING_PARTITION: str(partition),
    }


def end_all(spans: Sequence[Span], error: BaseException | None = None) -> None:
    """End ``spans``; with ``error``, as failed by it."""
    for span in spans:
        if error is not None:
            span.record_exception(error)
            span.set_status(trace.StatusCode.ERROR, f"{type(error).__name__}: {error}")
        span.end()
