"""The Litestar application: routes, problem responses, OpenAPI. Resources are handed in."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import msgspec
from litestar import Litestar, Response, get
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from litestar.plugins.prometheus import PrometheusController
from prometheus_client import disable_created_metrics
from sqlalchemy.ext.asyncio import AsyncEngine

from projections.checkpoints import CheckpointWatcher
from projections.log_ends import LogEnds
from service.edge.http.auth import BEARER, PUBLIC, Access, requires
from service.edge.http.commands import CommandSink, OrderCommands
from service.edge.http.forwarding import Forwarder
from service.edge.http.ops import Operations
from service.edge.http.problems import EXCEPTION_HANDLERS
from service.edge.http.queries import QUERY_HANDLERS, OrderReader, ReadSide
from service.infra.contracts import event_contract
from service.infra.eventlog import HighWatermarks
from service.infra.kafka_clients import KafkaTarget
from service.kernel.access import Scope
from service.write.contract import WriteSide

_PUBLIC = {PUBLIC: True}  # served without a token

# No `_created` series next to each counter: nothing here reads them, and they double a scrape.
disable_created_metrics()  # type: ignore[no-untyped-call]


class Metrics(PrometheusController):
    """``GET /metrics``: this process's Prometheus metrics, for a caller with ``ops:read``
    (``ORDERS_METRICS_PORT`` serves them without a token, on a port of its own)."""

    path = "/metrics"
    tags = ["operations"]
    include_in_schema = False
    guards = requires(Scope.OPS_READ)["guards"]


@dataclass(frozen=True)
class Resources:
    """What request handlers may use; owned (started and stopped) by the composition root."""

    writer: WriteSide | None = None
    # Sends a command whose partition another instance owns on to it (several instances).
    forwarder: Forwarder | None = None
    engine: AsyncEngine | None = None
    topic: str = "orders.events"
    partitions: int | None = None  # the topic's: a consistency token naming another is a 400
    # The topic's id: checkpoints of read models built from another topic of the same name
    # (deleted and created again) prove nothing. None: not checked.
    topic_id: uuid.UUID | None = None
    consistency_wait_ms: int = 5000
    # Queries waiting for their consistency tokens at once; the next one is a 503 at once.
    max_waiting_queries: int = 1000
    # For operations (projection status) and the log ends consistency tokens are checked against.
    kafka_bootstrap: KafkaTarget | None = None
    projection_group_prefix: str = "orders-projection"  # whose consumers the status counts


class Health(msgspec.Struct, frozen=True):
    status: str
    writer: str | None = None
    auth: str = "on"  # "off": anyone who reaches the service may do anything
    # The partitions whose commands this instance decides now (the others it forwards).
    partitions: list[int] | None = None


def create_app(
    resources: Resources,
    *,
    access: Access,
    published_jwks: dict[str, Any] | None = None,
    max_body_bytes: int = 64 * 1024,
    telemetry: bool = True,
    debug: bool = False,
) -> Litestar:
    """Build the app around already-created resources (nothing connects here). ``access``:
    how callers are authenticated; ``published_jwks``: a key set to serve at
    ``/.well-known/jwks.json`` (the development issuer's); ``telemetry``: ``/metrics`` (the
    request metrics, access log and spans are ``service.edge.http.telemetry``'s)."""
    auth = "on" if access.enabled else "off"

    def provide_writer() -> CommandSink:
        assert sink is not None, "this process runs no writer"
        return sink

    def provide_engine() -> AsyncEngine:
        assert resources.engine is not None, "this process has no database"
        return resources.engine

    def provide_kafka_bootstrap() -> KafkaTarget:
        assert resources.kafka_bootstrap is not None, "this process has no Kafka address"
        return resources.kafka_bootstrap

    def provide_topic() -> str:
        return resources.topic

    def provide_group_prefix() -> str:
        return resources.projection_group_prefix

    read_side = (
        ReadSide(
            resources.engine,
            resources.consistency_wait_ms / 1000,
            CheckpointWatcher(
                resources.engine,
                resources.topic,
                topic_id=resources.topic_id,
                max_waiting=resources.max_waiting_queries,
            ),
            OrderReader(resources.engine),
            resources.partitions,
            LogEnds(
                HighWatermarks(resources.kafka_bootstrap, resources.topic)
                if resources.kafka_bootstrap is not None
                else None
            ),
        )
        if resources.engine
        else None
    )

    sink = (
        CommandSink(
            resources.writer,
            read_side.log_ends if read_side is not None else None,
            resources.forwarder,
        )
        if resources.writer is not None
        else None
    )

    def provide_reads() -> ReadSide:
        assert read_side is not None, "this process has no database"
        return read_side

    @get(
        "/health",
        operation_id="health",
        tags=["operations"],
        summary="Liveness",
        opt=_PUBLIC,
        security=[{}],
    )
    async def health() -> Health:
        writer = resources.writer
        if writer is None:
            return Health("ok", None, auth)
        return Health("ok", writer.state_name, auth, writer.deciding_partitions)

    @get(
        "/health/ready",
        operation_id="ready",
        tags=["operations"],
        summary="Readiness: 200 once the writer has rebuilt its state from the log",
        opt=_PUBLIC,
        security=[{}],
    )
    async def ready() -> Response[Health]:
        writer = resources.writer
        is_ready = writer is None or writer.ready
        state = writer.state_name if writer else None
        deciding = writer.deciding_partitions if writer else None
        body = Health("ready" if is_ready else "not-ready", state, auth, deciding)
        headers = None if is_ready else {"Retry-After": "1"}
        return Response(body, status_code=200 if is_ready else 503, headers=headers)

    asyncapi = event_contract(resources.topic)

    @get(
        "/schema/asyncapi.json",
        operation_id="asyncapi",
        tags=["operations"],
        summary="The AsyncAPI 3 document of the events topic: every event type and schema "
        "version a consumer can meet (docs/events.md)",
        opt=_PUBLIC,
        security=[{}],
        media_type="application/json",
    )
    async def asyncapi_document() -> dict[str, Any]:
        return asyncapi

    route_handlers: list[Any] = [health, ready, asyncapi_document]
    if telemetry:
        route_handlers.append(Metrics)
    if published_jwks is not None:

        @get(
            "/.well-known/jwks.json",
            operation_id="jwks",
            tags=["operations"],
            summary="The development issuer's token signing keys (orders dev only)",
            opt=_PUBLIC,
            security=[{}],
        )
        async def jwks() -> dict[str, Any]:
            return published_jwks

        route_handlers.append(jwks)
    if resources.writer is not None:
        route_handlers.append(OrderCommands)
    if resources.engine is not None:
        route_handlers.extend(QUERY_HANDLERS)
    if resources.engine is not None and resources.kafka_bootstrap is not None:
        route_handlers.append(Operations)
    return Litestar(
        route_handlers=route_handlers,
        dependencies={
            "writer": Provide(provide_writer, sync_to_thread=False),
            "engine": Provide(provide_engine, sync_to_thread=False),
            "reads": Provide(provide_reads, sync_to_thread=False),
            "kafka_bootstrap": Provide(provide_kafka_bootstrap, sync_to_thread=False),
            "topic": Provide(provide_topic, sync_to_thread=False),
            "group_prefix": Provide(provide_group_prefix, sync_to_thread=False),
        },
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[access.middleware()],
        on_shutdown=[read_side.watcher.close, read_side.log_ends.close] if read_side else [],
        request_max_body_size=max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="Orders",
            version="0.1.0",
            description="Event-sourced orders: commands append to Kafka, queries read "
            "Postgres projections.",
            path="/schema",
            render_plugins=[SwaggerRenderPlugin()],
            components=Components(
                security_schemes={
                    BEARER: SecurityScheme(
                        type="http",
                        scheme="bearer",
                        bearer_format="JWT",
                        description="An access token of the identity provider (RFC 9068); "
                        "each operation names the scopes it needs in its description",
                    )
                }
            ),
            security=[{BEARER: []}],
        ),
        logging_config=None,
        debug=debug,
    )
