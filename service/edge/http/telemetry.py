"""Each HTTP request's telemetry, in one ASGI wrapper around everything that answers HTTP
(outside admission control and authentication, so that what they refuse counts too):

* its correlation id (``service.edge.http.correlation``): taken from the request or made,
  echoed in the response, and in ``service.edge.logs.CORRELATION_ID`` while it runs;
* its count and duration by method, route template and status (Prometheus);
* its access log line (``orders.access``);
* its server span, when tracing is on and the request is sampled, continuing the caller's
  W3C ``traceparent``; the command code hands it on to the writer and the Kafka records.

One wrapper rather than Litestar's Prometheus middleware and OpenTelemetry plugin: measured
in-process on ``GET /health`` (62 us bare), the Prometheus middleware added 68 us per request
and the OpenTelemetry plugin 162 us, at 1% sampling (its ASGI middleware builds every
request's attributes, sampled or not): together a third of a command's CPU. Here an unsampled
request costs a sampling decision (``service.infra.tracing.start_span``), the metrics a few
label look-ups, the access line a JSON encode and a write (docs/telemetry.md).
With telemetry off only the correlation id remains: the events carry it.
"""

from __future__ import annotations

import logging
import time

from litestar.enums import ScopeType
from litestar.types import ASGIApp, HTTPScope, Message, Receive, Scope, Send
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, StatusCode
from prometheus_client import Counter, Gauge, Histogram

from service.edge.http.correlation import HEADER_NAME, correlation_id_for, log_access
from service.edge.logs import ACCESS_LOGGER, CORRELATION_ID
from service.infra import tracing

# The label of a request no route matched (a 404, or a command admission refused before
# routing): never the raw path, which may hold ids.
UNMATCHED = "unmatched"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_TRACE_HEADERS = {b"traceparent": tracing.TRACEPARENT, b"tracestate": tracing.TRACESTATE}

REQUESTS = Counter(
    "orders_http_requests",
    "HTTP requests answered, by method, route template and status",
    ["method", "path", "status_code"],
)
DURATION = Histogram(
    "orders_http_request_duration_seconds",
    "Time to answer an HTTP request, by method, route template and status",
    ["method", "path", "status_code"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
IN_PROGRESS = Gauge("orders_http_requests_in_progress", "HTTP requests being answered now")

_access = logging.getLogger(ACCESS_LOGGER)


class RequestTelemetry:
    """The ASGI wrapper. ``telemetry=False`` (``ORDERS_TELEMETRY=off``): the correlation id
    only; no metrics, no access line, no span."""

    def __init__(self, app: ASGIApp, *, telemetry: bool = True) -> None:
        self.app = app
        self.telemetry = telemetry
        self._series: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:  # lifespan, websockets
            await self.app(scope, receive, send)
            return
        correlation_id = correlation_id_for(scope["headers"])
        echoed = (HEADER_NAME, correlation_id.encode("ascii"))
        status = 500  # what the server answers when the app fails before responding

        async def respond(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), echoed]
            await send(message)

        token = CORRELATION_ID.set(correlation_id)
        try:
            if not self.telemetry:
                await self.app(scope, receive, respond)
                return
            started = time.perf_counter()
            span = _server_span(scope)
            IN_PROGRESS.inc()
            try:
                if span is None:
                    await self.app(scope, receive, respond)
                else:
                    attached = otel_context.attach(trace.set_span_in_context(span))
                    try:
                        await self.app(scope, receive, respond)
                    finally:
                        otel_context.detach(attached)
            finally:
                IN_PROGRESS.dec()
                elapsed = time.perf_counter() - started
                self._count(scope, status, elapsed)
                if span is not None:
                    _end(span, scope, status)
                if _access.isEnabledFor(logging.INFO):
                    log_access(scope, status, elapsed, correlation_id)
        finally:
            CORRELATION_ID.reset(token)

    def _count(self, scope: HTTPScope, status: int, elapsed: float) -> None:
        method = scope["method"] if scope["method"] in _METHODS else "other"
        key = (method, scope.get("path_template") or UNMATCHED, status)
        series = self._series.get(key)
        if series is None:
            labels = (key[0], key[1], str(status))
            series = self._series[key] = (REQUESTS.labels(*labels), DURATION.labels(*labels))
        series[0].inc()
        series[1].observe(elapsed)


def _server_span(scope: HTTPScope) -> Span | None:
    """The request's server span when tracing is on and it is sampled, else None (nothing
    else to do: the command code takes along only sampled spans)."""
    if tracing.tracer() is None:
        return None
    carried = [
        (_TRACE_HEADERS[name], value) for name, value in scope["headers"] if name in _TRACE_HEADERS
    ]
    return tracing.start_span(scope["method"], SpanKind.SERVER, tracing.traced_in(carried))


def _end(span: Span, scope: HTTPScope, status: int) -> None:
    method, route = scope["method"], scope.get("path_template")
    if route:
        span.update_name(f"{method} {route}")  # the template: span names stay few
        span.set_attribute("http.route", route)
    span.set_attribute("http.request.method", method)
    span.set_attribute("url.path", scope["path"])
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(StatusCode.ERROR)
    span.end()
