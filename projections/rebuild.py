"""Rebuilding read models from the log, without taking queries down.

Blue/green (the default): each named projection gets a new version, built into its own tables
from offset 0 by one consumer (events decoded once for all of them) with bulk settings, while
the live version keeps serving queries and following new events. Once a new version has
caught up, its secondary indexes are built and one transaction makes it live (views
repointed); the old version's tables are then dropped, or kept with ``keep_old``.

Interrupted at any moment (``stop``, checked before each index build and each switch),
readers of every projection not switched yet stay on its old, complete version: the building
version and its checkpoints stay in the database, and the next run resumes it (or, with
``restart``, drops it and starts over).

One rebuild of a projection at a time: each run holds a lock per projection (a Postgres
advisory lock) until it ends, and a second run is refused at once, saying who holds it.

In place (``in_place``): stop-the-world. One transaction empties the live tables and puts the
checkpoints back to 0; then the log is replayed into them, up to the last event committed when
the replay began. Readers see the read model refill.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from projections import metrics
from projections.models import catalog
from projections.projection import Projection, Target, begin
from projections.replay_progress import Progress, Tracker
from projections.runner import ProjectionRunner, RunnerConfig
from projections.versions import (
    NotCaughtUp,
    build_indexes,
    building,
    create_building,
    drop,
    live_targets,
    reset,
    switch,
)
from service.infra.database import driver_of
from service.infra.runtime import die_with_parent
from service.kernel.errors import OperatorRefusal

_log = logging.getLogger(__name__)

# A new version within this many events of the end is close enough to build its indexes and
# try the switch (which itself insists on having applied at least what the live one has).
CATCH_UP_EVENTS = 1000
BULK_BATCH = 20_000
SWITCH_ATTEMPTS_S = 60.0
# How long a builder process gets to stop on SIGTERM before it is killed.
BUILDER_EXIT_S = 30.0
# A rebuild holds pg_advisory_lock(REBUILD_LOCK_SPACE, hashtext(projection)) per projection.
REBUILD_LOCK_SPACE = 0x52424C44  # "RBLD": keeps these keys apart from other advisory locks


class RebuildInterrupted(Exception):
    """Stopped before the end: readers of every projection not switched yet stay on its old
    version (the message names those already switched); run again to resume."""


class RebuildAlreadyRunning(OperatorRefusal):
    """Refused before starting: another rebuild of one of the projections is running."""


@dataclass
class RebuildResult:
    projections: list[str]
    in_place: bool
    seconds: float = 0.0
    events: int = 0  # events this process applied, summed over the rebuilt projections
    topic_events: int = 0  # the topic's events read (each applied to every projection)
    switched: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    builder_exit_codes: list[int | None] = field(default_factory=list)  # of ``workers - 1``

    @property
    def rate(self) -> float:
        return self.topic_events / self.seconds if self.seconds else 0.0


def bulk(config: RunnerConfig, batch: int = BULK_BATCH) -> RunnerConfig:
    """Settings for replaying the log: bigger batches and fetches, COPY for append-only rows."""
    return replace(
        config,
        copy_append_only=True,
        batch_max_records=batch,
        batch_wait_ms=max(config.batch_wait_ms, 200),
        max_partition_fetch_bytes=max(config.max_partition_fetch_bytes, 16 * 1024 * 1024),
    )


async def rebuild(
    engine: AsyncEngine,
    config: RunnerConfig,
    names: Sequence[str],
    *,
    in_place: bool = False,
    keep_old: bool = False,
    restart: bool = False,
    on_progress: Callable[[Progress], None] | None = None,
    stop: asyncio.Event | None = None,
    tick_s: float = 1.0,
    batch: int = BULK_BATCH,
    workers: int = 1,
) -> RebuildResult:
    """Rebuild the named projections (see the module's docstring); returns what it did.

    ``workers`` > 1 (blue/green only): that many processes replay, this one and
    ``workers - 1`` builder processes (``orders projections build``) in the same consumer
    group, each applying its share of the partitions, so a replay uses more than one core.
    """
    projections = catalog.select(list(names))
    async with _one_rebuild_at_a_time(engine, [p.name for p in projections]):
        stop = stop or asyncio.Event()
        report = _exporting(on_progress or (lambda progress: None))
        started = time.monotonic()
        result = RebuildResult([p.name for p in projections], in_place)
        if in_place:
            targets = await _reset_in_place(engine, projections)
            runner = ProjectionRunner(projections, engine, bulk(config, batch))
            pairs: dict[str, tuple[Target, Target]] = {}
        else:
            pairs = await _prepare(engine, projections, restart=restart)
            targets = [new for _, new in pairs.values()]
            runner = ProjectionRunner(projections, engine, bulk(config, batch), building=True)
        runner_stop = asyncio.Event()
        task = asyncio.create_task(runner.run(runner_stop), name="rebuild-runner")
        helpers = 0 if in_place else workers - 1
        try:
            names = [p.name for p in projections]
            async with (
                _builders(engine, config, names, batch, helpers) as builders,
                Tracker(engine, config, targets) as tracker,
            ):
                await _until_done(
                    tracker, task, pairs, stop, report, result, keep_old=keep_old, tick_s=tick_s
                )
                result.topic_events = (tracker.last[1] if tracker.last else 0) - (
                    tracker.first_position or 0
                )
            result.builder_exit_codes = [builder.returncode for builder in builders]
        finally:
            runner_stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        result.seconds = time.monotonic() - started
        result.events = runner.stats.events
        return result


def _exporting(report: Callable[[Progress], None]) -> Callable[[Progress], None]:
    """``report``, after setting the rebuild's gauges from the same figures."""

    def exported(progress: Progress) -> None:
        for name, replayed in progress.projections.items():
            done = progress.phase == "done" or replayed.position >= replayed.end
            eta = 0.0 if done else replayed.eta_s
            metrics.show_rebuild(
                name,
                replayed.position,
                replayed.end,
                replayed.rate,
                math.nan if eta is None else eta,
            )
        report(progress)

    return exported


@contextlib.asynccontextmanager
async def _one_rebuild_at_a_time(engine: AsyncEngine, names: Sequence[str]) -> AsyncIterator[None]:
    """Hold each projection's rebuild lock (a session-level advisory lock, on a connection of
    its own) for the whole run; another rebuild of one of them is refused at once
    (``RebuildAlreadyRunning``). A rebuild that dies takes its session, and its locks, along."""
    async with engine.connect() as held:
        try:
            connection = await driver_of(held)
            holder = f"orders rebuild pid {os.getpid()} on {socket.gethostname()}"
            await connection.execute("SELECT set_config('application_name', $1, false)", holder)
            for name in names:
                if not await connection.fetchval(
                    "SELECT pg_try_advisory_lock($1, hashtext($2))", REBUILD_LOCK_SPACE, name
                ):
                    raise RebuildAlreadyRunning(await _already_running(connection, name))
            yield
        finally:
            await held.invalidate()  # closing the session releases its locks, whatever happened


async def _already_running(connection: asyncpg.Connection, name: str) -> str:
    """What an operator needs to know about the rebuild of ``name`` that holds its lock."""
    row = await connection.fetchrow(
        "SELECT a.application_name, a.client_addr, a.backend_start FROM pg_locks l "
        "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
        "AND l.classid = $1::int::oid AND l.objid = hashtext($2)::oid AND l.objsubid = 2",
        REBUILD_LOCK_SPACE,
        name,
    )
    if row is None:  # it ended meanwhile
        return f"a rebuild of {name} was running a moment ago: run this again"
    since = row["backend_start"].astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (
        f"a rebuild of {name} is already running ({row['application_name'] or 'unnamed'}, "
        f"from {row['client_addr'] or 'a local socket'}, since {since}): wait for it to end, "
        "or stop it (Ctrl-C, or SIGTERM to that pid) and run this again to resume its work"
    )


@contextlib.asynccontextmanager
async def _builders(
    engine: AsyncEngine, config: RunnerConfig, names: Sequence[str], batch: int, count: int
) -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """``count`` builder processes (``orders projections build``) for the versions being
    built, in this rebuild's consumer group. On the way out (switched, interrupted or failed)
    they get SIGTERM, a graceful stop: each finishes or rolls back its batch and exits; a
    batch after the switch would find its version live and change nothing."""
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": str(config.kafka),
        "DATABASE_URL": engine.url.render_as_string(hide_password=False),
        "ORDERS_TOPIC": config.topic,
        "ORDERS_GROUP_PREFIX": config.group_prefix,
    }
    env.pop("ORDERS_PROJECTOR_INSTANCE_ID", None)  # a static member id is one process's
    argv = [sys.executable, "-m", "service.edge.cli.main", "projections", "build", *names]
    processes = [
        await asyncio.create_subprocess_exec(
            *argv,
            "--batch",
            str(batch),
            env=env,
            stdin=subprocess.DEVNULL,
            # A rebuild killed with -9 takes its builders with it (SIGTERM: graceful).
            preexec_fn=die_with_parent if sys.platform == "linux" else None,
        )
        for _ in range(count)
    ]
    if processes:
        _log.info("%d builder process(es) started: %s", count, [p.pid for p in processes])
    try:
        yield processes
    finally:
        for process in processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                await asyncio.wait_for(process.wait(), BUILDER_EXIT_S)
            except TimeoutError:
                process.kill()
                await process.wait()
            if process.returncode not in (0, -signal.SIGTERM):
                _log.warning("builder process %d exited with %s", process.pid, process.returncode)


