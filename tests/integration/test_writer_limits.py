"""The writer's limits against the real broker (design.md 9): overload is refused fast and never
queued without bound, a command nobody waits for any more is not decided, and who sent each
command, with its idempotency keys, survives a restart."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from service.kernel.access import Actor
from service.kernel.domain import CreateOrder
from service.write.contract import Accepted, CommandRequest, WriterConfig, WriterOverloaded
from service.write.writer import Writer
from tests.support.log import LoggedEvent, folded_orders, read_topic
from tests.support.topics import new_topic

PARTITIONS = 4
ALICE = Actor(sub="alice", client_id="shop-web")
BOB = Actor(sub="bob")
StartWriter = Callable[..., Awaitable[Writer]]


@pytest.fixture
async def start_writer(bootstrap: str, topic: str) -> AsyncIterator[StartWriter]:
    """Starts writers on the test's topic with the configuration given; stops them after."""
    started: list[Writer] = []

    async def start(**config: Any) -> Writer:
        await new_topic(bootstrap, topic, PARTITIONS)
        writer = Writer(
            WriterConfig(
                kafka=bootstrap,
                topic=topic,
                transactional_id=f"writer-{uuid.uuid4().hex[:8]}",
                commit_timeout=10,
                **config,
            )
        )
        await writer.start()
        started.append(writer)
        return writer

    yield start
    for writer in reversed(started):
        if writer.ready:
            await writer.stop()


def _create(order_id: str | None = None, *, at: datetime | None = None, **fields: Any) -> Any:
    command = CreateOrder(
        order_id=order_id or f"o-{uuid.uuid4().hex[:10]}",
        at=at or datetime.now(UTC),
        customer_id="c-1",
        currency="EUR",
    )
    return CommandRequest(command=command, **fields)


async def _logged(bootstrap: str, topic: str) -> dict[str, list[LoggedEvent]]:
    events = await read_topic(bootstrap, topic, PARTITIONS)
    grouped: dict[str, list[LoggedEvent]] = {}
    for event in events:
        grouped.setdefault(event.envelope.order_id, []).append(event)
    return grouped


async def _until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll ``condition`` until it holds, failing after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting: {what}"
        await asyncio.sleep(0.02)  # polling interval, bounded by the deadline


# -- overload ---------------------------------------------------------------------------------


async def test_a_flood_beyond_capacity_is_refused_fast_and_every_accepted_command_is_logged(
    start_writer: StartWriter, bootstrap: str, topic: str
) -> None:
    max_queue_delay = 0.1
    writer = await start_writer(max_batch=5, max_queue_delay=max_queue_delay)
    # One at a time, so that the writer learns what a transaction costs.
    warm_up = [await writer.submit(_create()) for _ in range(5)]
    loop = asyncio.get_running_loop()

    async def timed(request: CommandRequest) -> tuple[Accepted | Exception, float]:
        started = loop.time()
        try:
            return await writer.submit(request), loop.time() - started
        except Exception as error:
            return error, loop.time() - started

    flood = [_create() for _ in range(300)]
    outcomes = await asyncio.wait_for(asyncio.gather(*(timed(r) for r in flood)), 60)

    accepted = [answer for answer, _ in outcomes if isinstance(answer, Accepted)]
    refused = [(answer, took) for answer, took in outcomes if not isinstance(answer, Accepted)]
    assert accepted, "the flood took nothing"
    assert refused, "the flood was all taken: the writer queued without bound"
    assert {type(answer) for answer, _ in refused} == {WriterOverloaded}, refused[:3]
    assert {getattr(answer, "retry_after", None) for answer, _ in refused} == {1}
    # Before its deadline only the estimate refuses: at once, without queueing the command.
    assert min(took for _, took in refused) < max_queue_delay
    logged = await _logged(bootstrap, topic)
    assert set(logged) == {answer.order_id for answer in [*warm_up, *accepted]}
    assert writer.orders == folded_orders(await read_topic(bootstrap, topic, PARTITIONS))


