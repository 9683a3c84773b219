"""``orders dev | api | projector | migrate | events tail``: the commands that run the service."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from projections import roles
from service.edge.bootstrap import ApiOptions, migrate_database, serve
from service.edge.cli.process import configured, run
from service.edge.cli.tail import TailOptions, tail
from service.infra.database import shown_url
from service.infra.embedded import cache_dir, ensure_port_free
from service.infra.embedded.stack import infrastructure
from service.infra.identity import DEVELOPMENT_AUDIENCE, DEVELOPMENT_ISSUER, DevelopmentIssuer
from service.infra.runtime import BATCH_YOUNG_GENERATION_THRESHOLD, shutdown_on_signals
from service.infra.topic import (
    TopicCreation,
    create_state_topic,
    create_topic,
    describe_facts,
    state_topic_for,
)
from service.kernel.settings import Settings, parse_duration

_log = logging.getLogger("orders")


async def _serve(settings: Settings, **options: Any) -> None:
    await serve(settings, shutdown_on_signals(), **options)


def _with_metrics_port(settings: Settings, args: argparse.Namespace) -> Settings:
    port = getattr(args, "metrics_port", None)
    return replace(settings, metrics_port=port) if port is not None else settings


def cmd_api(args: argparse.Namespace) -> None:
    settings = _with_metrics_port(configured(processes=("api",)), args)
    _log.info("API on http://%s:%d (OpenAPI at /schema)", args.host, args.port)
    run(lambda: _serve(settings, api=ApiOptions(args.host, args.port)))


def cmd_projector(args: argparse.Namespace) -> None:
    settings = _with_metrics_port(configured(processes=("projector",)), args)
    run(
        lambda: _serve(settings, run_projector=True, projections=args.names or None),
        BATCH_YOUNG_GENERATION_THRESHOLD,
    )


def cmd_migrate(args: argparse.Namespace) -> None:
    settings = configured(kafka=False)
    url = settings.require_database()
    action, revision = (
        ("downgrade", args.downgrade) if args.downgrade else ("upgrade", args.revision)
    )
    run(
        lambda: migrate_database(
            url,
            revision=revision,
            action=action,
            create_roles=args.create_roles,
            password=settings.database_password,
        )
    )
    if args.create_roles:
        print(f"roles {', '.join(roles.ROLES)} and their grants are set up (docs/security.md)")
    print(f"database migrated to {revision}")


async def create_events_topic(
    settings: Settings, *, partitions: int | None = None, replication_factor: int | None = None
) -> TopicCreation:
    creation = await create_topic(
        settings.require_kafka(),
        settings.topic,
        partitions=partitions or settings.partitions,
        replication_factor=replication_factor,
        allow_deleting=settings.allow_deleting_topic,
        allow_undurable=settings.allow_undurable_topic,
    )
    facts = creation.facts
    print(
        f"{'created' if creation.created else 'checked'} topic {facts.name}: "
        + describe_facts(facts)
    )
    state_topic = state_topic_for(settings.topic)
    state_created = await create_state_topic(
        settings.require_kafka(),
        state_topic,
        partitions=facts.partitions,
        replication_factor=replication_factor,
    )
    print(
        f"{'created' if state_created else 'checked'} topic {state_topic}: the writer's "
        "snapshots (compacted)"
    )
    return creation


def cmd_topic_create(args: argparse.Namespace) -> None:
    settings = configured(database=False)
    asked = args.partitions

    async def main() -> None:
        creation = await create_events_topic(
            settings, partitions=asked, replication_factor=args.replication_factor
        )
        if not creation.created and asked and creation.facts.partitions != asked:
            print(
                f"note: the topic existed already with {creation.facts.partitions} partitions, "
                f"not {asked}: a topic's partitions stay as they are once orders are written"
            )

    run(main)


# The callers `orders dev` prints a token for: who, and what each may do.
DEV_CALLERS = (
    ("customer c-42", "c-42", "orders:read orders:write"),
    ("back office", "back-office", "orders:read:any orders:write:any reports:read"),
    ("payment service", "payment-service", "payments:write orders:read:any"),
    ("warehouse", "warehouse", "fulfilment:write orders:read:any"),
    ("operator", "operator", "ops:read ops:write"),
)


def _development_identity(settings: Settings, data_dir: Path | None) -> tuple[Settings, Any]:
    """With authentication on and no identity provider configured, the development issuer:
    its key pair (made on first use), its JWKS as the one the API trusts, and its tokens."""
    if not settings.auth or settings.jwks_url or settings.jwks_file:
        return settings, None
    issuer = DevelopmentIssuer.load(identity_folder(data_dir), create=True)
    settings = replace(
        settings,
        jwks_file=str(issuer.jwks_path),
        jwt_issuer=settings.jwt_issuer or DEVELOPMENT_ISSUER,
        jwt_audience=settings.jwt_audience or DEVELOPMENT_AUDIENCE,
    )
    return settings, issuer


def identity_folder(data_dir: Path | None) -> Path:
    """Where `orders dev` keeps its token signing key: in --data-dir, else in the cache
    folder, so that `orders token` finds it from any terminal."""
    return data_dir / "identity" if data_dir is not None else cache_dir() / "dev-identity"


def _print_tokens(issuer: DevelopmentIssuer, settings: Settings) -> None:
    issuer_name = settings.jwt_issuer or DEVELOPMENT_ISSUER
    audience = settings.jwt_audience or DEVELOPMENT_AUDIENCE
    print("  tokens (12 h; more with `orders token --sub ID --scope ...`):")
    for label, sub, scopes in DEV_CALLERS:
        token = issuer.mint(sub, scopes, issuer=issuer_name, audience=audience)
        print(f"    {label:<16} ({scopes})\n      {token}")


def _auth_summary(settings: Settings) -> str:
    if not settings.auth:
        return "OFF (ORDERS_AUTH=off): anyone may do anything; local work only"
    return f"tokens checked against {settings.jwks_url or settings.jwks_file}"


def _print_server_logs(logs: list[tuple[str, Path]], *, kept: bool) -> None:
    """Where the broker's and PostgreSQL's own logs are: in their files, not in ours."""
    for index, (server, path) in enumerate(logs):
        print(f"  {'logs' if index == 0 else '':<11} {server + ':':<12}{path}")
    if logs and not kept:
        print("              (deleted when dev stops; --data-dir keeps them)")


def cmd_token(args: argparse.Namespace) -> None:
    settings = Settings.from_env()
    folder = identity_folder(args.data_dir)
    # With --data-dir the key may be made here (a compose volume, a fresh folder); without it,
    # the key is `orders dev`'s, and a missing one means dev has not run yet: say so.
    if args.data_dir is not None and not DevelopmentIssuer.exists(folder):
        print(f"orders token: a new development key in {folder}", file=sys.stderr)
    issuer = DevelopmentIssuer.load(folder, create=args.data_dir is not None)
    try:
        ttl = timedelta(seconds=parse_duration(args.ttl))
    except ValueError as error:
        raise SystemExit(f"orders token: --ttl: {error}") from None
    print(
        issuer.mint(
            args.sub,
            args.scope,
            ttl=ttl,
            client_id=args.client_id,
            issuer=settings.jwt_issuer or DEVELOPMENT_ISSUER,
            audience=settings.jwt_audience or DEVELOPMENT_AUDIENCE,
        )
    )


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
        settings, issuer = _development_identity(settings, args.data_dir)

        async def main() -> None:
            await migrate_database(infra.database_url, password=settings.database_password)
            await create_topic(
                settings.require_kafka(), settings.topic, partitions=settings.partitions
            )
            print(f"  Kafka       {infra.kafka_bootstrap_servers}  (topic {settings.topic})")
            print(f"  PostgreSQL  {shown_url(infra.database_url)}")
            _print_server_logs(infra.server_logs, kept=args.data_dir is not None)
            print(f"  API         http://{args.host}:{args.port}   (OpenAPI: /schema)")
            if issuer is not None:
                _print_tokens(issuer, settings)
            else:
                print(f"  auth        {_auth_summary(settings)}")
            print(
                f"ready in {time.monotonic() - started:.1f}s; Ctrl-C stops everything", flush=True
            )
            options = ApiOptions(
                args.host, args.port, published_jwks=issuer.jwks() if issuer else None
            )
            await _serve(settings, api=options, run_projector=True)

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
