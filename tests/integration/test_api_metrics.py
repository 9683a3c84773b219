"""The API's Prometheus metrics, scraped from the served service (`orders api` + `orders
projector` as the composition root runs them) over real HTTP: `GET /metrics` behind `ops:read`,
and the same series without a token on ORDERS_METRICS_PORT.

Each command's outcome is counted under its type, requests under their route template (never an
order id), the writer's state is read at scrape time, and a query that waits for its
consistency token is counted. Real broker, real database.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.http import client as http_client
from tests.support.identity import bearer, token
from tests.support.served import Service, served, service_settings

ITEM = {"sku": "MUG-1", "name": "Mug", "quantity": 1, "unit_price": 900}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def service(bootstrap: str, database_url: str) -> Iterator[Service]:
    settings = service_settings(bootstrap, database_url, metrics_port=_free_port())
    with served(settings) as running:
        yield running


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[httpx.Client]:
    with http_client(service.base_url) as client:
        yield client


def scrape(client: httpx.Client) -> tuple[str, Samples]:
    answer = client.get("/metrics", headers=bearer(token("prometheus", "ops:read")))
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return answer.text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
    wanted = set(labels.items())
    return sum(v for (n, found), v in samples.items() if n == name and wanted <= found)


def test_metrics_need_ops_read(client: httpx.Client) -> None:
    assert client.get("/metrics", headers={"Authorization": ""}).status_code == 401
    customer = bearer(token("c-metrics", "orders:read orders:write"))
    refused = client.get("/metrics", headers=customer)
    assert refused.status_code == 403
    assert "ops:read" in refused.json()["required_scopes"]


def test_command_outcomes_are_counted_by_type(client: httpx.Client) -> None:
    _, before = scrape(client)
    created = client.post("/orders", json={"customer_id": "c-metrics", "currency": "EUR"})
    assert created.status_code == 201
    order_id = created.json()["order_id"]
    key = {"Idempotency-Key": "metrics-add-1"}
    assert client.post(f"/orders/{order_id}/items", json=ITEM, headers=key).status_code == 200
    assert client.post(f"/orders/{order_id}/items", json=ITEM, headers=key).status_code == 200
    stale = client.post(f"/orders/{order_id}/place", headers={"If-Match": '"1"'})
    assert stale.status_code == 412
    payment = {"amount": 900, "currency": "EUR", "payment_reference": "psp-metrics"}
    assert client.post(f"/orders/{order_id}/pay", json=payment).status_code == 409  # a draft
    text, after = scrape(client)

    def counted(command: str, outcome: str) -> float:
        name = "orders_writer_commands_total"
        labels = {"command": command, "outcome": outcome}
        return value(after, name, **labels) - value(before, name, **labels)

    assert counted("CreateOrder", "accepted") == 1
    assert counted("AddItem", "accepted") == 1
    assert counted("AddItem", "replayed") == 1
    assert counted("PlaceOrder", "version_mismatch") == 1
    assert counted("PayOrder", "rejected") == 1
    # Requests by route template; the order id is in no label.
    template = "/orders/{order_id}/items"
    added = {"path": template, "status_code": "200"}
    assert (
        value(after, "orders_http_requests_total", **added)
        - value(before, "orders_http_requests_total", **added)
        == 2
    )
    assert order_id not in text
    # The writer's state, read at scrape time.
    assert value(after, "orders_writer_state", state="ready") == 1
    assert value(after, "orders_writer_state", state="fenced") == 0
    assert value(after, "orders_writer_orders") >= 1
    assert value(after, "orders_writer_idempotency_keys") >= 2
    assert value(after, "orders_writer_batch_commands_count") > value(
        before, "orders_writer_batch_commands_count"
    )
    assert value(after, "orders_writer_transaction_duration_seconds_count") > 0
    assert value(after, "orders_writer_queue_delay_seconds_count") > 0
    # The client library's own process collector is there too.
    assert value(after, "process_resident_memory_bytes") > 0


def test_a_query_waiting_for_its_token_is_counted(client: httpx.Client) -> None:
    _, before = scrape(client)
    created = client.post("/orders", json={"customer_id": "c-metrics", "currency": "EUR"})
    assert created.status_code == 201
    consistency = {"X-Consistency-Token": created.headers["X-Consistency-Token"]}
    order_id = created.json()["order_id"]
    assert client.get(f"/orders/{order_id}", headers=consistency).status_code == 200
    _, after = scrape(client)
    waits = value(after, "orders_consistency_waits_total") - value(
        before, "orders_consistency_waits_total"
    )
    # The projector may have applied the event before the query came: then it did not wait.
    timed_out = value(after, "orders_consistency_waits_total", outcome="timed_out")
    assert timed_out == value(before, "orders_consistency_waits_total", outcome="timed_out")
    assert waits == value(after, "orders_consistency_wait_seconds_count") - value(
        before, "orders_consistency_wait_seconds_count"
    )
    assert value(after, "orders_consistency_waiters") == 0


def test_the_metrics_port_serves_without_a_token(service: Service, client: httpx.Client) -> None:
    port = service.settings.metrics_port
    assert port is not None
    answer = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert answer.status_code == 200
    assert "orders_writer_commands_total" in answer.text
    assert "orders_http_requests_total" in answer.text
