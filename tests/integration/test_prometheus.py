"""A real Prometheus scrapes a running API and projector (``orders api --metrics-port``,
``orders projector --metrics-port``) with the shipped scrape configuration and alert rules
(deploy/prometheus), while a small, bounded load of commands and queries runs.

- Every query of the dashboard and every alert's signal returns data. An alert expression is
  ``<signal> <op> <threshold>`` (the convention of alerts.yml); in a healthy service the
  comparison is false, so the test evaluates the signal alone: the series it uses exist and
  the arithmetic over them yields a value. The rebuild panels are the exception: their series
  exist only while ``orders projections rebuild`` runs.
- The lag alert fires when the projector stops applying under load, and resolves when it
  catches up. The projector is stopped by holding a lock on ``projection_checkpoints``: it
  stays up and scraped, its batches wait. (A projector that is not scraped at all, SIGSTOPped
  or gone, has no lag series; that is OrdersProjectionsUnassigned, tested below with SIGSTOP.)
  The rules are the shipped file with only the lag alert's threshold and ``for:`` shortened.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from service.infra.embedded import free_port
from tests.support.identity import BACK_OFFICE, bearer
from tests.support.processes import ApiProcess, ServiceProcess, service_env
from tests.support.prometheus import (
    Prometheus,
    dashboard_expressions,
    eventually,
    rules_with,
    running_prometheus,
    scrape_config,
    shipped_alert_rules,
    split_comparison,
)

PARTITIONS = 4
LAG_ALERT = "OrdersProjectionLagging"
UNASSIGNED_ALERT = "OrdersProjectionsUnassigned"
LAG_THRESHOLD_S = 2.0
# Windows of rate() and friends in the queries: a few 1 s scrapes.
RATE_WINDOW = "15s"
# Series that exist only while `orders projections rebuild` runs.
REBUILD_ONLY = "orders_rebuild_"
LOAD_CLIENTS = 4
LOAD_MAX_S = 600.0  # the load's own bound, should the test forget to stop it (past every step)
STEP_TIMEOUT_S = 90.0  # a loaded CI machine took more than 45 s for the lag alert once


@dataclass
class Load:
    """A few clients creating orders, adding items (some invalid: 4xx), and reading each order
    back with its consistency token, until ``stop`` is set or ``LOAD_MAX_S`` has passed."""

    base_url: str
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    statuses: dict[int, int] = field(default_factory=dict)

    async def _client(self, number: int) -> None:
        headers = bearer(BACK_OFFICE)
        deadline = time.monotonic() + LOAD_MAX_S
        async with httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=30) as http:
            for i in itertools.count():
                if self.stop.is_set() or time.monotonic() > deadline:
                    return
                with contextlib.suppress(httpx.TransportError):
                    await self._one_order(http, f"c-{number}-{i}")

    async def _one_order(self, http: httpx.AsyncClient, customer: str) -> None:
        created = await http.post(
            "/orders",
            json={"customer_id": customer, "currency": "EUR"},
            headers={"Idempotency-Key": uuid.uuid4().hex},
        )
        self._count(created)
        if created.status_code != 201:
            return
        order = created.json()["order_id"]
        item = {"sku": "sku-1", "name": "A thing", "quantity": 2, "unit_price": 150}
        added = await http.post(f"/orders/{order}/items", json=item)
        self._count(added)
        self._count(await http.post(f"/orders/{order}/items", json={**item, "quantity": 0}))
        token = added.headers.get("x-consistency-token")
        if token is not None:
            read = await http.get(f"/orders/{order}", headers={"X-Consistency-Token": token})
            self._count(read)

    def _count(self, response: httpx.Response) -> None:
        self.statuses[response.status_code] = self.statuses.get(response.status_code, 0) + 1

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Load]:
        clients = [asyncio.create_task(self._client(n)) for n in range(LOAD_CLIENTS)]
        try:
            yield self
        finally:
            self.stop.set()
            await asyncio.gather(*clients)


@dataclass
class Stack:
    api: ApiProcess
    projector: ServiceProcess
    prometheus: Prometheus


@pytest.fixture
async def stack(
    engine: AsyncEngine, bootstrap: str, database_url: str, topic: str, tmp_path: Path
) -> AsyncIterator[Stack]:
    """API and projector as `orders` processes, each with a metrics port, and a Prometheus
    scraping both every second with the shipped rules (two of them with short holds)."""
    name = uuid.uuid4().hex[:8]
    env = service_env(
        bootstrap=bootstrap,
        database_url=database_url,
        topic=topic,
        partitions=PARTITIONS,
        name=name,
        extra={"ORDERS_RATE_LIMIT": "0", "ORDERS_MAX_QUEUE_DELAY_MS": "30000"},
    )
    api = ApiProcess.create(env, tmp_path / "api.log")
    api_metrics, projector_metrics = free_port(), free_port()
    api.argv += ["--metrics-port", str(api_metrics)]
    projector = ServiceProcess(
        ["projector", "--metrics-port", str(projector_metrics)], env, tmp_path / "projector.log"
    )
    rules = rules_with(LAG_ALERT, threshold=LAG_THRESHOLD_S, hold="2s")
    rules = rules_with(UNASSIGNED_ALERT, threshold=0, hold="2s", rules=rules)
    config = scrape_config(
        {
            "orders-api": [f"127.0.0.1:{api_metrics}"],
            "orders-projector": [f"127.0.0.1:{projector_metrics}"],
        },
        rule_file=tmp_path / "prometheus" / "rules.yml",
    )
    api.start()
    projector.start()
    try:
        await api.wait_ready()
        with running_prometheus(tmp_path / "prometheus", config, rules) as prometheus:
            yield Stack(api, projector, prometheus)
    finally:
        for process in (projector, api):
            if process.alive:
                assert process.process is not None
                process.process.send_signal(signal.SIGCONT)  # were it stopped
                process.terminate(grace_seconds=20)


async def _returns_data(prometheus: Prometheus, expr: str) -> bool:
    return bool(await prometheus.query(expr))


async def test_scraped_service_gives_every_query_data_and_the_lag_alert_fires_and_resolves(
    stack: Stack, engine: AsyncEngine
) -> None:
    prometheus = stack.prometheus

    async def both_up() -> bool:
        health = await prometheus.targets_up()
        return len(health) == 2 and set(health.values()) == {"up"}

    await eventually("both targets scraped", both_up, timeout=STEP_TIMEOUT_S)
    async with Load(stack.api.base_url).running() as load:
        await eventually("the load's first order", lambda: _accepted(load), timeout=30)
        # Every query has data once the load has gone through a few scrapes.
        queries = [  # (what, PromQL)
            (f"panel {title!r}", expr)
            for title, expr in dashboard_expressions(rate_interval=RATE_WINDOW)
            if REBUILD_ONLY not in expr
        ] + [
            (f"alert {rule['alert']}", split_comparison(rule["expr"])[0])
            for rule in shipped_alert_rules()
        ]
        missing = list(queries)

        async def all_have_data() -> bool:
            for query in list(missing):
                if await _returns_data(prometheus, query[1]):
                    missing.remove(query)
            return not missing

        with contextlib.suppress(AssertionError):
            await eventually("every query has data", all_have_data, timeout=STEP_TIMEOUT_S)
        assert not missing, "no data:\n" + "\n".join(f"{w}: {e}" for w, e in missing)
        assert not await prometheus.firing(LAG_ALERT), "lagging before the projector stopped"

        # The projector stops applying: its next transaction waits for the checkpoints' lock.
        async with engine.connect() as blocker:
            transaction = await blocker.begin()
            await blocker.execute(
                sa.text("LOCK TABLE projection_checkpoints IN ACCESS EXCLUSIVE MODE")
            )
            try:
                took = await eventually(
                    f"{LAG_ALERT} fires",
                    lambda: _is_firing(prometheus, LAG_ALERT),
                    timeout=STEP_TIMEOUT_S,
                )
            finally:
                await transaction.rollback()
        print(f"{LAG_ALERT} fired {took:.1f} s after the projector stopped applying")
    # It catches up with what the load wrote, and the alert resolves.
    took = await eventually(
        f"{LAG_ALERT} resolves",
        lambda: _is_inactive(prometheus, LAG_ALERT),
        timeout=STEP_TIMEOUT_S,
    )
    print(f"{LAG_ALERT} resolved {took:.1f} s after the load stopped; load: {load.statuses}")
    # 503s: queries whose consistency wait timed out while the projector could not commit.
    assert not [s for s in load.statuses if s >= 500 and s != 503], load.statuses


async def test_a_stopped_projector_leaves_no_partition_assigned_and_that_alert_resolves(
    stack: Stack,
) -> None:
    prometheus = stack.prometheus
    await eventually(
        "the projector holds partitions",
        lambda: _returns_data(prometheus, "sum(orders_projection_assigned_partitions) > 0"),
        timeout=STEP_TIMEOUT_S,
    )
    process = stack.projector.process
    assert process is not None
    process.send_signal(signal.SIGSTOP)  # not scraped any more: its series go stale
    try:
        await eventually(
            f"{UNASSIGNED_ALERT} fires",
            lambda: _is_firing(prometheus, UNASSIGNED_ALERT),
            timeout=STEP_TIMEOUT_S,
        )
    finally:
        process.send_signal(signal.SIGCONT)
    await eventually(
        f"{UNASSIGNED_ALERT} resolves",
        lambda: _is_inactive(prometheus, UNASSIGNED_ALERT),
        timeout=STEP_TIMEOUT_S,
    )


async def _accepted(load: Load) -> bool:
    assert not load.statuses.keys() - {200, 201, 400, 422, 503}, load.statuses
    return 201 in load.statuses


async def _is_firing(prometheus: Prometheus, alert: str) -> bool:
    return bool(await prometheus.firing(alert))


async def _is_inactive(prometheus: Prometheus, alert: str) -> bool:
    return not [a for a in await prometheus.alerts() if a["labels"]["alertname"] == alert]