async def test_a_command_still_queued_at_its_deadline_is_refused_and_never_written(
    start_writer: StartWriter, bootstrap: str, topic: str
) -> None:
    writer = await start_writer(max_queue_delay=0.2)
    late, later = _create(), _create()
    loop = asyncio.get_running_loop()

    async with writer._busy:  # the decision loop cannot begin a batch meanwhile
        started = loop.time()
        with pytest.raises(WriterOverloaded, match="at capacity"):
            await asyncio.wait_for(writer.submit(late), 10)
        assert loop.time() - started > 0.19  # refused at its deadline, not on arrival
    accepted = await asyncio.wait_for(writer.submit(later), 10)  # decided after late's batch

    assert set(await _logged(bootstrap, topic)) == {accepted.order_id}
    assert late.command.order_id not in writer.orders


# -- callers that stop waiting ----------------------------------------------------------------


async def _submit_signalling(writer: Writer, request: CommandRequest, queued: asyncio.Event) -> Any:
    queued.set()  # submit queues the command before it first waits: once this task yields
    return await writer.submit(request)


async def test_a_command_whose_caller_stops_waiting_while_it_is_queued_is_never_written(
    start_writer: StartWriter, bootstrap: str, topic: str
) -> None:
    writer = await start_writer(max_queue_delay=30)
    abandoned, later = _create(), _create()

    async with writer._busy:  # the decision loop cannot begin a batch meanwhile
        queued = asyncio.Event()
        caller = asyncio.create_task(_submit_signalling(writer, abandoned, queued))
        await queued.wait()
        caller.cancel()  # the client hung up
        with pytest.raises(asyncio.CancelledError):
            await caller
    accepted = await asyncio.wait_for(writer.submit(later), 10)  # decided after abandoned's

    assert set(await _logged(bootstrap, topic)) == {accepted.order_id}
    assert abandoned.command.order_id not in writer.orders


async def test_a_command_whose_batch_began_completes_when_its_caller_stops_waiting(
    start_writer: StartWriter, bootstrap: str, topic: str
) -> None:
    writer = await start_writer()
    producer = writer._appender.producer
    assert producer is not None
    commit = producer.commit_transaction
    committing, go_on = asyncio.Event(), asyncio.Event()

    async def commit_when_told() -> None:
        committing.set()
        await go_on.wait()
        await commit()

    producer.commit_transaction = commit_when_told  # type: ignore[method-assign]
    request = _create()
    caller = asyncio.create_task(writer.submit(request))
    await asyncio.wait_for(committing.wait(), 10)  # its batch has begun: appended, committing
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    go_on.set()

    await _until(lambda: request.command.order_id in writer.orders, "the commit to complete")
    assert set(await _logged(bootstrap, topic)) == {request.command.order_id}


# -- who sent it, and its keys, from the log --------------------------------------------------


async def test_actors_and_each_callers_receipts_survive_a_restart(
    start_writer: StartWriter, bootstrap: str, topic: str
) -> None:
    first = await start_writer()
    alices = _create(actor=ALICE, idempotency_key="k", request_hash="h-alice")
    bobs = _create(actor=BOB, idempotency_key="k", request_hash="h-bob")
    two_days_ago = datetime.now(UTC) - timedelta(days=2)
    expired = _create(at=two_days_ago, actor=ALICE, idempotency_key="old", request_hash="h-old")
    answers = [await first.submit(request) for request in (alices, bobs, expired)]
    assert len({answer.order_id for answer in answers}) == 3  # the same key, two commands
    await first.stop()

    restarted = await start_writer()

    logged = await _logged(bootstrap, topic)
    assert {
        order_id: [event.envelope.actor for event in events] for order_id, events in logged.items()
    } == {answers[0].order_id: [ALICE], answers[1].order_id: [BOB], answers[2].order_id: [ALICE]}
    assert restarted.orders == folded_orders(await read_topic(bootstrap, topic, PARTITIONS))
    # Each caller's key answers as before; the one older than the TTL was not even loaded.
    assert set(restarted._committed.receipts) == {("alice", "k"), ("bob", "k")}
    again = [
        await restarted.submit(_create(actor=actor, idempotency_key="k", request_hash=hashed))
        for actor, hashed in ((ALICE, "h-alice"), (BOB, "h-bob"))
    ]
    assert again == [answer.as_replayed() for answer in answers[:2]]
    renewed = await restarted.submit(
        _create(actor=ALICE, idempotency_key="old", request_hash="h-other")
    )
    assert not renewed.replayed
    assert renewed.order_id != answers[2].order_id
