"""The composition root: the one place that creates, wires, starts and stops real resources."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
from collections.abc import AsyncIterator, Generator, Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import uvicorn
from prometheus_client import REGISTRY, make_asgi_app
from sqlalchemy.ext.asyncio import AsyncEngine
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from projections import roles
from projections.projection import begin
from projections.runner import run_projector
from service.edge.http.admission import CommandAdmission
from service.edge.http.app import Resources, create_app
from service.edge.http.auth import Access, warn_if_off
from service.edge.http.forwarding import Forwarder
from service.edge.http.limits import Backlog, TokenBuckets
from service.edge.http.telemetry import RequestTelemetry
from service.edge.tracing import traces
from service.infra.database import connector, create_engine, migrate, with_password
from service.infra.embedded import ensure_port_free
from service.infra.identity import JwksFile, JwksSource, JwksUrl, KeyCache, TokenVerifier
from service.infra.runtime import tune_gc
from service.infra.topic import READ, TopicFacts, check_topic, state_topic_for
from service.kernel.errors import EnvironmentProblem
from service.kernel.settings import Settings
from service.write.contract import WriterConfig
from service.write.metrics import WriterCollector
from service.write.ownership import WriterGroup

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApiOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    published_jwks: dict[str, Any] | None = None  # served at /.well-known/jwks.json (dev)


def access_for(settings: Settings) -> Access:
    """How the API authenticates callers, from the settings; refuses a half-configured one."""
    rate_limit = (
        TokenBuckets(rate=settings.rate_limit_per_s, burst=settings.rate_limit_burst)
        if settings.rate_limit_per_s > 0
        else None
    )
    if not settings.auth:
        return Access(None, rate_limit, public_schema=settings.public_schema)
    issuer, audience = settings.jwt_issuer, settings.jwt_audience
    missing = [
        name
        for name, value in (
            ("ORDERS_JWT_ISSUER", issuer),
            ("ORDERS_JWT_AUDIENCE", audience),
            ("ORDERS_JWKS_URL or ORDERS_JWKS_FILE", settings.jwks_url or settings.jwks_file),
        )
        if not value
    ]
    if missing or issuer is None or audience is None:
        raise EnvironmentProblem(
            f"authentication needs {', '.join(missing)}: point them at your identity "
            "provider (docs/security.md), or set ORDERS_AUTH=off for local work only"
        )
    if settings.jwks_url and settings.jwks_file:
        raise EnvironmentProblem("set ORDERS_JWKS_URL or ORDERS_JWKS_FILE, not both")
    source: JwksSource = (
        JwksUrl(settings.jwks_url)
        if settings.jwks_url
        else JwksFile(Path(settings.jwks_file or ""))
    )
    verifier = TokenVerifier(
        KeyCache(source, min_refresh_s=settings.jwks_min_refresh_s),
        issuer=issuer,
        audience=audience,
        leeway_s=settings.jwt_leeway_s,
    )
    return Access(verifier, rate_limit, public_schema=settings.public_schema)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the composition root decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class _CoalescingTransport:
    """A connection's writes made in one turn of the event loop, sent as one.

    uvicorn writes a response's head and its body separately; on loopback each write is a
    system call that also hands a TCP segment to the client, which wakes up twice. Everything
    but ``write``, ``writelines`` and ``close`` is the real transport's.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def writelines(self, chunks: Iterable[bytes]) -> None:  # in order with ``write``
        for chunk in chunks:
            self.write(chunk)

    def _flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, writing through ``_CoalescingTransport``."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]


