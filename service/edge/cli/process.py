"""How a CLI command runs as a process: logging, settings checked to answer, the event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

from service.infra.embedded.kafka import accepts_connections, wait_until_usable
from service.infra.embedded.postgres import check_reachable
from service.infra.kafka_clients import KafkaAccessRefused
from service.infra.runtime import YOUNG_GENERATION_THRESHOLD, tune_gc
from service.kernel.errors import EnvironmentProblem
from service.kernel.settings import Settings

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is optional off Linux/macOS
    uvloop = None  # type: ignore[assignment]


def run(
    main: Callable[[], Coroutine[Any, Any, None]],
    young_gc_threshold: int = YOUNG_GENERATION_THRESHOLD,
) -> None:
    """Run ``main()`` to its end in a new event loop (uvloop's where it is installed), with the
    garbage collector tuned for the kind of process this is."""
    tune_gc(young_gc_threshold)
    if uvloop is not None:
        uvloop.run(main())
    else:  # pragma: no cover
        asyncio.run(main())


def configured(
    *, kafka: bool = True, database: bool = True, processes: tuple[str, ...] = ()
) -> Settings:
    """Settings from the environment, with the broker and database checked to answer: the
    database of each of ``processes`` (``"api"``, ``"projector"``), or ``DATABASE_URL``."""
    settings = Settings.from_env()
    if database:
        for url in dict.fromkeys(settings.require_database(p) for p in processes or (None,)):
            check_reachable(url)
    if kafka:
        bootstrap = settings.require_kafka()
        try:
            if not accepts_connections(bootstrap, timeout=3.0):
                raise EnvironmentProblem(bootstrap)
            wait_until_usable(
                bootstrap, deadline=time.monotonic() + 20, process=None, log_file=None
            )
        except KafkaAccessRefused:
            raise  # it answers, and says why it refuses us
        except EnvironmentProblem:
            raise EnvironmentProblem(
                f"Kafka at KAFKA_BOOTSTRAP_SERVERS={bootstrap} does not answer: start it or fix "
                "the variable (or use `orders dev`, which starts one)"
            ) from None
    return settings
