"""Fixtures shared by the integration tests of the read side: a writer on the test's topic
(four partitions), the module's database emptied, and names nobody else uses."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from service.edge.http.app import Resources, create_app
from service.write.writer import Writer
from tests.support.http import serve
from tests.support.identity import access
from tests.support.projection_harness import Api, clear_read_models
from tests.support.topics import new_topic
from tests.support.writers import started_writer

PARTITIONS = 4


@pytest.fixture
async def db(engine: AsyncEngine) -> AsyncEngine:
    """The module's database with every read model and checkpoint emptied."""
    await clear_read_models(engine)
    return engine


@pytest.fixture
def group_prefix(request: pytest.FixtureRequest) -> str:
    """A consumer-group prefix of this test's own."""
    return f"test-{request.module.__name__.rsplit('_', 1)[-1]}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def suffix() -> str:
    """Makes customer ids unique per test."""
    return uuid.uuid4().hex[:6]


@pytest.fixture
async def writer(bootstrap: str, topic: str) -> AsyncIterator[Writer]:
    """The single writer on the test's topic, four partitions."""
    await new_topic(bootstrap, topic, PARTITIONS)
    async with started_writer(bootstrap, topic) as writer:
        yield writer


@pytest.fixture
async def api(writer: Writer, db: AsyncEngine, topic: str) -> AsyncIterator[Api]:
    """The command and query endpoints, over the ASGI app, remembering accepted commands."""
    app = create_app(Resources(writer=writer, engine=db, topic=topic), access=access())
    async with serve(app) as client:
        yield Api(client)