def server_config(app: Any, *, host: str, port: int) -> uvicorn.Config:
    """How the API is served: one uvicorn server in this process's (uvloop) event loop, the
    httptools parser (each connection's writes of one turn of the loop sent as one), no access
    log, no ``Server`` header, no X-Forwarded-* rewriting (nothing here reads the client's
    address or scheme; ``Location`` is a path). The HTTP-ceiling benchmark
    (``benchmarks/bare_http.py``) serves its bare app with this same configuration."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=_HttpProtocol,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=20,
        proxy_headers=False,
        server_header=False,
    )


@contextlib.asynccontextmanager
async def metrics_endpoint(host: str, port: int | None) -> AsyncIterator[None]:
    """Serve this process's Prometheus metrics (the client library's default registry) on
    ``http://host:port/metrics``, without a token, while the block runs. ``port=None``: not at
    all. A port that is taken fails here, before anything else starts."""
    if port is None:
        yield
        return
    ensure_port_free(port, "the metrics endpoint", "ORDERS_METRICS_PORT or --metrics-port")
    config = uvicorn.Config(
        make_asgi_app(),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        server_header=False,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(), name="metrics endpoint")
    while not server.started:
        if task.done():  # the address cannot be bound (uvicorn logged why)
            raise EnvironmentProblem(f"cannot serve metrics on {host}:{port}")
        await asyncio.sleep(0.01)  # polling uvicorn's own start flag; it has no event for it
    _log.info("metrics on http://%s:%d/metrics", host, port)
    try:
        yield
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await task


class DatabaseUse(enum.Enum):
    """What a process uses its database for: that sets the engine's pool."""

    # The API and the projector. Waiting queries are released together when their checkpoint
    # moves: a burst the pool queues rather than answers with connections opened and closed on
    # the spot.
    SERVICE = enum.auto()
    # An operator's command (`orders projections ...`): a few statements, a rebuild's batches.
    OPERATOR = enum.auto()
    # `orders migrate`: alembic in one transaction (never autocommit).
    MIGRATION = enum.auto()


@contextlib.asynccontextmanager
async def database(
    url: str, use: DatabaseUse, password: str | None = None
) -> AsyncIterator[AsyncEngine]:
    """The engine of the database at ``url`` (with ``password`` unless it names one), pooled
    for ``use``, disposed on the way out. Every engine of the service is built here."""
    url = with_password(url, password)
    match use:
        case DatabaseUse.SERVICE:
            engine = create_engine(url, pool_size=20, overflow=False, autocommit=True)
        case DatabaseUse.OPERATOR:
            engine = create_engine(url, pool_size=4, autocommit=True, as_owner=True)
        case DatabaseUse.MIGRATION:
            engine = create_engine(url, as_owner=True)
    try:
        yield engine
    finally:
        await engine.dispose()


async def migrate_database(
    url: str,
    *,
    revision: str = "head",
    action: str = "upgrade",
    create_roles: bool = False,
    password: str | None = None,
) -> None:
    """Upgrade (or downgrade, ``action="downgrade"``) the schema of the database at ``url``.

    ``create_roles``: first create the roles of least privilege and hand them this database
    (``projections.roles``). Where they are set up, the migration runs as the owner role and
    each role's grants are put right afterwards.
    """
    url = with_password(url, password)
    if create_roles:
        connection = await connector(url)()
        try:
            async with connection.transaction():
                await roles.create_roles(connection)
        finally:
            await connection.close()
    async with database(url, DatabaseUse.MIGRATION) as engine:
        await migrate(engine, revision=revision, action=action)
        async with begin(engine) as owner:
            if await roles.roles_in_use(owner):
                await roles.grant(owner)


def writer_config(settings: Settings) -> WriterConfig:
    return WriterConfig(
        kafka=settings.require_kafka(),
        topic=settings.topic,
        transactional_id=settings.transactional_id,
        allow_deleting_topic=settings.allow_deleting_topic,
        allow_undurable_topic=settings.allow_undurable_topic,
        max_batch=settings.group_commit_max_events,
        idempotency_ttl=timedelta(seconds=settings.idempotency_ttl_s),
        max_queue_delay=settings.max_queue_delay_ms / 1000,
        state_topic=state_topic_for(settings.topic),
    )


def advertised_url(settings: Settings, api: ApiOptions) -> str:
    """Where the other instances reach this one (to forward commands to the partitions it
    owns): ``ORDERS_ADVERTISED_URL``, else its own host and port (this host's name when it
    listens on every interface)."""
    if settings.advertised_url:
        return settings.advertised_url.rstrip("/")
    host = socket.getfqdn() if api.host in ("0.0.0.0", "::", "") else api.host
    return f"http://{host}:{api.port}"


async def topic_of(settings: Settings) -> TopicFacts:
    """Fail fast, before serving, on a topic that is missing (it is never created here), would
    lose history, or keeps too few copies."""
    return await check_topic(
        settings.require_kafka(),
        settings.topic,
        needs=(READ,),  # the writer, the projector and the queries' waits all read it
        allow_deleting=settings.allow_deleting_topic,
        allow_undurable=settings.allow_undurable_topic,
    )


