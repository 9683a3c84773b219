"""Comparing read-model tables with the oracle: a pure fold of every event in the topic."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from projections.projection import Projection
from projections.runner import oracle
from projections.schema import projection_checkpoints
from tests.support.log import LoggedEvent


def _normal(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in sorted(value.items())}
    if isinstance(value, list | tuple):
        return [_normal(v) for v in value]
    return value


async def table_rows(engine: AsyncEngine, table: sa.Table) -> list[dict[str, Any]]:
    async with engine.connect() as connection:
        result = await connection.execute(
            sa.select(table).order_by(*table.primary_key.columns))
        return [_normal(dict(row._mapping)) for row in result]


async def mismatches(engine: AsyncEngine, projection: Projection,
                     events: list[LoggedEvent]) -> dict[str, int]:
    """Per table of ``projection``: how many rows differ from the oracle (0 everywhere = equal)."""
    expected = oracle(projection, [e.applied() for e in events]).snapshot()
    differences = {}
    for table in projection.tables:
        keys = [column.name for column in table.primary_key.columns]
        actual = {tuple(row[k] for k in keys): row for row in await table_rows(engine, table)}
        wanted = {tuple(row[k] for k in keys): _normal(row) for row in expected[table.name]}
        differences[table.name] = sum(
            1 for key in actual.keys() | wanted.keys() if actual.get(key) != wanted.get(key))
    return differences


def end_offsets(events: list[LoggedEvent]) -> dict[int, int]:
    """Per partition, the offset after its last event: where a caught-up checkpoint stands."""
    ends: dict[int, int] = {}
    for logged in events:
        ends[logged.record.partition] = max(ends.get(logged.record.partition, 0),
                                            logged.record.offset + 1)
    return ends


async def wait_caught_up(engine: AsyncEngine, projections: list[str], topic: str,
                         ends: dict[int, int], *, timeout: float) -> None:
    """Poll the checkpoints until every projection has passed every partition's last event."""
    deadline = time.monotonic() + timeout
    table = projection_checkpoints
    while True:
        async with engine.connect() as connection:
            rows = (await connection.execute(
                sa.select(table.c.projection, table.c.partition, table.c.next_offset)
                .where(table.c.topic == topic))).all()
        stored = {(r.projection, r.partition): r.next_offset for r in rows}
        behind = {(name, p): (stored.get((name, p), 0), end)
                  for name in projections for p, end in ends.items()
                  if stored.get((name, p), 0) < end}
        if not behind:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"projections did not catch up: {behind}")
        await asyncio.sleep(0.1)  # pacing between checkpoint polls
