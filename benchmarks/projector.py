"""Projector throughput: all projections, in-process, from offset 0 of a filled topic."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg  # type: ignore[import-untyped]
import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from projections.catalog import PROJECTIONS
from projections.runner import ProjectionRunner, RunnerConfig
from projections.schema import projection_checkpoints
from service.database import create_engine, migrate

POLL_S = 0.1


def asyncpg_dsn(url: str) -> str:
    """The plain ``postgresql://`` form of a SQLAlchemy URL, for asyncpg.connect."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@contextlib.asynccontextmanager
async def fresh_database(server_url: str) -> AsyncIterator[str]:
    """CREATE DATABASE on the infrastructure's server, migrated; yields its SQLAlchemy URL."""
    name = f"bench_{uuid.uuid4().hex[:10]}"
    admin_dsn = asyncpg_dsn(str(make_url(server_url).set(database="postgres")))
    connection = await asyncpg.connect(admin_dsn, timeout=30)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close(timeout=10)
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    engine = create_engine(url, pool_size=2)
    try:
        async with asyncio.timeout(120):
            await migrate(engine)
    finally:
        await engine.dispose()
    yield url


async def warm_group_coordinator(bootstrap: str, topic: str, *, timeout: float = 60) -> None:
    """Join (and leave) a throw-away consumer group, so the broker creates its offsets topic.

    That happens once per cluster, on the first group ever; it is not the projector's cost.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=f"bench-warm-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False,
        auto_offset_reset="latest",
    )
    async with asyncio.timeout(timeout):
        await consumer.start()
        try:
            consumer.subscribe([topic])
            while not consumer.assignment():
                await consumer.getmany(timeout_ms=200, max_records=1)
        finally:
            await consumer.stop()


@dataclass
class ProjectorResult:
    events: int
    seconds: float
    first_checkpoint_seconds: float
    rows_written: int
    batches: int
    per_projection_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    @property
    def after_first_checkpoint_per_second(self) -> float:
        """The rate once the groups have joined and the first batch is in (an upper bound)."""
        busy = self.seconds - self.first_checkpoint_seconds
        return self.events / busy if busy > 0 else 0.0


async def _checkpoints(engine: AsyncEngine, topic: str) -> dict[tuple[str, int], int]:
    table = projection_checkpoints
    async with engine.connect() as connection:
        result = await connection.execute(
            sa.select(table.c.projection, table.c.partition, table.c.next_offset).where(
                table.c.topic == topic
            )
        )
        return {(row.projection, row.partition): row.next_offset for row in result}


async def run_projections(
    bootstrap: str,
    database_url: str,
    topic: str,
    *,
    events: int,
    last_offsets: dict[int, int],
    timeout: float,
) -> ProjectorResult:
    """Run every projection until each checkpoint passed each partition's last record."""
    engine = create_engine(database_url, pool_size=8)
    stop = asyncio.Event()
    config = RunnerConfig(
        bootstrap_servers=bootstrap, topic=topic, group_prefix=f"bench-{uuid.uuid4().hex[:8]}"
    )
    runners = [ProjectionRunner(projection, engine, config) for projection in PROJECTIONS.values()]
    tasks: list[asyncio.Task[None]] = []
    done_at: dict[str, float] = {}
    first = 0.0
    try:
        started = time.perf_counter()
        tasks = [
            asyncio.create_task(runner.run(stop), name=f"bench-{runner.name}") for runner in runners
        ]
        deadline = started + timeout
        while len(done_at) < len(runners):
            if time.perf_counter() > deadline:
                raise TimeoutError(
                    f"projections not caught up after {timeout:.0f}s: "
                    f"{sorted(set(PROJECTIONS) - set(done_at))} still behind"
                )
            for task in tasks:
                if task.done():
                    task.result()  # re-raises a crash
                    raise RuntimeError(f"{task.get_name()} ended by itself")
            for runner in runners:
                if runner.halted:
                    raise RuntimeError(f"{runner.name} halted: {runner.halted}")
            stored = await _checkpoints(engine, topic)
            now = time.perf_counter()
            if not first and any(offset > 0 for offset in stored.values()):
                first = now - started
            for runner in runners:
                if runner.name not in done_at and all(
                    stored.get((runner.name, partition), 0) > last
                    for partition, last in last_offsets.items()
                ):
                    done_at[runner.name] = now - started
            await asyncio.sleep(POLL_S)  # the brief's polling interval
        seconds = max(done_at.values())
    finally:
        stop.set()
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=30)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await engine.dispose()
    return ProjectorResult(
        events=events,
        seconds=seconds,
        first_checkpoint_seconds=first,
        rows_written=sum(runner.stats.rows_written for runner in runners),
        batches=sum(runner.stats.batches for runner in runners),
        per_projection_seconds=done_at,
    )
