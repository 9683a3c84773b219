"""The projector's and the rebuild's Prometheus series (docs/telemetry.md, "Projector"), against
the real broker and Postgres.

Values are read from the client library's default registry, which every test of the process
shares: counters are compared as deltas. The state series (lag, halts, parked events) exist
only while ``run_projector`` runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from prometheus_client import REGISTRY
from sqlalchemy.ext.asyncio import AsyncEngine

from projections.batches import Group
from projections.bookkeeping.checkpoints import StaleCheckpoint, advance_checkpoints
from projections.parking import ParkingRefused, park
from projections.projection import begin
from projections.rebuild import rebuild
from projections.runner import RunnerConfig, run_projector
from service.infra.embedded import free_port
from service.kernel.settings import Settings
from service.write.writer import Writer
from tests.support.lifecycles import write_orders
from tests.support.poison import not_json, produce
from tests.support.processes import ServiceProcess, service_env
from tests.support.projection_harness import (
    checkpoints,
    eventually,
    read_records,
    running,
    wait_caught_up,
)

PARTITIONS = 4
NAMES = ["orders", "order_history"]


def sample(name: str, **labels: str) -> float:
    """The current value of a series (0 when it has no sample)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def per_partition(name: str, projection: str) -> dict[int, float | None]:
    return {
        p: REGISTRY.get_sample_value(name, {"projection": projection, "partition": str(p)})
        for p in range(PARTITIONS)
    }


async def topic_events(bootstrap: str, topic: str) -> int:
    return sum(
        len(records) for records in (await read_records(bootstrap, topic, PARTITIONS)).values()
    )


@contextlib.asynccontextmanager
async def projector(
    db: AsyncEngine, bootstrap: str, topic: str, group_prefix: str, names: Sequence[str]
) -> AsyncIterator[asyncio.Task[None]]:
    """``run_projector`` of ``names`` in a task, until the block ends."""
    settings = Settings(
        kafka_bootstrap_servers=bootstrap, topic=topic, projection_group_prefix=group_prefix
    )
    stop = asyncio.Event()
    task = asyncio.create_task(run_projector(settings, db, stop, only=list(names)))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 45)


async def until(what: str, check: Any, task: asyncio.Task[None], timeout: float = 45) -> Any:
    """Poll ``check()`` (-> (done, detail)) while the projector ``task`` runs."""

    async def checked() -> tuple[bool, Any]:
        assert not task.done(), f"the projector stopped: {task}"
        return check()

    return await eventually(checked, what, timeout=timeout)


async def until_async(
    what: str, check: Callable[[], Awaitable[tuple[bool, Any]]], task: asyncio.Task[None]
) -> Any:
    async def checked() -> tuple[bool, Any]:
        assert not task.done(), f"the projector stopped: {task}"
        return await check()

    return await eventually(checked, what)


def caught_up(name: str) -> tuple[bool, Any]:
    events = per_partition("orders_projection_lag_events", name)
    seconds = per_partition("orders_projection_lag_seconds", name)
    return set(events.values()) == {0.0} and set(seconds.values()) == {0.0}, (events, seconds)


