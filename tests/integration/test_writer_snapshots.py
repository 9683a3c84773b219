"""The writer's changelog (``service.write.snapshots``): a start reads each partition's state
and only the events after its position, and still holds exactly the state the whole log folds
to, whatever wrote that log (a writer with snapshots, one without, both in turn)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from msgspec.structs import replace

from service.infra.eventlog import partition_for
from service.infra.topic import state_topic_for
from service.kernel.access import Actor
from service.write import snapshots
from service.write.contract import CommandRequest
from service.write.writer import Writer
from tests.support.lifecycles import lifecycle
from tests.support.log import folded_orders, read_topic
from tests.support.topics import new_topic
from tests.support.writers import started_writer

PARTITIONS = 4
Started = Callable[..., AbstractAsyncContextManager[Writer]]


@pytest.fixture
def writer_on(bootstrap: str, topic: str) -> Started:
    """A writer on the test's topic: with its changelog (``snapshots``) or without."""

    def start(*, snapshots: bool, **config: Any) -> AbstractAsyncContextManager[Writer]:
        state = state_topic_for(topic) if snapshots else None
        return started_writer(bootstrap, topic, state_topic=state, **config)

    return start


async def _write(writer: Writer, orders: int, *, prefix: str) -> list[CommandRequest]:
    """``orders`` whole life cycles, each command with an idempotency key of a caller."""
    sent = []
    for n in range(orders):
        for step, command in enumerate(lifecycle(f"{prefix}-{n}", n)):
            request = CommandRequest(
                command=command,
                idempotency_key=f"{prefix}-{n}-{step}",
                request_hash=f"h-{n}-{step}",
                actor=Actor(sub=f"c-{n % 3}"),
            )
            await writer.submit(request)
            sent.append(request)
    return sent


async def _folded(bootstrap: str, topic: str) -> dict[str, Any]:
    return folded_orders(await read_topic(bootstrap, topic, PARTITIONS))


async def _replays(writer: Writer, sent: list[CommandRequest]) -> bool:
    """Whether every command sent again (same caller, key and request) is answered from its
    receipt, appending nothing."""
    answers = [await writer.submit(request) for request in sent]
    return all(answer.replayed for answer in answers)


async def test_a_restart_reads_the_snapshot_and_no_event(
    writer_on: Started, bootstrap: str, topic: str
) -> None:
    await new_topic(bootstrap, topic, PARTITIONS)
    async with writer_on(snapshots=True) as first:
        sent = await _write(first, 24, prefix=uuid.uuid4().hex[:6])

    async with writer_on(snapshots=True) as restarted:
        assert restarted.loaded_events == 0  # every partition's position is its end
        assert restarted.loaded_state_records > 0
        assert restarted.orders == await _folded(bootstrap, topic)
        assert await _replays(restarted, sent[-20:])


async def test_a_log_written_without_snapshots_is_read_whole_once_then_from_its_snapshot(
    writer_on: Started, bootstrap: str, topic: str
) -> None:
    await new_topic(bootstrap, topic, PARTITIONS)
    async with writer_on(snapshots=False) as before:
        sent = await _write(before, 20, prefix=uuid.uuid4().hex[:6])
    events = len(await read_topic(bootstrap, topic, PARTITIONS))

    async with writer_on(snapshots=True) as first:  # reads it all, then tells the changelog
        assert first.loaded_events == events
        assert first.orders == await _folded(bootstrap, topic)
    async with writer_on(snapshots=True) as second:
        assert second.loaded_events == 0
        assert second.orders == await _folded(bootstrap, topic)
        assert await _replays(second, sent[-20:])


async def test_events_a_writer_without_snapshots_appended_are_the_tail_and_then_told(
    writer_on: Started, bootstrap: str, topic: str
) -> None:
    await new_topic(bootstrap, topic, PARTITIONS)
    prefix = uuid.uuid4().hex[:6]
    async with writer_on(snapshots=True) as first:
        await _write(first, 12, prefix=f"{prefix}-a")
    before = len(await read_topic(bootstrap, topic, PARTITIONS))
    async with writer_on(snapshots=False) as without:
        # Changes orders the changelog knows (placed ones get cancelled) and adds new ones.
        sent = await _write(without, 8, prefix=f"{prefix}-b")
        known = next(iter(without.orders))
    tail = len(await read_topic(bootstrap, topic, PARTITIONS)) - before

    async with writer_on(snapshots=True) as catching_up:
        assert catching_up.loaded_events == tail
        assert catching_up.orders == await _folded(bootstrap, topic)
        assert known in catching_up.orders
    async with writer_on(snapshots=True) as caught_up:
        assert caught_up.loaded_events == 0
        assert caught_up.orders == await _folded(bootstrap, topic)
        assert await _replays(caught_up, sent[-10:])


async def test_without_its_changelog_topic_the_writer_reads_the_whole_log(
    writer_on: Started, bootstrap: str, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    await new_topic(bootstrap, topic, PARTITIONS, snapshots=False)
    async with writer_on(snapshots=True) as first:
        await _write(first, 4, prefix=uuid.uuid4().hex[:6])
    assert f"no topic {state_topic_for(topic)}" in caplog.text
    async with writer_on(snapshots=True) as second:
        assert second.loaded_events == len(await read_topic(bootstrap, topic, PARTITIONS))
        assert second.orders == await _folded(bootstrap, topic)


async def test_records_a_killed_catch_up_left_without_a_position_count_for_nothing(
    writer_on: Started, bootstrap: str, topic: str
) -> None:
    await new_topic(bootstrap, topic, PARTITIONS)
    async with writer_on(snapshots=False) as before:
        await _write(before, 10, prefix=uuid.uuid4().hex[:6])
        orders = dict(before.orders)
    events = len(await read_topic(bootstrap, topic, PARTITIONS))
    # What a catch-up killed before it wrote a partition's position leaves in the changelog:
    # order states with no position (here, states no fold of the log would give).
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for order_id, order in orders.items():
            partition = partition_for(order_id.encode(), PARTITIONS)
            for _, key, value in snapshots.order_records(partition, replace(order, version=999)):
                await producer.send_and_wait(
                    state_topic_for(topic), value, key=key, partition=partition
                )
    finally:
        await producer.stop()

    async with writer_on(snapshots=True) as first:
        assert first.loaded_events == events  # the log, read whole: those records prove nothing
        assert first.orders == await _folded(bootstrap, topic)
    async with writer_on(snapshots=True) as second:
        assert second.loaded_events == 0
        assert second.orders == await _folded(bootstrap, topic)
