"""Projector throughput: every projection, in a process of its own, from offset 0 of a topic.

The projector runs as production runs it (``projections.runner.run_projector`` in its own
process, see ``benchmarks.projector_process``); this process only watches the checkpoint table
and turns checkpoints into "events applied" with the offsets the fill recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
import uuid
from bisect import bisect_left
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen

import asyncpg
import psutil
import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from projections.checkpoints import live_checkpoints
from projections.models.catalog import PROJECTIONS
from service.infra.database import create_engine, migrate
from service.infra.embedded import spawn, stop_process

SAMPLE_EVERY_S = 0.5


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


# -- where the projections stand --------------------------------------------------------------


async def read_checkpoints(engine: AsyncEngine, topic: str) -> dict[tuple[str, int], int]:
    """(projection, partition) -> next offset to apply, for ``topic``, of the live versions.

    The one place that knows the checkpoint table: adapt it here when that table changes.
    """
    async with engine.connect() as connection:
        result = await connection.execute(sa.select(live_checkpoints(topic)))
        return {(row.projection, row.partition): row.next_offset for row in result}


def events_applied(
    checkpoints: dict[tuple[str, int], int], offsets: dict[int, list[int]], projection: str
) -> int:
    """How many of the records at ``offsets`` lie before ``projection``'s checkpoints.

    Counted from the records' own offsets, as transaction markers occupy offsets too.
    """
    return sum(
        bisect_left(partition_offsets, checkpoints.get((projection, partition), 0))
        for partition, partition_offsets in offsets.items()
    )


# -- the projector process ----------------------------------------------------------------------


@contextlib.contextmanager
def projector_process(
    *,
    bootstrap: str,
    database_url: str,
    topic: str,
    log_file: Path,
    group_prefix: str | None = None,
) -> Iterator[Popen[bytes]]:
    """``run_projector`` (all projections) in a child process; SIGTERM and reaped on exit.

    Processes given the same ``group_prefix`` share the partitions (one consumer group).
    """
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "DATABASE_URL": database_url,
        "ORDERS_TOPIC": topic,
        "ORDERS_GROUP_PREFIX": group_prefix or f"bench-{uuid.uuid4().hex[:8]}",
    }
    env.pop("ORDERS_PROJECTOR_INSTANCE_ID", None)
    process = spawn(
        [sys.executable, "-m", "benchmarks.projector_process"], log_file=log_file, env=env
    )
    try:
        yield process
    finally:
        stop_process(process, grace_seconds=30)


class _LogWatch:
    """Reads what a child process appended to its log since the last look."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.position = path.stat().st_size if path.exists() else 0

    def new_lines(self) -> list[str]:
        with self.path.open("rb") as log:
            log.seek(self.position)
            data = log.read()
        self.position += len(data)
        return data.decode(errors="replace").splitlines()


@dataclass
class ProjectorRun:
    """How an all-projection run went: progress samples, when each projection caught up."""

    events: int
    timeout: float
    projections: int
    samples: list[tuple[float, int]] = field(default_factory=list)  # (s since start, applied)
    # The same instants, events applied averaged over the projections (smoother to plot:
    # the slowest projection moves in steps of whole batches).
    mean_samples: list[tuple[float, int]] = field(default_factory=list)
    caught_up: dict[str, float] = field(default_factory=dict)
    rss_bytes_samples: list[int] = field(default_factory=list)

    @property
    def applied(self) -> int:
        """Events that every projection has applied (the slowest one's count)."""
        return self.samples[-1][1] if self.samples else 0

    @property
    def seconds(self) -> float:
        """Until the last projection caught up (or until the run was given up)."""
        return self.samples[-1][0] if self.samples else 0.0

    @property
    def finished(self) -> bool:
        return len(self.caught_up) == self.projections

    @property
    def first_progress_seconds(self) -> float:
        return next((t for t, applied in self.samples if applied > 0), self.seconds)

    def overall_per_second(self) -> float:
        """Events applied by all projections over the whole run, start-up included."""
        return self.applied / self.seconds if self.seconds > 0 else 0.0

    def time_at(self, applied: float) -> float | None:
        """When ``applied`` events had been applied (linear between samples)."""
        previous = (0.0, 0)
        for sample in self.samples:
            if sample[1] >= applied:
                (t0, a0), (t1, a1) = previous, sample
                return t1 if a1 == a0 else t0 + (t1 - t0) * (applied - a0) / (a1 - a0)
            previous = sample
        return None

    def sustained_per_second(self, low: float = 0.1, high: float = 0.9) -> float:
        """The rate between ``low`` and ``high`` of the events: no start-up, no tail."""
        target = self.events if self.finished else self.applied
        start, end = self.time_at(low * target), self.time_at(high * target)
        if start is None or end is None or end <= start:
            return 0.0
        return (high - low) * target / (end - start)

    def rates(self, window: float = 2.0) -> list[tuple[float, float]]:
        """Events/s over time, averaged over the projections."""
        return rates(self.mean_samples, window)


def rates(samples: Sequence[tuple[float, int]], window: float = 1.0) -> list[tuple[float, float]]:
    """(time, events/s over the preceding ``window`` s) from (time, events done) samples."""
    points = []
    anchor = 0
    for t, done in samples:
        while samples[anchor][0] < t - window:
            anchor += 1
        t0, done0 = samples[anchor]
        if t > t0:
            points.append((t, (done - done0) / (t - t0)))
    return points


async def follow(
    engine: AsyncEngine,
    *,
    topic: str,
    offsets: dict[int, list[int]],
    process: Popen[bytes],
    log_file: Path,
    timeout: float,
    names: Sequence[str] = tuple(PROJECTIONS),
    others: Sequence[tuple[Popen[bytes], Path]] = (),
) -> ProjectorRun:
    """Sample the checkpoints until every projection has applied every record (or timeout).

    Raises if a projector process (``process`` or one of ``others``, the same group) dies or
    a projection halts; on timeout returns the partial run (``finished`` False), which is
    reported as such. RSS is sampled for ``process``.
    """
    events = sum(len(partition_offsets) for partition_offsets in offsets.values())
    run = ProjectorRun(events, timeout, len(names))
    watched = [(process, log_file, _LogWatch(log_file))]
    watched += [(other, path, _LogWatch(path)) for other, path in others]
    child = psutil.Process(process.pid)
    started = time.perf_counter()
    while not run.finished:
        now = time.perf_counter() - started
        for each, path, watch in watched:
            if each.poll() is not None:
                raise RuntimeError(f"a projector exited with {each.returncode}; see {path}")
            halted = [line for line in watch.new_lines() if "HALTED" in line]
            if halted:
                raise RuntimeError(f"a projection halted: {halted[0][-300:]}")
        stored = await read_checkpoints(engine, topic)
        applied = {name: events_applied(stored, offsets, name) for name in names}
        for name, count in applied.items():
            if count >= events and name not in run.caught_up:
                run.caught_up[name] = now
        run.samples.append((now, min(applied.values())))
        run.mean_samples.append((now, sum(applied.values()) // len(applied)))
        with contextlib.suppress(psutil.Error):
            run.rss_bytes_samples.append(child.memory_info().rss)
        if now > timeout:
            break
        await asyncio.sleep(SAMPLE_EVERY_S)  # the sampling interval of the throughput plot
    return run