async def _reset_in_place(engine: AsyncEngine, projections: Sequence[Projection]) -> list[Target]:
    async with begin(engine) as connection:
        targets = await live_targets(connection, projections)
        for target in targets:
            await reset(connection, target)
    _log.info("emptied %s and reset their checkpoints", ", ".join(map(str, targets)))
    return targets


async def _prepare(
    engine: AsyncEngine, projections: Sequence[Projection], *, restart: bool
) -> dict[str, tuple[Target, Target]]:
    """(live, new) per projection: a resumed building version, or a fresh one."""
    pairs = {}
    async with begin(engine) as connection:
        for projection in projections:
            (live,) = await live_targets(connection, [projection])
            new = await building(connection, projection)
            if new is not None and restart:
                _log.info("dropping %s, left by an earlier rebuild (--restart)", new)
                await drop(connection, new)
                new = None
            if new is None:
                new = await create_building(connection, live)
                _log.info("building %s next to %s", new, live)
            else:
                _log.info("resuming the build of %s (left by an earlier rebuild)", new)
            pairs[projection.name] = (live, new)
    return pairs


async def _until_done(
    tracker: Tracker,
    task: asyncio.Task[None],
    pairs: dict[str, tuple[Target, Target]],
    stop: asyncio.Event,
    report: Callable[[Progress], None],
    result: RebuildResult,
    *,
    keep_old: bool,
    tick_s: float,
) -> None:
    pending = dict(pairs)
    in_place = not pairs
    goal = await tracker.replay_goal(stop) if in_place else {}
    if stop.is_set():  # a goal cut short is no goal
        raise _interrupted(result, list(pending))
    while True:
        if task.done():
            task.result()  # a failure surfaces here
            if pending or in_place:
                raise RuntimeError("the rebuild's runner stopped before the rebuild was done")
        lags, position, end = await tracker.lags()
        if in_place and await tracker.replayed(goal):
            report(tracker.progress("done", position, end))
            return
        report(tracker.progress("replaying", position, end))
        if stop.is_set():
            raise _interrupted(result, list(pending))
        for name in [n for n in pending if lags[n] <= CATCH_UP_EVENTS]:
            live, new = pending[name]
            not_switched = await _index_and_switch(tracker, live, new, stop, report)
            if not_switched is not None:
                raise _interrupted(result, list(pending), not_switched)
            del pending[name]
            result.switched.append(str(new))
            if not keep_old:
                async with begin(tracker.engine) as connection:
                    await drop(connection, live)
                result.dropped.append(str(live))
        if not pending and not in_place:
            report(tracker.progress("done", position, end))
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), tick_s)


