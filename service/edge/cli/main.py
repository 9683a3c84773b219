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
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from service.edge.bootstrap import ApiOptions, migrate_database, serve
from service.edge.cli.advice import EXIT_INTERRUPTED, advice_for
from service.edge.cli.operations import add_projections_parser
from service.edge.cli.process import configure_logging, configured, positive, run
from service.edge.cli.tail import TailOptions, tail
from service.infra.embedded import ensure_port_free
from service.infra.embedded.stack import infrastructure
from service.infra.runtime import BATCH_YOUNG_GENERATION_THRESHOLD, shutdown_on_signals
from service.kernel.settings import Settings

_log = logging.getLogger("orders")


async def _serve(settings: Settings, **options: Any) -> None:
    await serve(settings, shutdown_on_signals(), **options)


def cmd_api(args: argparse.Namespace) -> None:
    settings = configured()
    _log.info("API on http://%s:%d (OpenAPI at /schema)", args.host, args.port)
    run(lambda: _serve(settings, api=ApiOptions(args.host, args.port)))


def cmd_projector(args: argparse.Namespace) -> None:
    settings = configured()
    run(
        lambda: _serve(settings, run_projector=True, projections=args.names or None),
        BATCH_YOUNG_GENERATION_THRESHOLD,
    )


def cmd_migrate(args: argparse.Namespace) -> None:
    settings = configured(kafka=False)
    url = settings.require_database()
    if args.downgrade:
        run(lambda: migrate_database(url, revision=args.downgrade, action="downgrade"))
    else:
        run(lambda: migrate_database(url, revision=args.revision))
    print(f"database migrated to {args.downgrade or args.revision}")


def cmd_dev(args: argparse.Namespace) -> None:
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
            await migrate_database(infra.database_url)
            print(f"  Kafka       {infra.kafka_bootstrap_servers}  (topic {settings.topic})")
            print(f"  PostgreSQL  {infra.database_url}")
            print(f"  API         http://{args.host}:{args.port}   (OpenAPI: /schema)")
            print(
                f"ready in {time.monotonic() - started:.1f}s; Ctrl-C stops everything", flush=True
            )
            await _serve(settings, api=ApiOptions(args.host, args.port), run_projector=True)

        run(main)
    print("stopped")


def cmd_events_tail(args: argparse.Namespace) -> None:
    settings = configured(database=False)
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
        run(main)
    except BrokenPipeError:
        # The reader went away (`| head`): not an error. Point stdout at /dev/null so that the
        # interpreter's final flush does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


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
    tail.add_argument("--limit", type=positive, metavar="N", help="stop after N events")
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
    add_projections_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run the ``orders`` command line; an error the operator can act on ends it with one line
    on stderr and its exit code (``service.edge.cli.advice``), a bug with its traceback."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        args.handler(args)
    except KeyboardInterrupt:
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as error:
        advice = advice_for(error)
        if advice is None:
            raise
        print(f"orders: {advice.message}", file=sys.stderr)
        raise SystemExit(advice.exit_code) from None


if __name__ == "__main__":
    main()
