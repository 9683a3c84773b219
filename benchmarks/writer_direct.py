"""The writer without HTTP: ``Writer.submit`` from concurrent in-process clients (closed loop).

Same command mix as the HTTP benchmark (one CreateOrder to two AddItem), so the gap between
this figure and the HTTP closed loop is what the HTTP stack costs.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

from benchmarks.httpload import LoadResult
from service.infra.kafka_clients import KafkaTarget
from service.kernel.domain import AddItem, Command, CreateOrder
from service.write.contract import CommandRequest, WriterConfig
from service.write.writer import Writer


async def closed_loop(
    bootstrap: KafkaTarget,
    topic: str,
    *,
    clients: Sequence[int],
    duration: float,
    warm_up: float,
    timeout: float,
    state_topic: str | None = None,
) -> list[LoadResult]:
    """One writer; a warm-up (not recorded), then ``duration`` s for each count of clients.

    With one client every command is a transaction of its own: its latency is the floor.
    """
    results = [LoadResult("writer.submit", None, count, duration) for count in clients]
    discarded = LoadResult("warm-up", None, max(clients), warm_up)
    writer = Writer(
        WriterConfig(
            kafka=bootstrap,
            topic=topic,
            transactional_id=f"bench-writer-direct-{uuid.uuid4().hex[:8]}",
            state_topic=state_topic,
        )
    )
    async with asyncio.timeout(timeout):
        await writer.start()
        try:

            async def submit(command: Command, into: LoadResult) -> None:
                into.sent += 1
                since = time.perf_counter()
                try:
                    await writer.submit(CommandRequest(command=command))
                except Exception as error:
                    into.errors[type(error).__name__] += 1
                    return
                into.record(since, time.perf_counter())

            async def client(number: int, into: LoadResult, stop_at: float) -> None:
                sku = 0
                while time.perf_counter() < stop_at:
                    order_id = str(uuid.uuid4())
                    await submit(
                        CreateOrder(
                            order_id=order_id,
                            at=datetime.now(UTC),
                            customer_id=f"c-{number:05d}",
                            currency="EUR",
                        ),
                        into,
                    )
                    for _ in range(2):
                        sku += 1
                        await submit(
                            AddItem(
                                order_id=order_id,
                                at=datetime.now(UTC),
                                sku=f"SKU-{sku}",
                                name="Mug",
                                quantity=2,
                                unit_price=1250,
                            ),
                            into,
                        )

            for run in (discarded, *results):
                started = time.perf_counter()
                stop_at = started + run.duration
                await asyncio.gather(*(client(n, run, stop_at) for n in range(run.connections)))
                run.elapsed = time.perf_counter() - started
        finally:
            await writer.stop(timeout=10)
    return results
