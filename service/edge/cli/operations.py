"""``orders projections ...``: operate the read models (status, rebuild, park, retry, skip).

Each command is a job on the configured database and broker, run by ``database_job``; what it
raises is explained by ``service.edge.cli.advice`` like every other command's errors.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec
from sqlalchemy.ext.asyncio import AsyncEngine

from projections.applying import VersionsChanged
from projections.models import catalog
from projections.parking import park, parked, retry, skip
from projections.rebuild import RebuildInterrupted, bulk, rebuild
from projections.runner import ProjectionRunner, runner_config
from projections.status import render, status
from service.edge.bootstrap import DatabaseUse, database, metrics_endpoint
from service.edge.cli.advice import EXIT_INTERRUPTED
from service.edge.cli.process import configured, run
from service.infra.kafka_clients import KafkaTarget
from service.infra.runtime import BATCH_YOUNG_GENERATION_THRESHOLD, shutdown_on_signals
from service.infra.topic import topic_partitions
from service.kernel.errors import EnvironmentProblem
from service.kernel.settings import Settings

_log = logging.getLogger("orders")

Job = Callable[[AsyncEngine, Settings], Coroutine[Any, Any, None]]


def database_job(job: Job) -> None:
    """Run ``job(engine, settings)`` with the configured database and broker."""
    settings = configured()

    async def main() -> None:
        async with database(settings.require_database(), DatabaseUse.OPERATOR) as engine:
            await job(engine, settings)

    run(main, BATCH_YOUNG_GENERATION_THRESHOLD)  # rebuilds apply batches too


def cmd_projections_status(args: argparse.Namespace) -> None:
    async def job(engine: AsyncEngine, settings: Settings) -> None:
        report = await status(
            engine,
            settings.require_kafka(),
            settings.topic,
            args.names,
            group_prefix=settings.projection_group_prefix,
        )
        if args.json:
            print(msgspec.json.format(msgspec.json.encode(report)).decode())
        else:
            print(render(report))

    database_job(job)


class _ProgressPrinter:
    """One refreshed line on a terminal; a log line every few seconds otherwise."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.tty = sys.stderr.isatty()
        self.last_line = 0.0

    def __call__(self, progress: Any) -> None:
        done = progress.position / progress.end if progress.end else 1.0
        eta = "-" if progress.eta_s is None else f"{progress.eta_s:.0f}s"
        line = (
            f"{self.label}: {progress.phase} {progress.position:,}/{progress.end:,} events "
            f"({done:.0%}), {progress.rate:,.0f} events/s, lag {progress.lag:,}, ETA {eta}, "
            f"{progress.elapsed_s:.0f}s"
        )
        if self.tty:
            print(
                f"\r\033[K{line}",
                end="" if progress.phase != "done" else "\n",
                file=sys.stderr,
                flush=True,
            )
        elif progress.phase != "replaying" or time.monotonic() - self.last_line >= 5:
            self.last_line = time.monotonic()
            _log.info("%s", line)


def cmd_projections_rebuild(args: argparse.Namespace) -> None:
    names = list(catalog.PROJECTIONS) if args.names == ["all"] else args.names
    catalog.select(names)  # unknown names: a clear error before connecting

    async def job(engine: AsyncEngine, settings: Settings) -> None:
        stop = shutdown_on_signals()
        try:
            async with metrics_endpoint(settings.metrics_host, args.metrics_port):
                result = await rebuild(
                    engine,
                    runner_config(settings),
                    names,
                    in_place=args.in_place,
                    keep_old=args.keep_old,
                    restart=args.restart,
                    batch=args.batch,
                    workers=args.workers,
                    on_progress=_ProgressPrinter("+".join(names)),
                    stop=stop,
                )
        except RebuildInterrupted as interrupted:
            print(f"\norders: {interrupted}", file=sys.stderr)
            raise SystemExit(EXIT_INTERRUPTED) from None
        print(
            f"rebuilt {', '.join(result.projections)}"
            f"{' in place' if result.in_place else ''}: {result.topic_events:,} events in "
            f"{result.seconds:.1f}s ({result.rate:,.0f} events/s)"
        )
        if result.switched:
            print(f"  now live: {', '.join(result.switched)}")
        if result.dropped:
            print(f"  dropped: {', '.join(result.dropped)}")

    database_job(job)


def cmd_projections_build(args: argparse.Namespace) -> None:
    """A rebuild's builder process (started by ``rebuild --workers``): applies its share of
    the partitions to the versions being built, until they are no longer building."""

    async def job(engine: AsyncEngine, settings: Settings) -> None:
        stop = shutdown_on_signals()
        config = bulk(runner_config(settings), args.batch)
        runner = ProjectionRunner(catalog.select(args.names), engine, config, building=True)
        try:
            await runner.run(stop)
        except VersionsChanged as done:  # switched before this process started: nothing to do
            _log.info("%s", done)

    database_job(job)


async def _require_partition(bootstrap: KafkaTarget, topic: str, partition: int) -> None:
    """Fail at once, with advice, when ``topic`` or its ``partition`` does not exist (reading a
    record there would wait for the broker's 40 s timeout)."""
    partitions = await topic_partitions(bootstrap, topic)  # TopicMissing says what to check
    if partition not in partitions:
        raise EnvironmentProblem(
            f"topic {topic} at {bootstrap} has no partition {partition} (it has "
            f"{partitions[0]}-{partitions[-1]}): check --partition against "
            "`orders projections status`"
        )


def cmd_projections_park(args: argparse.Namespace) -> None:
    async def job(engine: AsyncEngine, settings: Settings) -> None:
        bootstrap = settings.require_kafka()
        await _require_partition(bootstrap, settings.topic, args.partition)
        event = await park(
            engine,
            bootstrap,
            settings.topic,
            args.name,
            args.partition,
            args.offset,
            version=args.version,
        )
        print(
            f"parked {event.partition}/{event.offset} of {event.projection} v{event.version} "
            f"with order {event.order_id} ({event.reason}); later events of that order are "
            f"set aside too. After a fix: orders projections retry {event.projection} "
            f"--order {event.order_id}"
        )

    database_job(job)


def cmd_projections_parked(args: argparse.Namespace) -> None:
    async def job(engine: AsyncEngine, settings: Settings) -> None:
        events = await parked(engine, settings.topic, args.names)
        if not events:
            print("no parked events")
        for event in events:
            print(
                f"{event.projection} v{event.version}  {event.partition}/{event.offset}  "
                f"order {event.order_id}  parked {event.parked_at:%Y-%m-%d %H:%M:%S}  "
                f"{event.reason}"
            )

    database_job(job)


def cmd_projections_retry(args: argparse.Namespace) -> None:
    async def job(engine: AsyncEngine, settings: Settings) -> None:
        events = await retry(
            engine, settings.topic, args.name, order_id=args.order, version=args.version
        )
        orders = sorted({event.order_id for event in events})
        count = f"{len(events)} parked event(s) of {len(orders)} order(s)"
        print(f"applied {count}: {', '.join(orders)}")

    database_job(job)


def cmd_projections_skip(args: argparse.Namespace) -> None:
    async def job(engine: AsyncEngine, settings: Settings) -> None:
        event = await skip(
            engine, settings.topic, args.name, args.partition, args.offset, version=args.version
        )
        print(
            f"discarded parked event {event.partition}/{event.offset} of order {event.order_id} "
            f"from {event.projection} v{event.version}; the order stays parked until retry"
        )

    database_job(job)