async def serve(
    settings: Settings,
    stop: asyncio.Event,
    *,
    api: ApiOptions | None = None,
    run_projector: bool = False,
    projections: list[str] | None = None,
) -> None:
    """Run the API (writer + queries) and/or the projector until ``stop`` is set, each on its
    own database URL (``Settings.require_database``); one engine per distinct URL."""
    processes = [
        name for name, on in (("api", api is not None), ("projector", run_projector)) if on
    ]
    urls = {process: settings.require_database(process) for process in processes}
    async with contextlib.AsyncExitStack() as stack:
        # Traces only when the OTEL_* environment asks for them (and telemetry is on).
        await stack.enter_async_context(
            traces(f"orders-{'+'.join(processes)}", None if settings.telemetry else {})
        )
        await stack.enter_async_context(
            metrics_endpoint(settings.metrics_host, settings.metrics_port)
        )
        by_url = {
            url: await stack.enter_async_context(
                database(url, DatabaseUse.SERVICE, settings.database_password)
            )
            for url in dict.fromkeys(urls.values())
        }
        engines = {process: by_url[url] for process, url in urls.items()}
        await _serve_with(engines, settings, stop, api, run_projector, projections)


async def _serve_with(
    engines: dict[str, AsyncEngine],
    settings: Settings,
    stop: asyncio.Event,
    api: ApiOptions | None,
    with_projector: bool,
    projections: list[str] | None,
) -> None:
    tasks: dict[str, asyncio.Task[None]] = {}
    writer: WriterGroup | None = None
    forwarder: Forwarder | None = None
    writer_metrics: WriterCollector | None = None
    server: _Server | None = None
    try:
        # The topic must exist (it is never created here) and keep its history.
        topic = await topic_of(settings)
        if api is not None:
            access = access_for(settings)
            warn_if_off(access)
            address = advertised_url(settings, api)
            writer = WriterGroup(
                writer_config(settings), group_prefix=settings.writer_group, address=address
            )
            forwarder = Forwarder(address)
            writer_metrics = WriterCollector(writer)
            REGISTRY.register(writer_metrics)
            app = create_app(
                Resources(
                    writer=writer,
                    forwarder=forwarder,
                    engine=engines["api"],
                    topic=settings.topic,
                    partitions=topic.partitions,
                    topic_id=topic.topic_id,
                    consistency_wait_ms=settings.consistency_wait_ms,
                    max_waiting_queries=settings.max_waiting_queries,
                    kafka_bootstrap=settings.require_kafka(),
                    projection_group_prefix=settings.projection_group_prefix,
                ),
                access=access,
                published_jwks=api.published_jwks,
                max_body_bytes=settings.max_body_bytes,
                telemetry=settings.telemetry,
            )
            # Commands the service is too far behind to take are refused before the app; every
            # request, refused or not, is counted, logged and traced.
            served = RequestTelemetry(
                CommandAdmission(app, Backlog(settings.max_queue_delay_ms / 1000)),
                telemetry=settings.telemetry,
            )
            server = _Server(server_config(served, host=api.host, port=api.port))
            tune_gc()
            tasks["writer start-up"] = asyncio.create_task(writer.start())
            tasks["api"] = asyncio.create_task(server.serve())
        if with_projector:
            tasks["projector"] = asyncio.create_task(
                run_projector(settings, engines["projector"], stop, only=projections)
            )
        await _until_stopped(tasks, stop)
    finally:
        stop.set()
        if server is not None:
            server.should_exit = True  # stop listening; in-flight requests finish
        for name in ("api", "projector"):
            if name in tasks:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await tasks[name]
        if writer is not None:
            await writer.stop()
        if forwarder is not None:
            await forwarder.close()
        if writer_metrics is not None:
            REGISTRY.unregister(writer_metrics)
        start = tasks.get("writer start-up")
        if start is not None and not start.done():
            start.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await start


async def _until_stopped(tasks: dict[str, asyncio.Task[None]], stop: asyncio.Event) -> None:
    """Wait for ``stop``; a task that fails re-raises here, one that ends on its own stops all."""
    watched = dict(tasks)
    stopper = asyncio.create_task(stop.wait())
    try:
        while watched and not stop.is_set():
            done, _ = await asyncio.wait(
                [*watched.values(), stopper], return_when=asyncio.FIRST_COMPLETED
            )
            for name, task in list(watched.items()):
                if task not in done:
                    continue
                del watched[name]
                task.result()  # re-raises a failure
                if name != "writer start-up":
                    _log.warning("%s ended by itself; shutting down", name)
                    stop.set()
    finally:
        stopper.cancel()
