"""The whole service, as `orders api` + `orders projector` run it, served on 127.0.0.1.

``served(settings)`` runs the composition root (``service.edge.bootstrap.serve``: writer, queries,
projector, a real uvicorn server) on its own event loop in a background thread, so that
synchronous clients (requests, schemathesis, httpx.Client) can talk to it over real HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import httpx

from service.edge.bootstrap import ApiOptions, serve
from service.infra.database import create_engine, migrate
from service.infra.identity import DEVELOPMENT_AUDIENCE, DEVELOPMENT_ISSUER
from service.kernel.settings import Settings
from tests.support.identity import ISSUER
from tests.support.topics import new_topic

START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Service:
    base_url: str
    settings: Settings


def service_settings(kafka: str, database_url: str, **overrides: Any) -> Settings:
    """Settings for one served service: its own topic, writer id and consumer groups."""
    suffix = uuid.uuid4().hex[:10]
    settings = Settings(
        kafka_bootstrap_servers=kafka,
        database_url=database_url,
        topic=f"test.served.{suffix}",
        partitions=4,
        transactional_id=f"served-writer-{suffix}",
        projection_group_prefix=f"served-projection-{suffix}",
        consistency_wait_ms=10_000,
        max_queue_delay_ms=30_000,  # not about load shedding (a busy machine stalls batches)
        rate_limit_per_s=0,  # nor about rate limits: one token sends every request here
        jwks_file=str(ISSUER.jwks_path),
        jwt_issuer=DEVELOPMENT_ISSUER,
        jwt_audience=DEVELOPMENT_AUDIENCE,
    )
    return replace(settings, **overrides)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class _Runner:
    """The service's event loop, in a thread; ``stop()`` is the SIGTERM of ``orders api``."""

    def __init__(self, settings: Settings, port: int) -> None:
        self.settings = settings
        self.port = port
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop_event: asyncio.Event | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="served-service", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # re-raised in the test's thread
            self.error = exc

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        assert self.settings.database_url is not None
        engine = create_engine(self.settings.database_url, pool_size=2)
        try:
            await migrate(engine)
        finally:
            await engine.dispose()
        await new_topic(
            self.settings.require_kafka(), self.settings.topic, self.settings.partitions
        )
        await serve(
            self.settings,
            self.stop_event,
            api=ApiOptions(host="127.0.0.1", port=self.port),
            run_projector=True,
        )

    def stop(self) -> None:
        if self.loop is not None and self.stop_event is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(STOP_TIMEOUT_S)
        assert not self.thread.is_alive(), f"the service did not stop within {STOP_TIMEOUT_S} s"


def _wait_until_ready(runner: _Runner, base_url: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    with httpx.Client(base_url=base_url, timeout=5) as client:
        while time.monotonic() < deadline:
            if not runner.thread.is_alive():
                raise AssertionError(f"the service ended during start-up: {runner.error!r}")
            with contextlib.suppress(httpx.TransportError):
                if client.get("/health/ready").status_code == 200:
                    return
            time.sleep(0.05)  # polling interval, not synchronisation: the deadline bounds it
    raise AssertionError(f"the service was not ready within {START_TIMEOUT_S} s")


@contextlib.contextmanager
def served(settings: Settings) -> Iterator[Service]:
    """Serve API + projector with ``settings`` until the block ends, then stop gracefully."""
    port = _free_port()
    runner = _Runner(settings, port)
    base_url = f"http://127.0.0.1:{port}"
    runner.thread.start()
    try:
        _wait_until_ready(runner, base_url)
        yield Service(base_url, settings)
    finally:
        runner.stop()
    if runner.error is not None:
        raise runner.error
