"""The files of deploy/ and docker-compose.yml: promtool accepts them, the alert rules pass their
unit tests, every dashboard query is valid PromQL, and compose wires them to the services."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from sqlalchemy.engine import make_url

from service.infra.database import API_ROLE, OWNER_ROLE, PROJECTOR_ROLE
from service.infra.embedded.kafka import KAFKA_VERSION
from tests.support.prometheus import (
    DASHBOARD,
    DEPLOY,
    SHIPPED_CONFIG,
    SHIPPED_RULE_TESTS,
    SHIPPED_RULES,
    dashboard_expressions,
    promtool_binary,
    shipped_alert_rules,
    split_comparison,
)

COMPOSE = DEPLOY.parent / "docker-compose.yml"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [promtool_binary(), *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


def test_promtool_accepts_the_scrape_configuration_and_its_rules() -> None:
    promtool("check", "config", str(SHIPPED_CONFIG))
    promtool("check", "rules", str(SHIPPED_RULES))


def test_the_alert_rules_pass_their_promtool_unit_tests() -> None:
    assert "SUCCESS" in promtool("test", "rules", str(SHIPPED_RULE_TESTS)).stdout


def test_every_alert_compares_a_signal_with_a_number_and_tells_the_operator_what_to_do() -> None:
    rules = shipped_alert_rules()
    assert {rule["alert"] for rule in rules} >= {
        "OrdersProjectionLagging",
        "OrdersProjectionHalted",
        "OrdersParkedEventsGrowing",
        "OrdersProjectionsUnassigned",
        "OrdersWriterFenced",
        "OrdersWriterNotReady",
        "OrdersHttpServerErrors",
        "OrdersHttpOverloaded",
    }
    for rule in rules:
        split_comparison(rule["expr"])
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert "docs/" in rule["annotations"]["description"] + rule["annotations"].get(
            "runbook", ""
        ), f"{rule['alert']} points at no documentation"
    lagging = next(r for r in rules if r["alert"] == "OrdersProjectionLagging")
    assert "orders_projection_lag_seconds" in lagging["expr"]
    assert lagging["for"] == "5m"


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    # promtool has no offline PromQL check of its own: each query becomes a recording rule.
    expressions = dashboard_expressions(rate_interval="1m")
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": expr}
                    for i, (_, expr) in enumerate(expressions)
                ],
            }
        ]
    }
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump(rules))
    promtool("check", "rules", str(tmp_path / "dashboard.yml"))


def test_every_dashboard_panel_says_what_it_answers_and_uses_the_provisioned_source() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    datasource = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["description"].rstrip().endswith(("?", ".")), panel["title"]
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource["uid"], panel["title"]


@pytest.fixture(scope="module")
def compose() -> dict[str, object]:
    return yaml.safe_load(COMPOSE.read_text())  # type: ignore[no-any-return]


def test_compose_runs_prometheus_and_grafana_with_the_files_of_deploy(compose: dict) -> None:  # type: ignore[type-arg]
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (COMPOSE.parent / source).exists(), f"{name}: {source}"
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana")


def test_compose_serves_metrics_where_the_scrape_configuration_looks(compose: dict) -> None:  # type: ignore[type-arg]
    services = compose["services"]
    scrape = {
        job["job_name"]: job["static_configs"][0]["targets"]
        for job in yaml.safe_load(SHIPPED_CONFIG.read_text())["scrape_configs"]
    }
    api_env = services["api"]["environment"]
    assert scrape["orders-api"] == [f"api:{api_env['ORDERS_METRICS_PORT']}"]
    projector = services["projector"]["command"]
    port = projector[projector.index("--metrics-port") + 1]
    assert scrape["orders-projector"] == [f"projector:{port}"]
    # Reachable from the Prometheus container: not only the service's own loopback.
    assert api_env["ORDERS_METRICS_HOST"] == "0.0.0.0"
    assert services["projector"]["environment"]["ORDERS_METRICS_HOST"] == "0.0.0.0"


def test_compose_runs_the_broker_version_the_embedded_broker_runs(compose: dict) -> None:  # type: ignore[type-arg]
    assert compose["services"]["kafka"]["image"] == f"apache/kafka:{KAFKA_VERSION}"


def test_compose_keeps_the_superuser_to_init_and_migrate_and_reads_passwords_from_secrets(
    compose: dict,  # type: ignore[type-arg]
) -> None:
    services, secrets = compose["services"], compose["secrets"]
    superuser = services["postgres"]["environment"]["POSTGRES_USER"]
    for name, variable, login in (
        ("migrate", "DATABASE_URL", superuser),
        ("api", "ORDERS_API_DATABASE_URL", "orders_api_login"),
        ("projector", "ORDERS_PROJECTOR_DATABASE_URL", "orders_projector_login"),
    ):
        env = services[name]["environment"]
        url = make_url(env[variable])
        assert url.username == login, name
        assert url.password is None, f"{name}: a password in the compose file"
        assert "DATABASE_URL" not in env or name == "migrate", f"{name} falls back to the superuser"
        secret = env["ORDERS_DATABASE_PASSWORD_FILE"].removeprefix("/run/secrets/")
        assert services[name]["secrets"] == [secret], name
        assert (COMPOSE.parent / secrets[secret]["file"]).parent.is_dir(), secret
    assert "--create-roles" in services["migrate"]["command"]
    postgres = services["postgres"]
    assert "POSTGRES_PASSWORD" not in postgres["environment"]
    for variable, value in postgres["environment"].items():
        if variable.endswith("_FILE"):
            assert value.removeprefix("/run/secrets/") in postgres["secrets"], variable
    init = next(v for v in postgres["volumes"] if v.endswith(":/docker-entrypoint-initdb.d:ro"))
    script = (COMPOSE.parent / init.split(":")[0] / "10-orders-logins.sh").read_text()
    for role in (
        OWNER_ROLE,
        PROJECTOR_ROLE,
        API_ROLE,
        "orders_api_login",
        "orders_projector_login",
    ):
        assert f"CREATE ROLE {role} " in script, role
    # The secrets' folder keeps its files out of git and out of the image.
    ignored = (COMPOSE.parent / "deploy" / "secrets" / ".gitignore").read_text().split()
    assert ignored == ["*", "!.gitignore"]
    assert "deploy/secrets" in (COMPOSE.parent / ".dockerignore").read_text().split()


def test_compose_creates_the_topic_before_the_api_and_the_projector_start(compose: dict) -> None:  # type: ignore[type-arg]
    services = compose["services"]
    assert services["topic"]["command"] == ["orders", "topic", "create"]
    assert services["kafka"]["environment"]["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    for name in ("api", "projector"):
        assert services[name]["depends_on"]["topic"] == {
            "condition": "service_completed_successfully"
        }, name
