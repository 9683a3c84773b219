"""``orders``: the single entry point.

orders dev          Kafka + Postgres started for you, migrations, API and projector
orders api          the HTTP API (commands and queries) against configured Kafka/Postgres
orders projector    the projections runner
orders migrate      alembic upgrade head (or --downgrade REV)
orders topic create create the events topic (or check the one there)
orders token        mint a development access token (the key `orders dev` made)
orders events tail  print the events on the topic, decoded (needs Kafka only)
orders projections  status | rebuild | park | parked | retry | skip: operate the read models
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Any

from service.edge.logs import setup as setup_logging
from service.kernel.settings import Settings

# A rebuild replays in this many processes unless told otherwise: one per core, at most two
# (Postgres needs the rest of the machine for the writes).
DEFAULT_REBUILD_WORKERS = max(1, min(2, os.cpu_count() or 1))


def configure_logging(verbose: bool) -> None:
    """Log lines as ``ORDERS_LOG_FORMAT`` says (JSON lines off a terminal, text on one;
    docs/telemetry.md); the libraries' own chatter only with ``-v``."""
    setup_logging(Settings.from_env().log_format, verbose=verbose)


def positive(raw: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _add_metrics_port(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metrics-port",
        type=positive,
        metavar="N",
        help="serve Prometheus metrics on http://ORDERS_METRICS_HOST:N/metrics without a token "
        "(default: ORDERS_METRICS_PORT; docs/telemetry.md)",
    )


def _add_topic_parser(commands: Any) -> None:
    topic = commands.add_parser("topic", help="create or check the events topic")
    actions = topic.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser(
        "create",
        help="create ORDERS_TOPIC (or check the one there): infinite retention, durable",
        description="Create ORDERS_TOPIC with infinite retention, the replication factor asked "
        "for (default: as many brokers as the cluster has, up to 3) and min.insync.replicas 2 "
        "when it has 3 copies or more. An existing topic is checked the way the API and the "
        "projector check it at start, and left as it is. Run it once per cluster, before the "
        "first `orders api`; neither the API nor the projector ever creates the topic.",
    )
    create.add_argument(
        "--partitions",
        type=positive,
        metavar="N",
        help="partitions of a new topic (default: ORDERS_PARTITIONS, else 12); fixed once "
        "orders are written",
    )
    create.add_argument(
        "--replication-factor", type=positive, metavar="N", help="copies of each event"
    )
    create.set_defaults(handler="serving:cmd_topic_create")


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
    tail.set_defaults(handler="serving:cmd_events_tail")


def _add_projections_parser(commands: Any) -> None:
    group = commands.add_parser(
        "projections", help="operate the read models: status, rebuild, park, retry, skip"
    )
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")

    status_parser = actions.add_parser(
        "status", help="checkpoint, end, lag and state of every projection and partition"
    )
    status_parser.add_argument("names", nargs="*", help="only these projections (default: all)")
    status_parser.add_argument("--json", action="store_true", help="machine-readable output")
    status_parser.set_defaults(handler="operations:cmd_projections_status")

    rebuild_parser = actions.add_parser(
        "rebuild",
        help="rebuild read models from the log, blue/green (queries keep working)",
        description="Build a new version of each named projection from offset 0 next to the "
        "live one, then switch readers to it in one transaction. Ctrl-C leaves readers on the "
        "live version; running it again resumes.",
    )
    rebuild_parser.add_argument("names", nargs="+", help="projection names, or `all`")
    rebuild_parser.add_argument(
        "--in-place",
        action="store_true",
        help="stop-the-world: empty the live tables and replay into them (stop the projector)",
    )
    rebuild_parser.add_argument(
        "--keep-old", action="store_true", help="keep the old version's tables after the switch"
    )
    rebuild_parser.add_argument(
        "--restart", action="store_true", help="drop an interrupted build instead of resuming it"
    )
    rebuild_parser.add_argument(
        "--batch",
        type=positive,
        default=20_000,
        metavar="N",
        help="events per transaction while replaying (default 20000)",
    )
    rebuild_parser.add_argument(
        "--workers",
        type=positive,
        default=DEFAULT_REBUILD_WORKERS,
        metavar="N",
        help="processes replaying the log side by side, each with its share of the partitions "
        f"(blue/green only; default {DEFAULT_REBUILD_WORKERS}: this machine's cores, at most 2)",
    )
    rebuild_parser.add_argument(
        "--metrics-port",
        type=positive,
        metavar="N",
        help="serve its progress as Prometheus metrics on http://ORDERS_METRICS_HOST:N/metrics "
        "while it runs (docs/telemetry.md)",
    )
    rebuild_parser.set_defaults(handler="operations:cmd_projections_rebuild")

    builder = actions.add_parser("build")  # no help: started by rebuild --workers, not by hand
    builder.add_argument("names", nargs="+")
    builder.add_argument("--batch", type=positive, default=20_000)
    builder.set_defaults(handler="operations:cmd_projections_build")

    def position(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("name", help="the projection")
        parser.add_argument("--partition", type=int, required=True)
        parser.add_argument("--offset", type=int, required=True)
        parser.add_argument("--version", type=int, help="default: the live version")

    park_parser = actions.add_parser(
        "park", help="set aside the event a projection is halted at, with its order"
    )
    position(park_parser)
    park_parser.set_defaults(handler="operations:cmd_projections_park")

    listing_parser = actions.add_parser("parked", help="list parked events")
    listing_parser.add_argument("names", nargs="*", help="only these projections (default: all)")
    listing_parser.set_defaults(handler="operations:cmd_projections_parked")

    retry_parser = actions.add_parser("retry", help="apply parked events again (after a fix)")
    retry_parser.add_argument("name", help="the projection")
    retry_parser.add_argument("--order", metavar="ID", help="only this order (default: every one)")
    retry_parser.add_argument("--version", type=int, help="default: the live version")
    retry_parser.set_defaults(handler="operations:cmd_projections_retry")

    skip_parser = actions.add_parser("skip", help="discard one parked event for good")
    position(skip_parser)
    skip_parser.set_defaults(handler="operations:cmd_projections_skip")


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
    dev.set_defaults(handler="serving:cmd_dev")

    api = commands.add_parser(
        "api", help="run the HTTP API (needs KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL)"
    )
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    _add_metrics_port(api)
    api.set_defaults(handler="serving:cmd_api")

    projector = commands.add_parser("projector", help="run the projections")
    projector.add_argument("names", nargs="*", help="only these projections (default: all)")
    _add_metrics_port(projector)
    projector.set_defaults(handler="serving:cmd_projector")

    token = commands.add_parser(
        "token",
        help="mint an access token with the development key of `orders dev`",
        description="Print a bearer token signed with the development key that `orders dev` "
        "made (never a real identity provider's), for ORDERS_JWT_ISSUER/ORDERS_JWT_AUDIENCE "
        "or the development ones. Scopes: orders:read orders:write orders:read:any "
        "orders:write:any payments:write fulfilment:write reports:read ops:read ops:write.",
    )
    token.add_argument("--sub", required=True, help="the caller: a customer id, or a service")
    token.add_argument(
        "--scope", required=True, help='space-separated scopes, e.g. "orders:read orders:write"'
    )
    token.add_argument("--ttl", default="12h", help="lifetime: 90s, 15m, 12h, 7d (default 12h)")
    token.add_argument("--client-id", help="the OAuth client the token is for (recorded)")
    token.add_argument(
        "--data-dir", type=Path, default=None, help="the --data-dir `orders dev` ran with"
    )
    token.set_defaults(handler="serving:cmd_token")

    migrate = commands.add_parser("migrate", help="upgrade the database schema")
    migrate.add_argument("--revision", default="head")
    migrate.add_argument("--downgrade", metavar="REV", help="downgrade to REV (e.g. base)")
    migrate.add_argument(
        "--create-roles",
        action="store_true",
        help="first create the roles orders_migrator, orders_projector, orders_api and their "
        "grants (as a superuser; running it again changes nothing; docs/security.md)",
    )
    migrate.set_defaults(handler="serving:cmd_migrate")

    _add_topic_parser(commands)
    contract = commands.add_parser("contract", help="the published event contract")
    contract_actions = contract.add_subparsers(dest="action", required=True, metavar="ACTION")
    export = contract_actions.add_parser(
        "export",
        help="write the JSON Schema of each event type's current version, and the AsyncAPI "
        "document of the topic",
    )
    export.add_argument(
        "--to", type=Path, default=Path("contracts/events"), help="folder (contracts/events)"
    )
    export.add_argument(
        "--asyncapi",
        type=Path,
        default=Path("docs/events/asyncapi.json"),
        help="where the AsyncAPI document goes (docs/events/asyncapi.json)",
    )
    export.set_defaults(handler="contract:cmd_contract_export")
    _add_events_parser(commands)
    _add_projections_parser(commands)
    return parser


def _module(name: str) -> Any:
    """A module of this package, imported when a command needs it. Only the command that runs
    loads its libraries (Litestar, SQLAlchemy, aiokafka: about a second), so ``orders --help``
    and a mistyped argument answer at once."""
    return importlib.import_module(f"{__package__}.{name}")


def main(argv: list[str] | None = None) -> None:
    """Run the ``orders`` command line; an error the operator can act on ends it with one line
    on stderr and its exit code (``service.edge.cli.advice``), a bug with its traceback."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    module, _, function = args.handler.partition(":")
    try:
        getattr(_module(module), function)(args)
    except KeyboardInterrupt:
        raise SystemExit(_module("advice").EXIT_INTERRUPTED) from None
    except Exception as error:
        advice = _module("advice").advice_for(error)
        if advice is None:
            raise
        print(f"orders: {advice.message}", file=sys.stderr)
        raise SystemExit(advice.exit_code) from None


if __name__ == "__main__":
    main()
