"""Exactly once under crashes: kill -9 the projector again and again while events stream in.

Afterwards every read-model table must equal the oracle, a pure fold of every event in the
topic. Figures are printed (run pytest with -s to see them).
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from projections.models.catalog import PROJECTIONS
from service.kernel import domain
from service.write.contract import CommandRequest, WriterConfig
from service.write.writer import Writer
from tests.support.log import LoggedEvent, read_topic
from tests.support.projection_harness import (
    differences,
    ends_of,
    oracle_contents,
    table_contents,
    wait_caught_up,
)
from tests.support.topics import new_topic

pytestmark = pytest.mark.chaos

PARTITIONS = 6
TARGET_EVENTS = 20_000


@dataclass
class Projector:
    """``orders projector`` as a child process, killed and restarted by the test."""

    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None
    kills: int = 0

    def start(self) -> None:
        with self.log.open("ab") as log:  # a file, not a pipe: a full pipe would block it
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service.edge.cli.main", "projector"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.kills += 1

    def terminate(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        return code


def _env(
    bootstrap: str, database_url: str, topic: str, group: str, instance: str | None
) -> dict[str, str]:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "DATABASE_URL": database_url,
        "ORDERS_TOPIC": topic,
        "ORDERS_GROUP_PREFIX": group,
    }
    if instance:
        env["ORDERS_PROJECTOR_INSTANCE_ID"] = instance
    return env


@pytest.fixture
async def writer(bootstrap: str, topic: str) -> AsyncIterator[Writer]:
    await new_topic(bootstrap, topic, PARTITIONS)
    writer = Writer(
        WriterConfig(
            kafka=bootstrap,
            topic=topic,
            transactional_id=f"chaos-{topic}",
            # Not about load shedding: a slow batch on a busy machine must not refuse commands.
            max_queue_delay=60,
        )
    )
    await writer.start()
    yield writer
    await writer.stop()


def _lifecycle(order_id: str, n: int) -> list[domain.Command]:
    """6 to 8 commands per order, ending delivered, cancelled (some after payment) or paid."""
    at = datetime.now(UTC)
    price = 100 + n % 900
    commands: list[domain.Command] = [
        domain.CreateOrder(
            order_id=order_id,
            at=at,
            customer_id=f"c-{n % 97}",
            currency=("EUR", "USD", "GBP")[n % 3],
        ),
        domain.AddItem(order_id=order_id, at=at, sku="A", name="a", quantity=2, unit_price=price),
        domain.AddItem(order_id=order_id, at=at, sku="B", name="b", quantity=1, unit_price=price),
        domain.ChangeItemQuantity(order_id=order_id, at=at, sku="B", quantity=3),
        domain.PlaceOrder(order_id=order_id, at=at),
        domain.PayOrder(
            order_id=order_id,
            at=at,
            amount=5 * price,
            currency=("EUR", "USD", "GBP")[n % 3],
            payment_reference=f"p-{n}",
        ),
    ]
    if n % 3 == 0:
        commands += [
            domain.ShipOrder(order_id=order_id, at=at, carrier="DHL", tracking_number=f"t-{n}"),
            domain.DeliverOrder(order_id=order_id, at=at),
        ]
    elif n % 3 == 1:
        commands.append(domain.CancelOrder(order_id=order_id, at=at, reason="r"))
    return commands


async def _stream(writer: Writer, *, events: int, seconds: float) -> int:
    """Append at least ``events`` events, spread over about ``seconds``, from 50 clients."""
    orders = events // 6 + 1
    per_second = events / seconds
    started = time.monotonic()
    written = 0
    next_order = 0

    async def client() -> None:
        nonlocal written, next_order
        while next_order < orders:
            n = next_order
            next_order += 1
            for command in _lifecycle(f"o-{n:06d}", n):
                await writer.submit(CommandRequest(command=command))
                written += 1
                ahead = written / per_second - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)  # rate limit of the load, not synchronisation

    await asyncio.gather(*(client() for _ in range(50)))
    return written


def _ends(events: list[LoggedEvent]) -> dict[int, int]:
    return ends_of((e.record.partition, e.record.offset) for e in events)


async def _against_the_oracle(engine: AsyncEngine, events: list[LoggedEvent]) -> list[str]:
    """Every difference between each projection's tables and a pure fold of the topic."""
    applied = [e.applied() for e in events]
    found = []
    for projection in PROJECTIONS.values():
        expected = oracle_contents(projection, applied)
        assert any(expected.values()), f"the oracle of {projection.name} is empty"
        found += differences(await table_contents(engine, projection), expected)
    return found


