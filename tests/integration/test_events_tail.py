"""``orders events tail`` against the real broker, on what the real writer wrote.

What the writer told each command (order, version, partition, offset: every accepted command is
exactly one event) is the expectation the tail's output is checked against.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from service.edge.cli.tail import TailOptions, partition_for, tail
from service.infra.topic import TopicMissing
from service.kernel import domain
from service.kernel.envelope import CURRENT_SCHEMA_VERSION
from service.write.contract import Accepted, CommandRequest
from service.write.writer import Writer

PARTITIONS = 4
DEADLINE = 60.0
ORDERS_CLI = Path(sys.executable).parent / "orders"


@dataclass(frozen=True)
class Written:
    """One event the writer acknowledged."""

    order_id: str
    version: int
    type: str
    at: datetime
    partition: int
    offset: int


def _commands(order_id: str, items: int, at: datetime) -> list[domain.Command]:
    commands: list[domain.Command] = [
        domain.CreateOrder(order_id=order_id, at=at, customer_id="c-1", currency="EUR")
    ]
    commands += [
        domain.AddItem(
            order_id=order_id, at=at, sku=f"SKU-{n}", name=f"Item {n}", quantity=1, unit_price=100
        )
        for n in range(items)
    ]
    return commands


async def _submit(writer: Writer, command: domain.Command) -> Written:
    accepted: Accepted = await writer.submit(CommandRequest(command=command))
    event = "OrderCreated" if isinstance(command, domain.CreateOrder) else "ItemAdded"
    return Written(
        command.order_id, accepted.version, event, command.at, accepted.partition, accepted.offset
    )


async def _write(writer: Writer, order_id: str, items: int = 1) -> list[Written]:
    """Create an order with ``items`` items; what the writer acknowledged, event by event."""
    written = [await _submit(writer, c) for c in _commands(order_id, items, datetime.now(UTC))]
    assert [w.version for w in written] == list(range(1, items + 2)), "one command, one event"
    return written


async def _write_orders(writer: Writer, count: int) -> list[Written]:
    written = []
    for n in range(count):
        written += await _write(writer, f"order-{n:02d}-{uuid.uuid4().hex[:6]}", items=n % 3)
    return written


async def _tail(bootstrap: str, topic: str, **options: Any) -> list[str]:
    """The lines of a tail that must end by itself."""
    out = io.StringIO()
    async with asyncio.timeout(DEADLINE):
        printed = await tail(bootstrap, topic, out, TailOptions(**options))
    lines = out.getvalue().splitlines()
    assert printed == len(lines)
    return lines


@dataclass(frozen=True)
class Line:
    time: datetime
    partition: int
    offset: int
    order_id: str
    version: int
    type: str
    data: dict[str, object]


def _parse(line: str) -> Line:
    moment, position, order_id, version, event_type, data = line.split(maxsplit=5)
    partition, offset = position.split(":")
    assert version.startswith("v")
    return Line(
        datetime.fromisoformat(moment),
        int(partition),
        int(offset),
        order_id,
        int(version[1:]),
        event_type,
        json.loads(data),
    )


def _expected(written: Written) -> tuple[int, int, str, int, str]:
    return (written.partition, written.offset, written.order_id, written.version, written.type)


def _seen(line: Line) -> tuple[int, int, str, int, str]:
    return (line.partition, line.offset, line.order_id, line.version, line.type)


async def _produce_raw(
    bootstrap: str, topic: str, value: bytes, *, key: bytes | None, partition: int
) -> int:
    """A record the writer never wrote; returns its offset."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        metadata = await producer.send_and_wait(topic, value, key=key, partition=partition)
        return int(metadata.offset)
    finally:
        await producer.stop()


async def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)  # pacing between polls


# -- reading to the end -----------------------------------------------------------------------