def _interrupted(
    result: RebuildResult, remaining: Sequence[str], reason: str = "interrupted"
) -> RebuildInterrupted:
    """What an operator needs to hear about a rebuild that stopped before the end."""
    if result.in_place:
        return RebuildInterrupted(
            f"{reason}: the in-place rebuild left partial tables: run it again"
        )
    if not result.switched:
        return RebuildInterrupted(
            f"{reason}: readers stay on the live versions; run the same rebuild again to resume it"
        )
    return RebuildInterrupted(
        f"{reason} after switching {', '.join(result.switched)} (readers now see them); readers "
        f"of {', '.join(remaining)} stay on their live versions: run "
        f"`orders projections rebuild {' '.join(remaining)}` to resume them"
    )


async def _index_and_switch(
    tracker: Tracker,
    live: Target,
    new: Target,
    stop: asyncio.Event,
    report: Callable[[Progress], None],
) -> str | None:
    """Build ``new``'s secondary indexes, then switch once it has all that ``live`` has.

    Returns None once switched; otherwise why not (``stop`` was set, or ``new`` did not catch
    up in time), and then ``live`` still serves.
    """
    _, position, end = await tracker.lags()
    report(tracker.progress("indexing", position, end))
    if stop.is_set():
        return "interrupted"
    began = time.monotonic()
    async with begin(tracker.engine) as connection:
        count = await build_indexes(connection, live, new)
    _log.info("%s: %d index(es) built in %.1fs", new, count, time.monotonic() - began)
    report(tracker.progress("switching", position, end))
    deadline = time.monotonic() + SWITCH_ATTEMPTS_S
    while not stop.is_set():
        try:
            async with begin(tracker.engine) as connection:
                await switch(connection, live, new, tracker.config.topic)
            _log.info("%s is live; readers switched from %s", new, live)
            return None
        except NotCaughtUp as behind:
            if time.monotonic() > deadline:
                return str(behind)
            _, position, end = await tracker.lags()
            report(tracker.progress("switching", position, end))
            # The new version's runner is applying meanwhile: check again in a moment.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)
    return "interrupted"
