"""``orders dev | api | projector | migrate | events tail``: the commands that run the service."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Any

from service.edge.bootstrap import ApiOptions, migrate_database, serve
from service.edge.cli.process import configured, run
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