async def test_from_the_beginning_it_shows_every_event_in_offset_order_and_stops_at_the_end(
    writer: Writer, bootstrap: str, topic: str
) -> None:
    written = await _write_orders(writer, 12)

    lines = [_parse(line) for line in await _tail(bootstrap, topic, from_beginning=True)]

    assert sorted(_seen(line) for line in lines) == sorted(_expected(w) for w in written)
    for partition in range(PARTITIONS):
        offsets = [line.offset for line in lines if line.partition == partition]
        assert offsets == sorted(offsets), f"partition {partition} out of offset order"
    assert len({line.partition for line in lines}) > 1, "the orders should span partitions"
    by_position = {(w.partition, w.offset): w for w in written}
    for line in lines:
        sent = by_position[(line.partition, line.offset)]
        assert line.time == sent.at.replace(microsecond=sent.at.microsecond // 1000 * 1000)
        if line.type == "OrderCreated":
            assert line.data == {"customer_id": "c-1", "currency": "EUR"}
        else:
            assert line.data["sku"] == f"SKU-{line.version - 2}"


async def test_an_empty_topic_prints_nothing_and_ends(
    writer: Writer, bootstrap: str, topic: str
) -> None:
    assert await _tail(bootstrap, topic, from_beginning=True) == []


async def test_limit_stops_after_that_many_events(
    writer: Writer, bootstrap: str, topic: str
) -> None:
    written = await _write(writer, "order-limit", items=5)

    lines = [_parse(line) for line in await _tail(bootstrap, topic, from_beginning=True, limit=4)]

    assert [_seen(line) for line in lines] == [_expected(w) for w in written[:4]]


# -- one order --------------------------------------------------------------------------------


async def test_partition_for_is_where_the_writer_put_each_order(writer: Writer) -> None:
    written = await _write_orders(writer, 40)

    partitions = list(range(PARTITIONS))
    for event in written:
        assert partition_for(event.order_id, partitions) == event.partition, event.order_id
    assert len({event.partition for event in written}) == PARTITIONS


async def test_order_filter_shows_exactly_that_orders_events_in_version_order(
    writer: Writer, bootstrap: str, topic: str
) -> None:
    written = await _write_orders(writer, 12)
    wanted = f"order-wanted-{uuid.uuid4().hex[:6]}"
    # Interleaved with other orders' events, some in the same partition.
    mine = await _write(writer, wanted, items=2)
    written += await _write_orders(writer, 12)
    mine += await _write(writer, wanted.replace("wanted", "other"), items=0)
    mine = [w for w in mine if w.order_id == wanted]
    mine_partition = mine[0].partition
    assert any(w.partition == mine_partition for w in written), "no neighbour in its partition"
    # A record keyed by the order in another partition: only visible if that one were read.
    elsewhere = (mine_partition + 1) % PARTITIONS
    await _produce_raw(bootstrap, topic, b"elsewhere", key=wanted.encode(), partition=elsewhere)

    lines = await _tail(bootstrap, topic, from_beginning=True, order_id=wanted)

    assert [_seen(_parse(line)) for line in lines] == [_expected(w) for w in mine]
    assert [_parse(line).version for line in lines] == [1, 2, 3]


async def test_an_order_with_no_events_prints_nothing(
    writer: Writer, bootstrap: str, topic: str
) -> None:
    await _write_orders(writer, 4)

    assert await _tail(bootstrap, topic, from_beginning=True, order_id="no-such-order") == []


# -- JSON ------------------------------------------------------------------------------------


async def test_json_lines_are_the_envelopes_with_their_positions(
    writer: Writer, bootstrap: str, topic: str
) -> None:
    written = await _write_orders(writer, 6)

    lines = await _tail(bootstrap, topic, from_beginning=True, as_json=True)

    objects = [json.loads(line) for line in lines]
    seen = sorted(
        (o["partition"], o["offset"], o["order_id"], o["version"], o["type"]) for o in objects
    )
    assert seen == sorted(_expected(w) for w in written)
    for obj in objects:
        assert obj["schema_version"] == CURRENT_SCHEMA_VERSION[obj["type"]]
        assert uuid.UUID(obj["event_id"])
        assert datetime.fromisoformat(obj["occurred_at"]).tzinfo is not None
        assert isinstance(obj["data"], dict)


# -- records that do not decode ---------------------------------------------------------------


async def test_an_undecodable_record_is_shown_and_the_tail_goes_on(
    writer: Writer, bootstrap: str, topic: str
) -> None:
    order_id = "order-with-garbage"
    written = await _write(writer, order_id, items=1)
    partition = written[0].partition
    garbage = await _produce_raw(
        bootstrap, topic, b"\xff\x00 not an envelope", key=order_id.encode(), partition=partition
    )
    unknown_type = await _produce_raw(
        bootstrap, topic, b'{"type": "Nonsense"}', key=None, partition=partition
    )
    # The same partition goes on after the garbage.
    add = domain.AddItem(
        order_id=order_id, at=datetime.now(UTC), sku="LATE", name="Late", quantity=1, unit_price=1
    )
    written.append(await _submit(writer, add))
    assert written[-1].partition == partition
    assert written[-1].offset > unknown_type

    lines = await _tail(bootstrap, topic, from_beginning=True)

    broken = [line for line in lines if "UNDECODABLE" in line]
    assert len(broken) == 2, lines
    assert f" {partition}:{garbage} " in broken[0]
    assert "not a valid envelope" in broken[0]
    assert order_id in broken[0]
    assert f" {partition}:{unknown_type} " in broken[1]
    decoded = [_seen(_parse(line)) for line in lines if "UNDECODABLE" not in line]
    assert decoded == [_expected(w) for w in written]

    objects = [
        json.loads(line)
        for line in await _tail(bootstrap, topic, from_beginning=True, as_json=True)
    ]
    assert [(o["partition"], o["offset"], o["key"]) for o in objects if "undecodable" in o] == [
        (partition, garbage, order_id),
        (partition, unknown_type, None),
    ]
    assert len(objects) == len(written) + 2

    # An order's undecodable records are found by their key.
    mine = await _tail(bootstrap, topic, from_beginning=True, order_id=order_id)
    assert len(mine) == len(written) + 1
    assert "UNDECODABLE" in mine[2]


# -- following --------------------------------------------------------------------------------


class Following:
    """A tail running as a task, its output polled."""

    def __init__(self, task: asyncio.Task[int], out: io.StringIO, stop: asyncio.Event) -> None:
        self.task, self.out, self.stop = task, out, stop

    def lines(self) -> list[str]:
        return self.out.getvalue().splitlines()

    async def until_shown(self, order_id: str, count: int) -> None:
        def shown() -> bool:
            if self.task.done():
                raise AssertionError(f"the tail ended: {self.task!r}")
            return sum(_parse(line).order_id == order_id for line in self.lines()) >= count

        await _until(shown, f"{count} events of {order_id}")

    async def stopped(self) -> int:
        self.stop.set()
        async with asyncio.timeout(DEADLINE):
            return await self.task


@contextlib.asynccontextmanager
async def following(bootstrap: str, topic: str, options: TailOptions) -> AsyncIterator[Following]:
    """A tail that has fixed its starting positions; stopped (or cancelled) on the way out."""
    out, stop, started = io.StringIO(), asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(tail(bootstrap, topic, out, options, stop=stop, started=started))
    waiter = asyncio.create_task(started.wait())
    try:
        async with asyncio.timeout(DEADLINE):
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
        assert started.is_set()
        yield Following(task, out, stop)
    finally:
        waiter.cancel()
        stop.set()
        if not task.done():
            try:
                async with asyncio.timeout(DEADLINE):
                    await task
            except TimeoutError:
                task.cancel()


async def test_without_from_beginning_it_follows_only_new_events(
    writer: Writer, bootstrap: str, topic: str
) -> None:
    old = await _write_orders(writer, 4)
    async with following(bootstrap, topic, TailOptions()) as tailing:
        new = await _write(writer, "order-new", items=2)
        await tailing.until_shown("order-new", 3)
        printed = await tailing.stopped()

    seen = [_seen(_parse(line)) for line in tailing.lines()]
    assert seen == [_expected(w) for w in new]
    assert printed == len(new)
    assert not {w.order_id for w in old} & {s[2] for s in seen}


async def test_from_the_beginning_with_follow_shows_old_and_new_events(
    writer: Writer, bootstrap: str, topic: str
) -> None:
    old = await _write(writer, "order-old", items=1)
    options = TailOptions(from_beginning=True, follow=True)
    async with following(bootstrap, topic, options) as everything:
        await everything.until_shown("order-old", 2)
        new = await _write(writer, "order-new", items=1)
        await everything.until_shown("order-new", 2)
        await everything.stopped()

    assert [_seen(_parse(line)) for line in everything.lines()] == [_expected(w) for w in old + new]


async def test_following_one_order_shows_its_old_and_new_events_only(
    writer: Writer, bootstrap: str, topic: str
) -> None:
    old = await _write(writer, "order-mine", items=1)
    await _write_orders(writer, 3)
    options = TailOptions(from_beginning=True, follow=True, order_id="order-mine")
    async with following(bootstrap, topic, options) as mine:
        await _write_orders(writer, 3)
        add = domain.AddItem(
            order_id="order-mine", at=datetime.now(UTC), sku="X", name="X", quantity=1, unit_price=1
        )
        new = await _submit(writer, add)
        await mine.until_shown("order-mine", 3)
        await mine.stopped()

    assert [_seen(_parse(line)) for line in mine.lines()] == [_expected(w) for w in [*old, new]]


async def test_a_missing_topic_says_what_to_check(bootstrap: str, topic: str) -> None:
    with pytest.raises(TopicMissing, match=f"no topic {topic} at .*ORDERS_TOPIC"):
        await tail(bootstrap, topic, io.StringIO(), TailOptions(from_beginning=True))


# -- the command line -------------------------------------------------------------------------


async def _spawn(bootstrap: str, topic: str, *args: str) -> asyncio.subprocess.Process:
    """``orders events tail ARGS`` through the installed entry point, with no DATABASE_URL."""
    env = {name: value for name, value in os.environ.items() if name != "DATABASE_URL"}
    env.update(KAFKA_BOOTSTRAP_SERVERS=bootstrap, ORDERS_TOPIC=topic)
    return await asyncio.create_subprocess_exec(
        str(ORDERS_CLI),
        "events",
        "tail",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _cli(bootstrap: str, topic: str, *args: str) -> tuple[int, str, str]:
    process = await _spawn(bootstrap, topic, *args)
    async with asyncio.timeout(DEADLINE):
        stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_the_cli_prints_one_orders_events_without_a_database(
    writer: Writer, bootstrap: str, topic: str
) -> None:
    await _write_orders(writer, 6)
    mine = await _write(writer, "order-cli", items=2)

    code, out, err = await _cli(bootstrap, topic, "--from-beginning", "--order", "order-cli")
    assert code == 0, err
    assert [_seen(_parse(line)) for line in out.splitlines()] == [_expected(w) for w in mine]

    code, out, err = await _cli(bootstrap, topic, "--from-beginning", "--json", "--limit", "2")
    assert code == 0, err
    assert len([json.loads(line) for line in out.splitlines()]) == 2

    code, out, err = await _cli(bootstrap, f"{topic}.missing", "--from-beginning")
    assert code == 2
    assert f"no topic {topic}.missing at {bootstrap}" in err
    assert out == ""


async def test_the_cli_follows_until_ctrl_c_and_exits_with_0(
    writer: Writer, bootstrap: str, topic: str
) -> None:
    await _write_orders(writer, 2)
    process = await _spawn(bootstrap, topic)
    try:
        assert process.stdout is not None
        assert process.stderr is not None
        async with asyncio.timeout(DEADLINE):
            while b"following" not in (line := await process.stderr.readline()):
                assert line, "the tail ended before following"
        new = await _write(writer, "order-live", items=1)
        async with asyncio.timeout(DEADLINE):
            lines = [await process.stdout.readline() for _ in new]
        assert [_seen(_parse(line.decode())) for line in lines] == [_expected(w) for w in new]

        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(DEADLINE):
            rest, _ = await process.communicate()
        assert process.returncode == 0
        assert rest == b""
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
