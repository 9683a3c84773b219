"""The projector in a process of its own, as in production: ``run_projector`` until SIGTERM.

Started by the benchmarks as ``python -m benchmarks.projector_process``; configured like
``orders projector`` through the environment (``KAFKA_BOOTSTRAP_SERVERS``, ``DATABASE_URL``,
``ORDERS_TOPIC``, ``ORDERS_GROUP_PREFIX``), on uvloop when it is installed.
"""

from __future__ import annotations

import asyncio
import logging

from projections.runner import run_projector
from service.infra.database import create_engine
from service.infra.runtime import BATCH_YOUNG_GENERATION_THRESHOLD, shutdown_on_signals, tune_gc
from service.kernel.settings import Settings


async def main() -> None:
    tune_gc(BATCH_YOUNG_GENERATION_THRESHOLD)  # as ``orders projector`` does
    settings = Settings.from_env()
    stop = shutdown_on_signals()
    engine = create_engine(settings.require_database(), autocommit=True)  # as orders projector
    try:
        await run_projector(settings, engine, stop)
    finally:
        await engine.dispose()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional off Linux/macOS
        asyncio.run(main())
    else:
        uvloop.run(main())
