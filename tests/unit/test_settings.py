"""Settings read from the environment reach the part of the service they configure."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from service.edge import bootstrap
from service.edge.http.app import Resources
from service.infra.topic import TopicFacts
from service.kernel.settings import Settings


@pytest.mark.parametrize(("value", "expected"), [(None, 1000), ("", 1000), ("7", 7)])
def test_the_cap_on_waiting_queries_is_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, value: str | None, expected: int
) -> None:
    if value is None:
        monkeypatch.delenv("ORDERS_MAX_WAITING_QUERIES", raising=False)
    else:
        monkeypatch.setenv("ORDERS_MAX_WAITING_QUERIES", value)

    assert Settings.from_env().max_waiting_queries == expected


class _Built(Exception):
    """Stops the composition root once it has built the app (nothing is served)."""


async def test_the_api_gets_the_cap_on_waiting_queries_from_the_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    built: list[Resources] = []

    async def topic_with_partitions(settings: Settings) -> TopicFacts:
        return TopicFacts(
            name=settings.topic,
            topic_id=uuid.uuid4(),
            partitions=3,
            replication_factor=1,
            min_in_sync=1,
            brokers=1,
        )

    def app_of(resources: Resources, **_: Any) -> Any:
        built.append(resources)
        raise _Built

    monkeypatch.setattr(bootstrap, "topic_of", topic_with_partitions)
    monkeypatch.setattr(bootstrap, "create_app", app_of)
    settings = Settings(kafka_bootstrap_servers="127.0.0.1:1", max_waiting_queries=7, auth=False)
    engine = create_async_engine("postgresql+asyncpg://nobody@127.0.0.1:1/none")  # never used

    with pytest.raises(_Built):
        await bootstrap._serve_with(
            {"api": engine}, settings, asyncio.Event(), bootstrap.ApiOptions(), False, None
        )

    assert [(r.max_waiting_queries, r.partitions) for r in built] == [(7, 3)]