async def test_the_projector_counts_what_it_applies_and_its_lag_rises_and_falls_to_zero(
    db: AsyncEngine, writer: Writer, bootstrap: str, topic: str, group_prefix: str
) -> None:
    before = {
        name: (
            sample("orders_projection_events_applied_total", projection=name),
            sample("orders_projection_batch_events_sum", projection=name),
            sample("orders_projection_transaction_seconds_count", projection=name),
        )
        for name in NAMES
    }
    batches = sample("orders_projection_batch_seconds_count")
    rebalances = sample("orders_projection_rebalances_total")
    await write_orders(writer, [f"m-{n}" for n in range(12)])
    events = await topic_events(bootstrap, topic)
    assert events > 0

    async with projector(db, bootstrap, topic, group_prefix, NAMES) as task:
        for name in NAMES:

            def applied(name: str = name) -> tuple[bool, Any]:
                found = sample("orders_projection_events_applied_total", projection=name)
                return found - before[name][0] == events, found - before[name][0]

            await until(f"{name} to count {events} events", applied, task)
            assert sample("orders_projection_batch_events_sum", projection=name) == (
                before[name][1] + events
            ), "events per transaction add up to the events applied"
            assert (
                sample("orders_projection_transaction_seconds_count", projection=name)
                > (before[name][2])
            )
            await until(f"{name}'s lag to fall to 0", lambda name=name: caught_up(name), task)
        assert sample("orders_projection_assigned_partitions") == PARTITIONS
        assert sample("orders_projection_batch_seconds_count") > batches
        assert sample("orders_projection_rebalances_total") > rebalances
        for name in NAMES:
            assert (
                REGISTRY.get_sample_value(
                    "orders_projection_halted_partitions", {"projection": name}
                )
                == 0
            )
            await until(
                f"{name}'s parked count",
                lambda name=name: (
                    REGISTRY.get_sample_value(
                        "orders_projection_parked_events", {"projection": name}
                    )
                    == 0,
                    None,
                ),
                task,
            )

        # Held back: Postgres refuses every checkpoint move until the lock is let go, while
        # more events arrive.
        async with db.connect() as holder:
            await holder.execute(sa.text("LOCK TABLE projection_checkpoints IN EXCLUSIVE MODE"))
            held_at = time.time()
            more = await write_orders(writer, [f"m-held-{n}" for n in range(4)], first=100)
            waiting = {a.partition for a in more}

            def behind() -> tuple[bool, Any]:
                events = per_partition("orders_projection_lag_events", "orders")
                seconds = per_partition("orders_projection_lag_seconds", "orders")
                ok = (
                    all((events[p] or 0) > 0 for p in waiting)
                    and max(s or 0 for s in seconds.values()) >= 1.0
                )
                return ok, (events, seconds)

            _, seconds = await until("the lag to show the backlog", behind, task)
            assert max(s or 0 for s in seconds.values()) <= time.time() - held_at + 1.0, (
                "the lag in seconds is the age of the oldest event waiting, no more"
            )
            await holder.rollback()
        total = await topic_events(bootstrap, topic)

        def all_applied() -> tuple[bool, Any]:
            found = sample("orders_projection_events_applied_total", projection="orders")
            return found - before["orders"][0] == total, found - before["orders"][0]

        await until("the backlog to be applied", all_applied, task)
        for name in NAMES:
            await until(f"{name}'s lag to fall to 0 again", lambda name=name: caught_up(name), task)

    # Stopped: the runner's series are gone with it (the collector left the registry).
    assert REGISTRY.get_sample_value("orders_projection_assigned_partitions") is None
    assert per_partition("orders_projection_lag_events", "orders") == dict.fromkeys(
        range(PARTITIONS)
    )


async def test_a_halted_partition_shows_until_parked_and_the_parked_count_follows(
    db: AsyncEngine, writer: Writer, bootstrap: str, topic: str, group_prefix: str
) -> None:
    await write_orders(writer, ["h-0", "h-1"])
    async with projector(db, bootstrap, topic, group_prefix, ["orders"]) as task:
        await until("the lag to fall to 0", lambda: caught_up("orders"), task)
        poison_at = await produce(bootstrap, topic, 1, not_json("ghost"), b"ghost")

        def halted() -> tuple[bool, Any]:
            count = sample("orders_projection_halted_partitions", projection="orders")
            lag = per_partition("orders_projection_lag_events", "orders")[1]
            seconds = per_partition("orders_projection_lag_seconds", "orders")[1]
            return count == 1 and (lag or 0) >= 1 and (seconds or 0) > 0, (count, lag, seconds)

        await until("partition 1 to show halted, and behind", halted, task)
        assert sample("orders_projection_parked_events", projection="orders") == 0

        async def parks() -> tuple[bool, Any]:
            try:  # once the runner's housekeeping has stored the halt
                await park(db, bootstrap, topic, "orders", 1, poison_at)
            except ParkingRefused as refused:
                return False, refused
            return True, None

        await until_async("the poison to be parked", parks, task)

        def parked() -> tuple[bool, Any]:
            count = sample("orders_projection_halted_partitions", projection="orders")
            parked = sample("orders_projection_parked_events", projection="orders")
            return (count, parked) == (0, 1), (count, parked)

        await until("the halt to lift and the parked event to be counted", parked, task)
        await until("the lag to fall to 0 past the parked event", lambda: caught_up("orders"), task)


