"""``orders``: the single entry point.

orders dev          Kafka + Postgres started for you, migrations, API and projector
orders api          the HTTP API (commands and queries) against configured Kafka/Postgres
orders projector    the projections runner
orders migrate      alembic upgrade head (or --downgrade REV)
orders events tail  print the events on the topic, decoded (needs Kafka only)
orders projections  status | rebuild | park | parked | retry | skip: operate the read models
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

from service.infra.eventlog import TopicRepartitioned, TopicWouldLoseHistory
from service.infra.runtime import (
    BATCH_YOUNG_GENERATION_THRESHOLD,
    YOUNG_GENERATION_THRESHOLD,
    shutdown_on_signals,
    tune_gc,
)
from service.kernel.errors import EnvironmentProblem
from service.kernel.settings import Settings
from service.write.writer import OpenTransactionInLog

_log = logging.getLogger("orders")

# A rebuild replays in this many processes unless told otherwise: one per core, at most two
# (Postgres needs the rest of the machine for the writes).
DEFAULT_REBUILD_WORKERS = max(1, min(2, os.cpu_count() or 1))


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("aiokafka", "kafka", "uvicorn.error", "httpx", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not verbose else logging.INFO)


def _run(
    main: Callable[[], Coroutine[Any, Any, None]],
    young_gc_threshold: int = YOUNG_GENERATION_THRESHOLD,
) -> None:
    tune_gc(young_gc_threshold)
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:  # pragma: no cover - uvloop is optional off Linux/macOS
        asyncio.run(main())


async def _serve(settings: Settings, **options: Any) -> None:
    from service.edge.bootstrap import serve

    await serve(settings, shutdown_on_signals(), **options)


def _configured(*, kafka: bool = True, database: bool = True) -> Settings:
    """Settings from the environment, with the broker and database checked to answer."""
    from service.infra.embedded.kafka import accepts_connections, wait_until_usable
    from service.infra.embedded.postgres import check_reachable

    settings = Settings.from_env()
    if database:
        check_reachable(settings.require_database())
    if kafka:
        bootstrap = settings.require_kafka()
        try:
            if not accepts_connections(bootstrap, timeout=3.0):
                raise EnvironmentProblem(bootstrap)
            wait_until_usable(
                bootstrap, deadline=time.monotonic() + 20, process=None, log_file=None
            )
        except EnvironmentProblem:
            raise EnvironmentProblem(
                f"Kafka at KAFKA_BOOTSTRAP_SERVERS={bootstrap} does not answer: start it or fix "
                "the variable (or use `orders dev`, which starts one)"
            ) from None
    return settings


def cmd_api(args: argparse.Namespace) -> None:
    from service.edge.bootstrap import ApiOptions

    settings = _configured()
    _log.info("API on http://%s:%d (OpenAPI at /schema)", args.host, args.port)
    _run(lambda: _serve(settings, api=ApiOptions(args.host, args.port)))


def cmd_projector(args: argparse.Namespace) -> None:
    settings = _configured()
    _run(
        lambda: _serve(settings, run_projector=True, projections=args.names or None),
        BATCH_YOUNG_GENERATION_THRESHOLD,
    )


def cmd_migrate(args: argparse.Namespace) -> None:
    from service.infra.database import create_engine, migrate

    settings = _configured(kafka=False)

    async def main() -> None:
        engine = create_engine(settings.require_database())
        try:
            if args.downgrade:
                await migrate(engine, revision=args.downgrade, action="downgrade")
            else:
                await migrate(engine, revision=args.revision)
        finally:
            await engine.dispose()

    _run(main)
    print(f"database migrated to {args.downgrade or args.revision}")


def cmd_dev(args: argparse.Namespace) -> None:
    from service.edge.bootstrap import ApiOptions
    from service.infra.database import create_engine, migrate
    from service.infra.embedded import ensure_port_free
    from service.infra.embedded.stack import infrastructure

    ensure_port_free(args.port, "the API", "--port")
    started = time.monotonic()
    print("starting Kafka and PostgreSQL (the first run downloads the Kafka broker)...", flush=True)
    with infrastructure(
        kafka_port=args.kafka_port, postgres_port=args.postgres_port, data_dir=args.data_dir
    ) as infra:
        settings = Settings.from_env().with_infrastructure(
            kafka=infra.kafka_bootstrap_servers, database_url=infra.database_url
        )

        async def main() -> None:
            engine = create_engine(infra.database_url)
            try:
                await migrate(engine)
            finally:
                await engine.dispose()
            print(f"  Kafka       {infra.kafka_bootstrap_servers}  (topic {settings.topic})")
            print(f"  PostgreSQL  {infra.database_url}")
            print(f"  API         http://{args.host}:{args.port}   (OpenAPI: /schema)")
            print(
                f"ready in {time.monotonic() - started:.1f}s; Ctrl-C stops everything", flush=True
            )
            await _serve(settings, api=ApiOptions(args.host, args.port), run_projector=True)

        _run(main)
    print("stopped")


def cmd_events_tail(args: argparse.Namespace) -> None:
    from service.edge.cli.tail import TailOptions, tail

    settings = _configured(database=False)
    options = TailOptions(
        order_id=args.order,
        from_beginning=args.from_beginning,
        follow=args.follow,
        limit=args.limit,
        as_json=args.json,
    )

    async def main() -> None:
        stop = shutdown_on_signals()
        printed = await tail(
            settings.require_kafka(), settings.topic, sys.stdout, options, stop=stop
        )
        _log.info("%d event(s) shown from %s", printed, settings.topic)

    try:
        _run(main)
    except BrokenPipeError:
        # The reader went away (`| head`): not an error. Point stdout at /dev/null so that the
        # interpreter's final flush does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _positive(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _database_job(job: Callable[[Any, Settings], Coroutine[Any, Any, None]]) -> None:
    """Run ``job(engine, settings)`` with the configured database and broker; errors explained."""
    from projections.parking import ParkingRefused
    from projections.rebuild import RebuildAlreadyRunning
    from projections.versions import NoLiveVersion, VersionIsLive
    from service.infra.database import create_engine

    settings = _configured()

    async def main() -> None:
        engine = create_engine(settings.require_database(), pool_size=4, autocommit=True)
        try:
            await job(engine, settings)
        finally:
            await engine.dispose()

    try:
        _run(main, BATCH_YOUNG_GENERATION_THRESHOLD)  # rebuilds apply batches too
    except (ParkingRefused, NoLiveVersion, VersionIsLive, RebuildAlreadyRunning) as refused:
        print(f"orders: {refused}", file=sys.stderr)
        raise SystemExit(1) from None


def cmd_projections_status(args: argparse.Namespace) -> None:
    import msgspec

    from projections.status import render, status

    async def job(engine: Any, settings: Settings) -> None:
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

    _database_job(job)


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
    from projections.models import catalog
    from projections.rebuild import RebuildInterrupted, rebuild
    from projections.runner import runner_config

    names = list(catalog.PROJECTIONS) if args.names == ["all"] else args.names
    catalog.select(names)  # unknown names: a clear error before connecting

    async def job(engine: Any, settings: Settings) -> None:
        stop = shutdown_on_signals()
        try:
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
            raise SystemExit(130) from None
        print(
            f"rebuilt {', '.join(result.projections)}"
            f"{' in place' if result.in_place else ''}: {result.topic_events:,} events in "
            f"{result.seconds:.1f}s ({result.rate:,.0f} events/s)"
        )
        if result.switched:
            print(f"  now live: {', '.join(result.switched)}")
        if result.dropped:
            print(f"  dropped: {', '.join(result.dropped)}")

    _database_job(job)


def cmd_projections_build(args: argparse.Namespace) -> None:
    """A rebuild's builder process (started by ``rebuild --workers``): applies its share of
    the partitions to the versions being built, until they are no longer building."""
    from projections.models import catalog
    from projections.rebuild import bulk
    from projections.runner import ProjectionRunner, VersionsChanged, runner_config

    async def job(engine: Any, settings: Settings) -> None:
        stop = shutdown_on_signals()
        config = bulk(runner_config(settings), args.batch)
        runner = ProjectionRunner(catalog.select(args.names), engine, config, building=True)
        try:
            await runner.run(stop)
        except VersionsChanged as done:  # switched before this process started: nothing to do
            _log.info("%s", done)

    _database_job(job)


async def _require_partition(bootstrap: str, topic: str, partition: int) -> None:
    """Fail at once, with advice, when ``topic`` or its ``partition`` does not exist (reading a
    record there would wait for the broker's 40 s timeout)."""
    from service.edge.cli.tail import topic_partitions

    partitions = await topic_partitions(bootstrap, topic)  # TopicMissing says what to check
    if partition not in partitions:
        raise EnvironmentProblem(
            f"topic {topic} at {bootstrap} has no partition {partition} (it has "
            f"{partitions[0]}-{partitions[-1]}): check --partition against "
            "`orders projections status`"
        )


def cmd_projections_park(args: argparse.Namespace) -> None:
    from projections.parking import park

    async def job(engine: Any, settings: Settings) -> None:
        await _require_partition(settings.require_kafka(), settings.topic, args.partition)
        event = await park(
            engine,
            settings.require_kafka(),
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

    _database_job(job)


def cmd_projections_parked(args: argparse.Namespace) -> None:
    from projections.parking import parked

    async def job(engine: Any, settings: Settings) -> None:
        events = await parked(engine, settings.topic, args.names)
        if not events:
            print("no parked events")
        for event in events:
            print(
                f"{event.projection} v{event.version}  {event.partition}/{event.offset}  "
                f"order {event.order_id}  parked {event.parked_at:%Y-%m-%d %H:%M:%S}  "
                f"{event.reason}"
            )

    _database_job(job)


def cmd_projections_retry(args: argparse.Namespace) -> None:
    from projections.parking import retry

    async def job(engine: Any, settings: Settings) -> None:
        events = await retry(
            engine, settings.topic, args.name, order_id=args.order, version=args.version
        )
        orders = sorted({event.order_id for event in events})
        count = f"{len(events)} parked event(s) of {len(orders)} order(s)"
        print(f"applied {count}: {', '.join(orders)}")

    _database_job(job)


def cmd_projections_skip(args: argparse.Namespace) -> None:
    from projections.parking import skip

    async def job(engine: Any, settings: Settings) -> None:
        event = await skip(
            engine, settings.topic, args.name, args.partition, args.offset, version=args.version
        )
        print(
            f"discarded parked event {event.partition}/{event.offset} of order {event.order_id} "
            f"from {event.projection} v{event.version}; the order stays parked until retry"
        )

    _database_job(job)


def _add_projections_parser(commands: Any) -> None:
    group = commands.add_parser(
        "projections", help="operate the read models: status, rebuild, park, retry, skip"
    )
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")

    status = actions.add_parser(
        "status", help="checkpoint, end, lag and state of every projection and partition"
    )
    status.add_argument("names", nargs="*", help="only these projections (default: all)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=cmd_projections_status)

    rebuild = actions.add_parser(
        "rebuild",
        help="rebuild read models from the log, blue/green (queries keep working)",
        description="Build a new version of each named projection from offset 0 next to the "
        "live one, then switch readers to it in one transaction. Ctrl-C leaves readers on the "
        "live version; running it again resumes.",
    )
    rebuild.add_argument("names", nargs="+", help="projection names, or `all`")
    rebuild.add_argument(
        "--in-place",
        action="store_true",
        help="stop-the-world: empty the live tables and replay into them (stop the projector)",
    )
    rebuild.add_argument(
        "--keep-old", action="store_true", help="keep the old version's tables after the switch"
    )
    rebuild.add_argument(
        "--restart", action="store_true", help="drop an interrupted build instead of resuming it"
    )
    rebuild.add_argument(
        "--batch",
        type=_positive,
        default=20_000,
        metavar="N",
        help="events per transaction while replaying (default 20000)",
    )
    rebuild.add_argument(
        "--workers",
        type=_positive,
        default=DEFAULT_REBUILD_WORKERS,
        metavar="N",
        help="processes replaying the log side by side, each with its share of the partitions "
        f"(blue/green only; default {DEFAULT_REBUILD_WORKERS}: this machine's cores, at most 2)",
    )
    rebuild.set_defaults(handler=cmd_projections_rebuild)

    build = actions.add_parser("build")  # no help: started by rebuild --workers, not by hand
    build.add_argument("names", nargs="+")
    build.add_argument("--batch", type=_positive, default=20_000)
    build.set_defaults(handler=cmd_projections_build)

    def position(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("name", help="the projection")
        parser.add_argument("--partition", type=int, required=True)
        parser.add_argument("--offset", type=int, required=True)
        parser.add_argument("--version", type=int, help="default: the live version")

    park = actions.add_parser(
        "park", help="set aside the event a projection is halted at, with its order"
    )
    position(park)
    park.set_defaults(handler=cmd_projections_park)

    listing = actions.add_parser("parked", help="list parked events")
    listing.add_argument("names", nargs="*", help="only these projections (default: all)")
    listing.set_defaults(handler=cmd_projections_parked)

    retry = actions.add_parser("retry", help="apply parked events again (after a fix)")
    retry.add_argument("name", help="the projection")
    retry.add_argument("--order", metavar="ID", help="only this order (default: every one)")
    retry.add_argument("--version", type=int, help="default: the live version")
    retry.set_defaults(handler=cmd_projections_retry)

    skip = actions.add_parser("skip", help="discard one parked event for good")
    position(skip)
    skip.set_defaults(handler=cmd_projections_skip)


def _add_events_parser(commands: Any) -> None:
    events = commands.add_parser("events", help="look at the events topic")
    actions = events.add_subparsers(dest="action", required=True, metavar="ACTION")
    tail = actions.add_parser(
        "tail",
        help="print the events on the topic, decoded (needs KAFKA_BOOTSTRAP_SERVERS)",
        description="Print the committed events on ORDERS_TOPIC, one line each. Without "
        "--from-beginning only new events are shown (it follows); with it, from offset 0 to the "
        "end of the log at start, or on and on with --follow. Ctrl-C stops.",
    )
    tail.add_argument(
        "--order", metavar="ID", help="only this order's events (reads only its partition)"
    )
    tail.add_argument(
        "--from-beginning", action="store_true", help="start at offset 0 (default: at the end)"
    )
    tail.add_argument("--follow", action="store_true", help="keep printing new events until Ctrl-C")
    tail.add_argument("--limit", type=_positive, metavar="N", help="stop after N events")
    tail.add_argument(
        "--json", action="store_true", help="one JSON object per line: envelope, partition, offset"
    )
    tail.set_defaults(handler=cmd_events_tail)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orders", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dev = commands.add_parser("dev", help="run everything locally: Kafka, Postgres, API, projector")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=8000, help="API port (default 8000)")
    dev.add_argument("--kafka-port", type=int, default=0, help="default: any free port")
    dev.add_argument("--postgres-port", type=int, default=0, help="default: any free port")
    dev.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="keep Kafka and Postgres data here across runs (default: throw away)",
    )
    dev.set_defaults(handler=cmd_dev)

    api = commands.add_parser(
        "api", help="run the HTTP API (needs KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL)"
    )
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.set_defaults(handler=cmd_api)

    projector = commands.add_parser("projector", help="run the projections")
    projector.add_argument("names", nargs="*", help="only these projections (default: all)")
    projector.set_defaults(handler=cmd_projector)

    migrate = commands.add_parser("migrate", help="upgrade the database schema")
    migrate.add_argument("--revision", default="head")
    migrate.add_argument("--downgrade", metavar="REV", help="downgrade to REV (e.g. base)")
    migrate.set_defaults(handler=cmd_migrate)

    _add_events_parser(commands)
    _add_projections_parser(commands)
    return parser


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and what caused it (SQLAlchemy wraps asyncpg's errors, for one). Causes only,
    not the errors being handled when it was raised: a bug raised while handling, say, a
    database error must keep its traceback, not get the database's advice."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__


def _database_location(settings: Settings) -> str:
    from sqlalchemy.engine import make_url

    if not settings.database_url:
        return "(DATABASE_URL is not set)"
    url = make_url(settings.database_url)
    return f"{url.host or '127.0.0.1'}:{url.port or 5432}/{url.database or ''}"


def _kafka_location(settings: Settings) -> str:
    return settings.kafka_bootstrap_servers or "(KAFKA_BOOTSTRAP_SERVERS is not set)"


def _database_advice(error: BaseException, settings: Settings) -> str | None:
    from asyncpg import PostgresError

    failure = next((e for e in _chain(error) if isinstance(e, PostgresError)), None)
    if failure is None:
        return None
    where = _database_location(settings)
    state = failure.sqlstate or ""
    if state == "42P01":  # undefined_table
        return (
            f"the database {where} is not migrated ({failure}): run `orders migrate` with the "
            "same DATABASE_URL, then run this again"
        )
    if state == "3D000":  # invalid_catalog_name
        return f"PostgreSQL at {where}: {failure}; create that database or fix DATABASE_URL"
    if state.startswith("28"):  # invalid authorization: unknown role, wrong password
        return f"PostgreSQL at {where} refused the login: {failure}; fix DATABASE_URL"
    if state.startswith(("08", "57P")):  # connection lost; server shut down
        return (
            f"lost the connection to PostgreSQL at {where} ({failure}): check that it is up "
            "and reachable, then run this again"
        )
    return None


def _kafka_advice(error: BaseException, settings: Settings) -> str | None:
    from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError

    failure = next(
        (e for e in _chain(error) if isinstance(e, KafkaTimeoutError | KafkaConnectionError)),
        None,
    )
    if failure is None:
        return None
    return (
        f"Kafka at {_kafka_location(settings)} (KAFKA_BOOTSTRAP_SERVERS) gave no answer about "
        f"topic {settings.topic} ({failure}): check that the broker is up and reachable from "
        "here and that ORDERS_TOPIC names an existing topic"
    )


def _migration_advice(error: BaseException, settings: Settings) -> str | None:
    from alembic.util import CommandError

    if not isinstance(error, CommandError):
        return None
    return f"cannot migrate: {error}; a revision is `head`, `base` or an id from `alembic history`"


def _lost_connection(error: BaseException) -> bool:
    """A server went away (or never was one) after the reachability checks passed: refused,
    reset, or a plain ``ConnectionError`` (asyncpg's when a server hangs up while it asks for
    TLS). Not ``BrokenPipeError``: that is stdout's reader leaving (`| head`)."""
    if isinstance(error, BrokenPipeError):
        return False
    return isinstance(error, ConnectionError | socket.gaierror)


def _connection_advice(error: BaseException, settings: Settings) -> str | None:
    failure = next((e for e in _chain(error) if _lost_connection(e)), None)
    if failure is None:
        return None
    return (
        f"a server stopped answering ({failure}): check PostgreSQL at "
        f"{_database_location(settings)} (DATABASE_URL) and Kafka at "
        f"{_kafka_location(settings)} (KAFKA_BOOTSTRAP_SERVERS), then run this again"
    )


def _operator_advice(error: Exception) -> str | None:
    """One line telling the operator what to do about ``error``, or None when it is not the
    environment's fault (a bug: its traceback is the report)."""
    if isinstance(
        error,
        EnvironmentProblem | TopicWouldLoseHistory | TopicRepartitioned | OpenTransactionInLog,
    ):
        return str(error)
    settings = Settings.from_env()
    for advise in (_database_advice, _kafka_advice, _migration_advice, _connection_advice):
        advice = advise(error, settings)
        if advice is not None:
            return advice
    return None


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        args.handler(args)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except Exception as error:
        advice = _operator_advice(error)
        if advice is None:
            raise
        print(f"orders: {advice}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
