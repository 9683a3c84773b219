"""A real Prometheus (Debian's ``prometheus``) for the telemetry tests, and the shipped files.

``running_prometheus`` starts one on a free port of 127.0.0.1 with a temporary data directory
and the configuration and rules a test gives it (the shipped ones from ``deploy/prometheus``,
adapted: scrape targets, short intervals), waits for ``/-/ready`` with a deadline, and always
stops it. ``Prometheus`` queries it through its HTTP API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from service.infra.embedded import free_port, log_tail, spawn, stop_process

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SHIPPED_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
SHIPPED_RULES = DEPLOY / "prometheus" / "alerts.yml"
SHIPPED_RULE_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "orders.json"

START_TIMEOUT_S = 30.0
POLL_S = 0.2

# An alert expression's last top-level comparison with a number: `<signal> <op> <threshold>`
# (the convention of alerts.yml).
_COMPARISON = re.compile(
    r"^(?P<signal>.*\S)\s*(?P<op>>=|<=|==|!=|>|<)\s*(?P<threshold>[0-9.]+)\s*$", re.S
)


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    assert found, "no prometheus on PATH: apt-get install prometheus (.ci/run does)"
    return found


def promtool_binary() -> str:
    found = shutil.which("promtool")
    assert found, "no promtool on PATH: apt-get install prometheus (.ci/run does)"
    return found


def shipped_alert_rules() -> list[dict[str, Any]]:
    """Every alerting rule of deploy/prometheus/alerts.yml, as parsed YAML."""
    groups = yaml.safe_load(SHIPPED_RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def split_comparison(expr: str) -> tuple[str, str, float]:
    """An alert expression as (signal, operator, threshold); fails on one without that form."""
    match = _COMPARISON.match(expr.strip())
    assert match, f"not `<signal> <op> <number>`: {expr}"
    return match["signal"], match["op"], float(match["threshold"])


def rules_with(
    alert: str, *, threshold: float, hold: str, rules: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The shipped rules (or ``rules``, already changed), with only ``alert``'s threshold and
    ``for:`` changed."""
    document = rules if rules is not None else yaml.safe_load(SHIPPED_RULES.read_text())
    found = 0
    for group in document["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                signal, op, _ = split_comparison(rule["expr"])
                rule["expr"] = f"{signal} {op} {threshold:g}"
                rule["for"] = hold
                found += 1
    assert found == 1, f"{alert} is not (once) in {SHIPPED_RULES}"
    return document


def dashboard_expressions(*, rate_interval: str) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of the dashboard, Grafana's ``$__rate_interval``
    replaced by ``rate_interval``."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"].replace("$__rate_interval", rate_interval))
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def scrape_config(
    targets: dict[str, list[str]], *, rule_file: Path, interval: str = "1s"
) -> dict[str, Any]:
    """The shipped prometheus.yml with its jobs pointed at ``targets`` (job -> host:port),
    ``interval`` for scrapes and rule evaluation, and ``rule_file`` as its rules."""
    config = yaml.safe_load(SHIPPED_CONFIG.read_text())
    config["global"] = {
        "scrape_interval": interval,
        "scrape_timeout": interval,
        "evaluation_interval": interval,
    }
    config["rule_files"] = [str(rule_file)]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    missing = set(targets) - set(jobs)
    assert not missing, f"prometheus.yml has no job {missing}"
    config["scrape_configs"] = [
        {**jobs[name], "static_configs": [{"targets": hosts}]} for name, hosts in targets.items()
    ]
    return config


@dataclass
class Prometheus:
    url: str
    log: Path

    async def _get(self, path: str, **params: str) -> Any:
        async with httpx.AsyncClient(base_url=self.url, timeout=10.0) as client:
            response = await client.get(path, params=params)
        body = response.json()
        assert body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result (a vector); a PromQL error fails the test."""
        data = await self._get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", data
        return data["result"]  # type: ignore[no-any-return]

    async def alerts(self) -> list[dict[str, Any]]:
        """The active (pending or firing) alerts."""
        return (await self._get("/api/v1/alerts"))["alerts"]  # type: ignore[no-any-return]

    async def targets_up(self) -> dict[str, str]:
        """Each active target's scrape URL and its health (up, down, unknown)."""
        data = await self._get("/api/v1/targets", state="active")
        return {t["scrapeUrl"]: t["health"] for t in data["activeTargets"]}

    async def firing(self, alert: str) -> list[dict[str, Any]]:
        return [
            a
            for a in await self.alerts()
            if a["labels"]["alertname"] == alert and a["state"] == "firing"
        ]

    def tail(self) -> str:
        return log_tail(self.log, 30)


async def eventually(
    what: str, check: Callable[[], Awaitable[bool]], *, timeout: float, poll_s: float = 0.5
) -> float:
    """Poll ``check`` until it is true; fails with ``what`` after ``timeout``. Seconds taken."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < timeout, f"not within {timeout} s: {what}"
        await asyncio.sleep(poll_s)  # polling interval
    return time.monotonic() - started


@contextlib.contextmanager
def running_prometheus(
    workdir: Path, config: dict[str, Any], rules: dict[str, Any] | None = None
) -> Iterator[Prometheus]:
    """A Prometheus with ``config`` (its ``rule_files`` should name ``workdir/rules.yml`` when
    ``rules`` are given) on a free port of 127.0.0.1, ready, until the block ends."""
    workdir.mkdir(parents=True, exist_ok=True)
    if rules is not None:
        (workdir / "rules.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    config_file = workdir / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    log = workdir / "prometheus.log"
    process = spawn(
        [
            prometheus_binary(),
            f"--config.file={config_file}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        log_file=log,
    )
    prometheus = Prometheus(f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        with httpx.Client(base_url=prometheus.url, timeout=2.0) as client:
            while True:
                assert process.poll() is None, f"prometheus exited:\n{prometheus.tail()}"
                with contextlib.suppress(httpx.TransportError):
                    if client.get("/-/ready").status_code == 200:
                        break
                assert time.monotonic() < deadline, f"prometheus not ready:\n{prometheus.tail()}"
                time.sleep(POLL_S)  # polling interval of a server that is starting
        yield prometheus
    finally:
        stop_process(process, grace_seconds=10.0)