async def test_a_checkpoint_moved_by_another_instance_counts_a_conflict(
    db: AsyncEngine, writer: Writer, bootstrap: str, topic: str, group_prefix: str
) -> None:
    conflicts = sample("orders_projection_checkpoint_conflicts_total", projection="orders")
    first = await write_orders(writer, ["c-0"])
    async with running(db, bootstrap, topic, group_prefix, ["orders"], assigned=PARTITIONS) as run:
        await wait_caught_up(db, topic, ["orders"], {first[-1].partition: first[-1].offset + 1})
        (target,) = run.runner.targets
        partition = first[-1].partition
        # Another instance moves the checkpoint (compare-and-set: retried while this runner
        # moves it over a commit marker meanwhile).
        for _ in range(50):
            stored = (await checkpoints(db, "orders", topic))[partition]
            try:
                async with begin(db) as raw:
                    await advance_checkpoints(
                        raw, topic, [Group(target, partition, stored, stored + 2)]
                    )
                break
            except StaleCheckpoint:
                continue
        else:
            raise AssertionError("the runner kept moving the checkpoint")
        await write_orders(writer, ["c-1"], first=1)

        async def counted() -> tuple[bool, Any]:
            found = sample("orders_projection_checkpoint_conflicts_total", projection="orders")
            return found > conflicts, found

        await eventually(counted, "a checkpoint conflict to be counted", alive=run)


async def test_a_rebuild_exports_its_progress(
    db: AsyncEngine, writer: Writer, bootstrap: str, topic: str, group_prefix: str
) -> None:
    await write_orders(writer, [f"r-{n}" for n in range(20)])
    config = RunnerConfig(kafka=bootstrap, topic=topic, group_prefix=group_prefix)
    await rebuild(db, config, ["orders"], in_place=True, tick_s=0.05)
    # Offsets, as on the terminal: transaction markers take some (docs/telemetry.md).
    target = sample("orders_rebuild_events_target", projection="orders")
    replayed = sample("orders_rebuild_events_replayed", projection="orders")
    assert await topic_events(bootstrap, topic) <= replayed <= target
    assert sample("orders_rebuild_eta_seconds", projection="orders") == 0, "done"
    assert (
        REGISTRY.get_sample_value("orders_rebuild_events_per_second", {"projection": "orders"})
        is not None
    )


async def test_orders_projector_serves_its_series_on_its_metrics_port(
    db: AsyncEngine,
    writer: Writer,
    bootstrap: str,
    database_url: str,
    topic: str,
    tmp_path: Path,
) -> None:
    await write_orders(writer, ["s-0"])
    port = free_port()
    env = service_env(
        bootstrap=bootstrap, database_url=database_url, topic=topic, partitions=4, name=topic
    )
    process = ServiceProcess(
        ["projector", "--metrics-port", str(port)], env, tmp_path / "projector.log"
    )
    process.start()
    try:
        async with httpx.AsyncClient(timeout=5.0) as client:

            async def scraped() -> tuple[bool, Any]:
                assert process.alive, process.tail()
                try:
                    text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
                except httpx.TransportError:
                    return False, "not listening yet"
                wanted = [
                    f"orders_projection_assigned_partitions {PARTITIONS}.0",
                    'orders_projection_events_applied_total{projection="orders"}',
                    'orders_projection_lag_seconds{partition="0",projection="orders"} 0.0',
                    'orders_projection_halted_partitions{projection="orders"} 0.0',
                ]
                missing = [line for line in wanted if line not in text]
                return not missing, missing

            await eventually(scraped, "the projector's series on its metrics port", timeout=90)
    finally:
        await asyncio.to_thread(process.terminate, grace_seconds=30)
