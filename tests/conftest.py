"""Fixtures: a real Kafka broker and a real PostgreSQL server for the whole run.

They come from the same module as ``orders dev`` (``service.infra.embedded``): started here unless
``KAFKA_BOOTSTRAP_SERVERS`` / ``DATABASE_URL`` point at running ones, or, with
``ORDERS_TEST_DOCKER=1``, from testcontainers (without a Docker engine the run stops at
once, saying so). Each test module gets a
fresh database; each test that asks for ``topic`` gets a topic name nobody else uses.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from service.infra.database import create_engine, migrate
from service.infra.embedded.kafka import run_coroutine
from service.infra.embedded.stack import Infrastructure, infrastructure
from tests.support.database import admin, reset_read_side


def _docker_engine_problem() -> str | None:
    """Why no Docker engine answers, or None when one does."""
    try:
        import docker

        docker.from_env().ping()
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


@contextlib.contextmanager
def _testcontainers() -> Iterator[Infrastructure]:
    from testcontainers.kafka import KafkaContainer
    from testcontainers.postgres import PostgresContainer

    with (
        KafkaContainer("apache/kafka:4.1.0").with_kraft() as kafka,
        PostgresContainer("postgres:17", driver="asyncpg") as postgres,
    ):
        yield Infrastructure(kafka.get_bootstrap_server(), postgres.get_connection_url())


@pytest.fixture(scope="session")
def infra() -> Iterator[Infrastructure]:
    if os.environ.get("ORDERS_TEST_DOCKER") == "1":
        # Asked for containers: never quietly run on the embedded servers instead.
        problem = _docker_engine_problem()
        if problem is not None:
            pytest.exit(
                f"ORDERS_TEST_DOCKER=1 but no Docker engine answers ({problem[:200]}); start "
                "one, or unset ORDERS_TEST_DOCKER to test on the embedded Kafka and PostgreSQL",
                returncode=2,
            )
        with _testcontainers() as containers:
            yield containers
        return
    with infrastructure() as started:
        yield started


@pytest.fixture(scope="session")
def bootstrap(infra: Infrastructure) -> str:
    return infra.kafka_bootstrap_servers


@pytest.fixture(scope="module")
def database_url(infra: Infrastructure, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty database for this test module, dropped afterwards."""
    module = re.sub(r"\W", "_", request.module.__name__.rsplit(".", 1)[-1])[:40]
    name = f"t_{module}_{uuid.uuid4().hex[:8]}".lower()
    run_coroutine(admin(infra.database_url, f'CREATE DATABASE "{name}"'))
    yield make_url(infra.database_url).set(database=name).render_as_string(hide_password=False)
    run_coroutine(admin(infra.database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on the module's database, migrated to head, every read-model table empty."""
    engine = create_engine(database_url)
    await migrate(engine)
    await reset_read_side(engine)
    yield engine
    await engine.dispose()


@pytest.fixture
def topic() -> str:
    return f"test.orders.{uuid.uuid4().hex[:12]}"
