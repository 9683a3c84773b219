"""When a batch is visible: the last stable offset of every partition it wrote has passed it.

A writer acknowledges a batch only once read_committed readers can see it
(``service.write.appender``), which it learns by asking the broker for the partitions' last
stable offsets until they pass. ``StableOffsets`` asks for every writer of the process at once:
one ListOffsets request per round, however many writers wait, instead of one per writer. With a
writer per partition (``service.write.ownership``) those requests would otherwise multiply
by the partitions and keep the broker busy answering them.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiokafka import AIOKafkaConsumer, TopicPartition

from service.infra.eventlog import committed_reader
from service.infra.kafka_clients import KafkaTarget

# Between two requests while someone waits: the markers usually land within a millisecond or two.
_ROUND_S = 0.001


class StableOffsets:
    """One read_committed consumer that tells waiters when the last stable offsets of their
    partitions have passed the offsets they wait for."""

    def __init__(self, kafka: KafkaTarget, topic: str) -> None:
        self._kafka = kafka
        self._topic = topic
        self._consumer: AIOKafkaConsumer | None = None
        self._waiting: list[tuple[dict[int, int], asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        consumer = committed_reader(self._kafka)
        await consumer.start()
        self._consumer = consumer
        self._task = asyncio.create_task(self._run(), name="stable-offsets")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for _, waiter in self._waiting:
            if not waiter.done():
                waiter.set_exception(ConnectionError("stopped while waiting for visibility"))
        self._waiting.clear()
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._consumer.stop()

    async def wait_past(self, last: dict[int, int]) -> None:
        """Return once every partition's last stable offset is past its offset in ``last``
        (partition -> offset of the last record written there). Raises what the broker
        answered instead."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append((last, waiter))
        self._wake.set()
        try:
            await asyncio.shield(waiter)
        except asyncio.CancelledError:
            waiter.cancel()
            raise

    async def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._waiting:
                batch = [(last, w) for last, w in self._waiting if not w.done()]
                self._waiting = batch[:]
                wanted = sorted({p for last, _ in batch for p in last})
                if not wanted:
                    break
                try:
                    stable = await consumer.end_offsets(
                        [TopicPartition(self._topic, p) for p in wanted]
                    )
                except Exception as error:  # each of these waiters' appends fails with it
                    for _, waiter in batch:
                        if not waiter.done():
                            waiter.set_exception(error)
                    continue
                for last, waiter in batch:
                    if not waiter.done() and all(
                        stable[TopicPartition(self._topic, p)] > offset
                        for p, offset in last.items()
                    ):
                        waiter.set_result(None)
                if any(not waiter.done() for _, waiter in self._waiting):
                    await asyncio.sleep(_ROUND_S)  # pacing while the broker writes markers
