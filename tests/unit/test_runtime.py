"""How each kind of process sets up Python's cyclic garbage collector."""

from __future__ import annotations

import argparse
import gc
from collections.abc import Iterator
from typing import Any

import pytest

from projections.batches import Kept
from service.edge.cli import operations
from service.edge.cli import serving as cli
from service.infra.runtime import BATCH_YOUNG_GENERATION_THRESHOLD, YOUNG_GENERATION_THRESHOLD
from service.kernel.settings import Settings


@pytest.fixture(autouse=True)
def restored_gc() -> Iterator[None]:
    saved = gc.get_threshold()
    yield
    gc.set_threshold(*saved)
    gc.unfreeze()


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings that name a broker and a database without either being asked to answer."""
    monkeypatch.setenv("DATABASE_URL", "postgresql+asyncpg://nobody@127.0.0.1:1/none")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")
    configured = Settings.from_env()
    monkeypatch.setattr(cli, "configured", lambda **_: configured)
    monkeypatch.setattr(operations, "configured", lambda **_: configured)
    return configured


@pytest.fixture
def served_with(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The young-generation threshold in force when the command's service started."""
    seen: list[int] = []

    async def serve(*_: Any, **__: Any) -> None:
        seen.append(gc.get_threshold()[0])

    monkeypatch.setattr(cli, "_serve", serve)
    return seen


def test_the_projector_collects_only_when_a_million_objects_pile_up(
    settings: Settings, served_with: list[int]
) -> None:
    cli.cmd_projector(argparse.Namespace(names=[]))
    assert served_with == [BATCH_YOUNG_GENERATION_THRESHOLD]


def test_rebuilds_and_other_database_jobs_collect_as_the_projector_does(
    settings: Settings,
) -> None:
    seen: list[int] = []

    async def job(_engine: Any, _settings: Settings) -> None:
        seen.append(gc.get_threshold()[0])

    operations.database_job(job)
    assert seen == [BATCH_YOUNG_GENERATION_THRESHOLD]


def test_the_api_keeps_collecting_its_young_objects_often(
    settings: Settings, served_with: list[int]
) -> None:
    cli.cmd_api(argparse.Namespace(host="127.0.0.1", port=1))
    assert served_with == [YOUNG_GENERATION_THRESHOLD]


def test_the_records_a_batch_keeps_are_never_tracked_by_the_collector() -> None:
    # A NamedTuple of the same values is tracked for as long as it lives (only plain tuples
    # are ever untracked), and was traversed by every young collection while its batch waited.
    assert not gc.is_tracked(Kept(7, b"order-1", b'{"type": "OrderCreated"}'))
