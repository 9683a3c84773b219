"""Settings read from the environment reach the part of the service they configure."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from service.edge import bootstrap
from service.edge.http.app import Resources
from service.infra.database import shown_url
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

    async def topic_with_partitions(settings: Settings) -> int:
        return 3

    def app_of(resources: Resources, **_: Any) -> Any:
        built.append(resources)
        raise _Built

    monkeypatch.setattr(bootstrap, "check_topic", topic_with_partitions)
    monkeypatch.setattr(bootstrap, "create_app", app_of)
    settings = Settings(kafka_bootstrap_servers="127.0.0.1:1", max_waiting_queries=7, auth=False)
    engine = create_async_engine("postgresql+asyncpg://nobody@127.0.0.1:1/none")  # never used

    with pytest.raises(_Built):
        await bootstrap._serve_with(
            {"api": engine}, settings, asyncio.Event(), bootstrap.ApiOptions(), False, None
        )

    assert [(r.max_waiting_queries, r.partitions) for r in built] == [(7, 3)]


def test_each_process_has_its_own_database_url_and_falls_back_to_database_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://owner@db/orders")
    monkeypatch.setenv("ORDERS_API_DATABASE_URL", "postgresql://api@db/orders")
    monkeypatch.delenv("ORDERS_PROJECTOR_DATABASE_URL", raising=False)
    monkeypatch.delenv("ORDERS_DATABASE_PASSWORD_FILE", raising=False)
    settings = Settings.from_env()

    assert settings.require_database("api") == "postgresql+asyncpg://api@db/orders"
    assert settings.require_database("projector") == "postgresql+asyncpg://owner@db/orders"
    assert settings.require_database() == "postgresql+asyncpg://owner@db/orders"


def test_a_missing_database_url_names_the_variables_to_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("DATABASE_URL", "ORDERS_API_DATABASE_URL", "ORDERS_PROJECTOR_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)

    with pytest.raises(SystemExit, match="ORDERS_PROJECTOR_DATABASE_URL or DATABASE_URL is not"):
        Settings.from_env().require_database("projector")


def test_the_password_comes_from_a_file_and_never_shows(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cr@t/pw\n")
    monkeypatch.setenv("ORDERS_DATABASE_PASSWORD_FILE", str(secret))
    monkeypatch.setenv("DATABASE_URL", "postgresql://owner@db:5432/orders?sslmode=require")
    monkeypatch.setenv("ORDERS_PROJECTOR_DATABASE_URL", "postgresql://projector:own@db/orders")
    monkeypatch.delenv("ORDERS_API_DATABASE_URL", raising=False)
    settings = Settings.from_env()

    url = settings.require_database()
    assert make_url(url).password == "s3cr@t/pw"
    assert make_url(url).query == {"sslmode": "require"}
    assert make_url(settings.require_database("projector")).password == "own"  # its own wins
    assert "s3cr" not in shown_url(url)


@pytest.mark.parametrize(
    ("content", "url", "message"),
    [
        (None, "postgresql://owner@db/orders", "cannot read it"),
        ("", "postgresql://owner@db/orders", "is empty"),
        ("pw", "postgresql://db/orders", "names no user"),
    ],
)
def test_a_password_file_that_cannot_be_used_gets_one_line_saying_what_to_do(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    content: str | None,
    url: str,
    message: str,
) -> None:
    secret = tmp_path / "password"
    if content is not None:
        secret.write_text(content)
    monkeypatch.setenv("ORDERS_DATABASE_PASSWORD_FILE", str(secret))
    monkeypatch.setenv("DATABASE_URL", url)

    with pytest.raises(SystemExit, match=message) as raised:
        Settings.from_env()
    assert "\n" not in str(raised.value)
