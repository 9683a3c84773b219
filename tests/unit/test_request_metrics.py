"""The request metrics, counted without locks (``RequestMetrics``), are exposed exactly as
prometheus-client's own ``Counter`` and ``Histogram`` would expose the same requests."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from service.edge.http.telemetry import DURATION_BUCKETS, RequestMetrics

REQUESTS = [
    ("POST", "/orders", 201, 0.004),
    ("POST", "/orders", 201, 0.0025),  # on a bound: counted in that bucket (le is <=)
    ("POST", "/orders", 503, 0.0001),
    ("GET", "/orders/{order_id}", 200, 0.3),
    ("GET", "unmatched", 404, 12.5),  # beyond the last bound: +Inf only
    ("POST", "/orders", 201, 1.0),
]


def _exposition(registry: CollectorRegistry) -> list[str]:
    return sorted(generate_latest(registry).decode().splitlines())


def test_the_exposition_is_prometheus_clients_own() -> None:
    ours = CollectorRegistry()
    metrics = RequestMetrics()
    ours.register(metrics)
    theirs = CollectorRegistry()
    labels = ["method", "path", "status_code"]
    counter = Counter(
        "orders_http_requests",
        "HTTP requests answered, by method, route template and status",
        labels,
        registry=theirs,
    )
    histogram = Histogram(
        "orders_http_request_duration_seconds",
        "Time to answer an HTTP request, by method, route template and status",
        labels,
        buckets=DURATION_BUCKETS,
        registry=theirs,
    )
    in_progress = Gauge(
        "orders_http_requests_in_progress", "HTTP requests being answered now", registry=theirs
    )

    for method, route, status, seconds in REQUESTS:
        metrics.observe(method, route, status, seconds)
        counter.labels(method, route, str(status)).inc()
        histogram.labels(method, route, str(status)).observe(seconds)
    metrics.in_progress = 3
    in_progress.set(3)

    expected = [line for line in _exposition(theirs) if "_created" not in line]
    assert _exposition(ours) == expected
    assert 'orders_http_requests_total{method="POST",path="/orders",status_code="201"} 3.0' in (
        expected
    )