async def _until_logged(projector: Projector, pattern: re.Pattern[str], *, timeout: float) -> None:
    """Poll the projector's log until ``pattern`` shows up, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not pattern.search(projector.log.read_text(errors="replace")):
        assert time.monotonic() < deadline, f"{pattern.pattern!r} never appeared in its log"
        await asyncio.sleep(0.1)  # pacing between reads of the log


# The runner's line on each assignment: "orders: assigned partitions 0-2, 5, 7-8; ..."
_ASSIGNED = re.compile(r"orders: assigned partitions ([\d, -]+);")


def _assigned(log: str) -> list[int]:
    """How many partitions each assignment in ``log`` gave the instance, in order."""
    counts = []
    for spans in _ASSIGNED.findall(log):
        bounds = [span.split("-") for span in spans.split(", ")]
        counts.append(sum(int(b[-1]) - int(b[0]) + 1 for b in bounds))
    return counts


async def _until_sharing(projector: Projector, *, timeout: float) -> None:
    """Poll the projector's log until it was assigned some but not all of the partitions."""
    deadline = time.monotonic() + timeout
    while not any(0 < n < PARTITIONS for n in _assigned(projector.log.read_text(errors="replace"))):
        assert time.monotonic() < deadline, "the instance was never given a share of the partitions"
        await asyncio.sleep(0.1)  # pacing between reads of the log


async def _kill_repeatedly(
    projector: Projector, streaming: asyncio.Task[int], kills: int, rng: random.Random
) -> None:
    """kill -9 at random moments while the stream flows; at least ``kills`` times."""
    projector.start()
    while projector.kills < kills or not streaming.done():
        await asyncio.sleep(rng.uniform(0.4, 1.6))  # a random moment to crash at
        projector.kill()
        projector.start()


async def test_kill_minus_nine_at_random_moments_applies_every_event_exactly_once(
    writer: Writer,
    engine: AsyncEngine,
    database_url: str,
    bootstrap: str,
    topic: str,
    tmp_path: Path,
) -> None:
    rng = random.Random(os.environ.get("CHAOS_SEED", "20261128"))
    projector = Projector(
        _env(bootstrap, database_url, topic, f"chaos-{topic}", "p1"), tmp_path / "projector.log"
    )
    streaming = asyncio.create_task(_stream(writer, events=TARGET_EVENTS, seconds=12))
    await _kill_repeatedly(projector, streaming, kills=10, rng=rng)
    written = streaming.result()

    events = await read_topic(bootstrap, topic, PARTITIONS)
    await wait_caught_up(engine, topic, PROJECTIONS, _ends(events), timeout=180)
    assert projector.terminate() == 0
    found = await _against_the_oracle(engine, events)
    print(
        f"\nchaos: {len(events)} events in the topic ({written} commands acknowledged), "
        f"{projector.kills} kill -9 of the projector, differences from the oracle: {found}"
    )
    assert len(events) == written >= TARGET_EVENTS
    assert projector.kills >= 10
    assert found == []


async def test_two_instances_and_a_rebalance_mid_stream_still_equal_the_oracle(
    writer: Writer,
    engine: AsyncEngine,
    database_url: str,
    bootstrap: str,
    topic: str,
    tmp_path: Path,
) -> None:
    group = f"pair-{topic}"
    first = Projector(_env(bootstrap, database_url, topic, group, None), tmp_path / "first.log")
    second = Projector(_env(bootstrap, database_url, topic, group, None), tmp_path / "second.log")
    first.start()
    streaming = asyncio.create_task(_stream(writer, events=8_000, seconds=12))
    await _until_logged(first, re.compile(r"orders: assigned partitions"), timeout=60)
    second.start()  # a rebalance: the two instances now share the partitions
    await _until_sharing(second, timeout=60)
    await _until_sharing(first, timeout=60)
    assert not streaming.done(), "the stream ended before the instances shared it"
    assert first.terminate() == 0  # graceful leave: rebalance, second takes everything
    await streaming
    events = await read_topic(bootstrap, topic, PARTITIONS)
    await wait_caught_up(engine, topic, PROJECTIONS, _ends(events), timeout=120)
    assert second.terminate() == 0
    found = await _against_the_oracle(engine, events)
    print(f"\nrebalance: {len(events)} events, differences from the oracle: {found}")
    assert found == []
