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
request costs a sampling decision (``service.infra.tracing.start_span``), the metrics a dict
look-up and a few additions, the access line a JSON encode (docs/telemetry.md).
With telemetry off only the correlation id remains: the events carry it.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import time
from collections.abc import Iterator

from litestar.enums import ScopeType
from litestar.types import ASGIApp, HTTPScope, Message, Receive, Scope, Send
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, StatusCode
from prometheus_client import REGISTRY, Metric
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from service.edge.http.correlation import HEADER_NAME, correlation_id_for, log_access
from service.edge.logs import ACCESS_LOGGER, CORRELATION_ID
from service.infra import tracing

# The label of a request no route matched (a 404, or a command admission refused before
# routing): never the raw path, which may hold ids.
UNMATCHED = "unmatched"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_TRACE_HEADERS = {b"traceparent": tracing.TRACEPARENT, b"tracestate": tracing.TRACESTATE}

DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RequestMetrics(Collector):
    """``orders_http_requests_total``, ``orders_http_request_duration_seconds`` (by method,
    route template and status) and ``orders_http_requests_in_progress``.

    Counted in plain numbers rather than prometheus-client's ``Counter`` and ``Histogram``, and
    exported as their metric families at scrape time: those take a lock for every increment
    (five a request, with the gauge), about 8 us a request under load (py-spy), a quarter of
    the HTTP telemetry's cost then. No lock is needed: requests are answered and scrapes made
    on the event loop's thread alone (``/metrics`` and ``ORDERS_METRICS_PORT`` both)."""

    def __init__(self, buckets: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self._bounds = buckets
        # The bounds as prometheus-client writes them in ``le`` ("0.001", "1.0", "+Inf").
        self._le = [*map(floatToGoString, buckets), "+Inf"]
        # Per (method, route, status): each bucket's own count, then +Inf's, then the sum.
        self._series: dict[tuple[str, str, int], list[float]] = {}
        self.in_progress = 0

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        counts = self._series.get(key)
        if counts is None:
            counts = self._series[key] = [0.0] * (len(self._bounds) + 2)
        counts[bisect.bisect_left(self._bounds, seconds)] += 1  # the first bound >= seconds
        counts[-1] += seconds

    def collect(self) -> Iterator[Metric]:
        labels = ["method", "path", "status_code"]
        requests = CounterMetricFamily(
            "orders_http_requests",
            "HTTP requests answered, by method, route template and status",
            labels=labels,
        )
        duration = HistogramMetricFamily(
            "orders_http_request_duration_seconds",
            "Time to answer an HTTP request, by method, route template and status",
            labels=labels,
        )
        for (method, route, status), counts in list(self._series.items()):
            values = [method, route, str(status)]
            cumulative = list(itertools.accumulate(counts[:-1]))
            requests.add_metric(values, cumulative[-1])
            duration.add_metric(values, list(zip(self._le, cumulative, strict=True)), counts[-1])
        yield requests
        yield duration
        yield GaugeMetricFamily(
            "orders_http_requests_in_progress",
            "HTTP requests being answered now",
            value=self.in_progress,
        )


REQUEST_METRICS = RequestMetrics()
REGISTRY.register(REQUEST_METRICS)

_access = logging.getLogger(ACCESS_LOGGER)


class RequestTelemetry:
    """The ASGI wrapper. ``telemetry=False`` (``ORDERS_TELEMETRY=off``): the correlation id
    only; no metrics, no access line, no span."""

    def __init__(self, app: ASGIApp, *, telemetry: bool = True) -> None:
        self.app = app
        self.telemetry = telemetry

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
            REQUEST_METRICS.in_progress += 1
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
                REQUEST_METRICS.in_progress -= 1
                elapsed = time.perf_counter() - started
                method = scope["method"] if scope["method"] in _METHODS else "other"
                REQUEST_METRICS.observe(
                    method, scope.get("path_template") or UNMATCHED, status, elapsed
                )
                if span is not None:
                    _end(span, scope, status)
                if _access.isEnabledFor(logging.INFO):
                    log_access(scope, status, elapsed, correlation_id)
        finally:
            CORRELATION_ID.reset(token)


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
