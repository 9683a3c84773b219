"""Rebuilding read models from the log (issue 5), against the real broker and Postgres.

Blue/green: a new version is built next to the live one while commands flow and queries read;
one transaction switches readers. The checks: no query ever fails or sees a read model that
went backwards (a partial one would), and afterwards every table equals the oracle, a pure fold
of every event in the topic. Interrupted rebuilds (a stop, a kill -9) leave readers on a
complete version and resume. In place: the stop-the-world variant.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from projections.bookkeeping.checkpoints import behind
from projections.models import catalog
from projections.projection import begin
from projections.rebuild import (
    REBUILD_LOCK_SPACE,
    RebuildAlreadyRunning,
    RebuildInterrupted,
    rebuild,
)
from projections.replay_progress import Progress
from projections.runner import ProjectionRunner, RunnerConfig
from projections.schema import schema_for
from projections.versions import (
    VersionIsLive,
    build_indexes,
    building,
    create_building,
    drop,
    live_targets,
    switch,
)
from service.edge.http.app import Resources, create_app
from service.write.contract import Accepted
from service.write.writer import Writer
from tests.support.http import serve
from tests.support.identity import access
from tests.support.lifecycles import write_orders
from tests.support.projection_harness import (
    assert_tables_equal_oracle,
    checkpoints,
    decoded,
    ends_of,
    eventually,
    read_records,
    running,
    wait_caught_up,
)

PARTITIONS = 4
ALL = list(catalog.PROJECTIONS)
PROJECT = Path(__file__).resolve().parents[2]
# An in-place rebuild of a few thousand events, while commands keep arriving, ends within this.
REBUILD_UNDER_LOAD_S = 30.0


def config_for(bootstrap: str, topic: str, group_prefix: str) -> RunnerConfig:
    return RunnerConfig(kafka=bootstrap, topic=topic, group_prefix=group_prefix)


def ends(accepted: list[Accepted]) -> dict[int, int]:
    return ends_of((a.partition, a.offset) for a in accepted)


async def live_versions(db: AsyncEngine) -> dict[str, dict[int, str]]:
    async with db.connect() as connection:
        rows = (
            await connection.execute(
                sa.text("SELECT projection, version, state FROM projection_versions")
            )
        ).all()
    found: dict[str, dict[int, str]] = {}
    for projection, version, state in rows:
        found.setdefault(projection, {})[version] = state
    return found


async def live_now(db: AsyncEngine) -> dict[str, int]:
    """Each projection's live version (tests of one module share a database)."""
    return {
        name: next(v for v, state in versions.items() if state == "live")
        for name, versions in (await live_versions(db)).items()
    }


async def views_point_at(db: AsyncEngine) -> dict[str, str]:
    """Each read-model view -> the schema of the tables it reads."""
    names = [table.name for p in catalog.PROJECTIONS.values() for table in p.tables]
    async with db.connect() as connection:
        rows = (
            await connection.execute(
                sa.text(
                    "SELECT v.relname AS view, t.relnamespace::regnamespace::text AS schema "
                    "FROM pg_class v JOIN pg_depend d ON d.refobjid = v.oid "
                    "JOIN pg_rewrite r ON r.oid = d.objid "
                    "JOIN pg_depend d2 ON d2.objid = r.oid AND d2.refobjid <> v.oid "
                    "JOIN pg_class t ON t.oid = d2.refobjid AND t.relkind = 'r' "
                    "WHERE v.relkind = 'v' AND v.relnamespace = 'public'::regnamespace "
                    "AND v.relname = ANY(:names) GROUP BY v.relname, t.relnamespace"
                ),
                {"names": names},
            )
        ).all()
    return {row.view: row.schema for row in rows}


async def index_definitions(db: AsyncEngine, versions: dict[str, int]) -> dict[str, set[str]]:
    """Per projection, every index of its version's tables (keys too), without the schema."""
    found = {}
    async with db.connect() as connection:
        for name, version in versions.items():
            schema = schema_for(name, version)
            rows = await connection.execute(
                sa.text("SELECT indexdef FROM pg_indexes WHERE schemaname = :schema"),
                {"schema": schema},
            )
            found[name] = {
                row[0].replace(f'"{schema}".', "").replace(f"{schema}.", "") for row in rows
            }
    return found


async def schemas(db: AsyncEngine) -> set[str]:
    async with db.connect() as connection:
        rows = await connection.execute(
            sa.text("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'proj\\_%'")
        )
        return {row[0] for row in rows}


class Readers:
    """Clients querying throughout: every answer must come from a complete read model.

    An order read with the consistency token of its last acknowledged command must be there
    at (at least) that version; a customer's order count and the day's totals never go down.
    A partial read model breaks one of these.
    """

    def __init__(self, client: httpx.AsyncClient, known: dict[str, Accepted], seed: int) -> None:
        self.client = client
        self.known = known
        self.rng = random.Random(seed)
        self.reads = 0
        self.failures: list[str] = []
        self.customer_counts: dict[str, int] = {}
        self.placed_today = 0

    async def run(self, stop: asyncio.Event) -> None:
        today = datetime.now(UTC).date()
        report = f"/reports/daily-sales?from={today - timedelta(days=1)}&to={today + timedelta(1)}"
        while not stop.is_set():
            order_id, accepted = self.rng.choice(list(self.known.items()))
            response = await self.client.get(
                f"/orders/{order_id}",
                headers={"X-Consistency-Token": accepted.consistency_token},
            )
            if response.status_code != 200 or response.json()["version"] < accepted.version:
                self.failures.append(f"order {order_id}: {response.status_code} {response.text}")
            customer = response.json().get("customer_id") if response.status_code == 200 else None
            if customer is not None:
                summary = await self.client.get(f"/customers/{customer}/summary")
                count = -1  # neither found nor missing: a failure
                if summary.status_code == 200:
                    count = summary.json()["order_count"]
                elif summary.status_code == 404:
                    count = 0
                if count < self.customer_counts.get(customer, 0):
                    self.failures.append(f"customer {customer}: {summary.status_code} {count}")
                self.customer_counts[customer] = max(count, self.customer_counts.get(customer, 0))
            sales = await self.client.get(report)
            rows = sales.json()["rows"] if sales.status_code == 200 else []
            placed = sum(row["orders_placed"] for row in rows)
            if sales.status_code != 200 or placed < self.placed_today:
                self.failures.append(f"daily sales: {sales.status_code} {placed}")
            self.placed_today = max(self.placed_today, placed)
            self.reads += 1


async def keep_writing(
    writer: Writer, known: dict[str, Accepted], accepted: list[Accepted], stop: asyncio.Event
) -> None:
    """Orders keep coming (bounded): each acknowledged command becomes known to the readers."""
    for batch in range(60):
        if stop.is_set():
            return
        ids = [f"flow-{batch}-{i}" for i in range(10)]
        written = await write_orders(writer, ids, first=1000 + batch * 10, clients=10)
        accepted.extend(written)
        for done in written:
            if done.version >= known.get(done.order_id, done).version:
                known[done.order_id] = done


def latest(accepted: list[Accepted]) -> dict[str, Accepted]:
    known: dict[str, Accepted] = {}
    for done in accepted:
        if done.order_id not in known or done.version > known[done.order_id].version:
            known[done.order_id] = done
    return known


async def the_oracle_holds(db: AsyncEngine, bootstrap: str, topic: str) -> None:
    events = decoded(await read_records(bootstrap, topic, PARTITIONS))
    await assert_tables_equal_oracle(db, ALL, events)


async def test_a_rebuild_while_commands_flow_never_shows_a_partial_read_model(
    db: AsyncEngine, writer: Writer, bootstrap: str, topic: str, group_prefix: str
) -> None:
    accepted = await write_orders(writer, [f"seed-{i}" for i in range(300)])
    known = latest(accepted)
    old = await live_now(db)
    new = {name: version + 1 for name, version in old.items()}
    old_indexes = await index_definitions(db, old)
    assert all(old_indexes.values())
    app = create_app(Resources(engine=db, topic=topic, consistency_wait_ms=30_000), access=access())
    progress: list[Progress] = []
    async with (
        running(db, bootstrap, topic, group_prefix, ALL, assigned=PARTITIONS) as run,
        serve(app) as client,
    ):
        await wait_caught_up(db, topic, ALL, ends(accepted), alive=run)
        stop = asyncio.Event()
        readers = [Readers(client, known, seed) for seed in range(3)]
        tasks = [asyncio.create_task(r.run(stop)) for r in readers]
        tasks.append(asyncio.create_task(keep_writing(writer, known, accepted, stop)))
        try:
            result = await rebuild(
                db,
                config_for(bootstrap, topic, group_prefix),
                ALL,
                on_progress=progress.append,
                tick_s=0.2,
                batch=500,
                workers=2,  # this process and one `orders projections build` process
            )
            reads_at_switch = sum(r.reads for r in readers)

            async def read_on() -> tuple[bool, Any]:
                reads = sum(r.reads for r in readers) - reads_at_switch
                return reads >= 30, reads

            await eventually(read_on, "queries answered by the new versions", alive=run)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        await wait_caught_up(db, topic, ALL, ends(accepted), alive=run, timeout=90)

    failures = [failure for r in readers for failure in r.failures]
    assert not failures, f"{len(failures)} bad answers, e.g. {failures[:5]}"
    assert sum(r.reads for r in readers) >= 60
    assert sorted(result.switched) == sorted(f"{name} v{new[name]}" for name in ALL)
    assert sorted(result.dropped) == sorted(f"{name} v{old[name]}" for name in ALL)
    assert await live_now(db) == new
    assert set((await views_point_at(db)).values()) == {schema_for(n, new[n]) for n in ALL}
    assert await schemas(db) == {schema_for(name, new[name]) for name in ALL}
    # Keys (some added only after the load) and secondary indexes, as the old versions had.
    assert await index_definitions(db, new) == old_indexes
    assert {p.phase for p in progress} >= {"replaying", "indexing", "switching", "done"}
    assert result.topic_events > 0
    assert result.rate > 0
    # Stopped by SIGTERM after the switch: exit 0 (or -SIGTERM, had it not started up yet).
    assert result.builder_exit_codes in ([0], [-signal.SIGTERM]), result.builder_exit_codes
    await the_oracle_holds(db, bootstrap, topic)


async def projected_orders(
    db: AsyncEngine,
    writer: Writer,
    bootstrap: str,
    topic: str,
    group_prefix: str,
    prefix: str,
    count: int,
) -> list[Accepted]:
    """``count`` orders (ids ``<prefix>-<n>``) written, and applied by the live versions of
    every projection."""
    accepted = await write_orders(writer, [f"{prefix}-{n}" for n in range(count)])
    async with running(db, bootstrap, topic, group_prefix, ALL, assigned=PARTITIONS) as run:
        await wait_caught_up(db, topic, ALL, ends(accepted), alive=run)
    return accepted


async def test_a_stopped_rebuild_keeps_readers_on_the_old_version_and_the_next_run_resumes(
    db: AsyncEngine, writer: Writer, bootstrap: str, topic: str, group_prefix: str
) -> None:
    accepted = await projected_orders(db, writer, bootstrap, topic, group_prefix, "o", 400)
    config = config_for(bootstrap, topic, group_prefix)
    stop = asyncio.Event()
    old = await live_now(db)
    new = {name: version + 1 for name, version in old.items()}

    def stop_midway(progress: Progress) -> None:
        if 0 < progress.position < progress.end:
            stop.set()

    with pytest.raises(RebuildInterrupted, match="run the same rebuild again"):
        await rebuild(db, config, ALL, on_progress=stop_midway, stop=stop, tick_s=0.05, batch=100)
    assert await live_versions(db) == {
        name: {old[name]: "live", new[name]: "building"} for name in ALL
    }
    assert set((await views_point_at(db)).values()) == {schema_for(n, old[n]) for n in ALL}
    built = await checkpoints_of_version(db, topic, new)
    total = sum(ends(accepted).values())
    # Each new version part-built: some of the topic's offsets applied, not all of them.
    assert set(built) == set(ALL), built
    assert all(0 < applied < total for applied in built.values()), (built, total)
    await the_oracle_holds(db, bootstrap, topic)  # readers see the old, complete version

    again = await rebuild(db, config, ALL, tick_s=0.1)
    assert sorted(again.switched) == sorted(f"{name} v{new[name]}" for name in ALL)
    # Resumed, not restarted: the second run read only what the first had not applied.
    assert again.topic_events < sum(ends(accepted).values())
    assert set((await views_point_at(db)).values()) == {schema_for(n, new[n]) for n in ALL}
    await the_oracle_holds(db, bootstrap, topic)


async def build_until_caught_up(
    db: AsyncEngine, config: RunnerConfig, names: list[str], topic: str
) -> None:
    """New versions of ``names``, filled (as a rebuild's builder does) until each has applied
    all that its live version has: the next rebuild resumes them and can switch at once."""
    projections = [catalog.PROJECTIONS[name] for name in names]
    async with begin(db) as connection:
        pairs = [
            (live, await create_building(connection, live))
            for live in await live_targets(connection, projections)
        ]
    builder = ProjectionRunner(projections, db, config, building=True)
    stop = asyncio.Event()
    task = asyncio.create_task(builder.run(stop))

    async def caught_up() -> tuple[bool, Any]:
        assert not task.done(), task
        async with begin(db) as connection:
            lagging = {str(new): await behind(connection, live, new, topic) for live, new in pairs}
        return not any(lagging.values()), lagging

    try:
        await eventually(caught_up, "the new versions to catch up with the live ones")
    finally:
        stop.set()
        await task


@pytest.mark.parametrize("stopped_at", [1, 2])
async def test_a_rebuild_stopped_while_indexing_switches_nothing_more(
    db: AsyncEngine, writer: Writer, bootstrap: str, topic: str, group_prefix: str, stopped_at: int
) -> None:
    """Ctrl-C as the rebuild starts indexing its ``stopped_at``-th projection: that one and
    those after it stay on their old versions, and the message names what was switched."""
    await projected_orders(db, writer, bootstrap, topic, group_prefix, "i", 100)
    names = ["orders", "daily_sales"]
    config = config_for(bootstrap, topic, group_prefix)
    old = await live_now(db)
    await build_until_caught_up(db, config, names, topic)  # nothing left but to switch
    stop = asyncio.Event()
    phases: list[str] = []

    def stop_at_indexing(progress: Progress) -> None:  # as Ctrl-C would, at that very moment
        phases.append(progress.phase)
        if progress.phase == "indexing" and phases.count("indexing") == stopped_at:
            stop.set()

    with pytest.raises(RebuildInterrupted) as interrupted:
        await rebuild(db, config, names, on_progress=stop_at_indexing, stop=stop, tick_s=0.05)
    assert phases.count("indexing") == stopped_at, phases
    switched = names[: stopped_at - 1]
    expected = {name: {old[name]: "live"} for name in ALL}
    for name in names:
        expected[name] = (
            {old[name]: "dropped", old[name] + 1: "live"}
            if name in switched
            else {old[name]: "live", old[name] + 1: "building"}
        )
    assert await live_versions(db) == expected
    now = await live_now(db)
    assert set((await views_point_at(db)).values()) == {schema_for(n, now[n]) for n in ALL}
    message = str(interrupted.value)
    if switched:
        assert f"after switching orders v{old['orders'] + 1} (readers now see" in message, message
        assert "`orders projections rebuild daily_sales` to resume them" in message, message
    else:
        assert "readers stay on the live versions" in message, message
    await the_oracle_holds(db, bootstrap, topic)  # whatever serves is complete


async def checkpoints_of_version(
    db: AsyncEngine, topic: str, versions: dict[str, int]
) -> dict[str, int]:
    """projection -> sum of its checkpoints at the given version."""
    async with db.connect() as connection:
        rows = await connection.execute(
            sa.text(
                "SELECT projection, version, sum(next_offset)::bigint FROM projection_checkpoints "
                "WHERE topic = :t GROUP BY projection, version"
            ),
            {"t": topic},
        )
        return {row[0]: row[2] for row in rows if versions.get(row[0]) == row[1]}


def cli(bootstrap: str, database_url: str, topic: str, *args: str) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "DATABASE_URL": database_url,
        "ORDERS_TOPIC": topic,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "service.edge.cli.main", *args],
        cwd=PROJECT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


async def test_a_rebuild_killed_at_a_random_moment_leaves_complete_read_models_and_resumes(
    db: AsyncEngine,
    writer: Writer,
    bootstrap: str,
    topic: str,
    group_prefix: str,
    database_url: str,
) -> None:
    rng = random.Random()
    accepted = await write_orders(writer, [f"k-{i}" for i in range(500)])
    total = sum(ends(accepted).values())
    async with running(db, bootstrap, topic, group_prefix, ALL, assigned=PARTITIONS) as run:
        await wait_caught_up(db, topic, ALL, ends(accepted), alive=run)
    old = await live_now(db)
    new = {name: version + 1 for name, version in old.items()}

    process = cli(bootstrap, database_url, topic, "projections", "rebuild", "all", "--batch", "50")
    try:

        async def building() -> tuple[bool, Any]:
            assert process.poll() is None, process.communicate()[0]
            built = await checkpoints_of_version(db, topic, new)
            return sum(built.values()) > 0, built

        await eventually(building, "the rebuild to apply its first batches", timeout=90)
        delay = rng.uniform(0, 1.5)
        await asyncio.sleep(delay)  # a random moment to kill at, not synchronisation
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        output = process.communicate()[0]
    print(f"killed the rebuild {delay:.2f}s into its replay")

    # Whatever moment it died at, every view reads a complete version.
    now = await live_now(db)
    assert all(now[name] in {old[name], new[name]} for name in ALL), now
    await the_oracle_holds(db, bootstrap, topic)

    process = cli(bootstrap, database_url, topic, "projections", "rebuild", "all")
    output, _ = await asyncio.to_thread(process.communicate, timeout=180)
    assert process.returncode == 0, output
    assert "now live:" in output or "resuming" in output, output
    assert "events/s" in output, output
    # Resumed where the kill left it (or, if the kill came after a switch, rebuilt once more).
    now = await live_now(db)
    assert all(now[name] in {new[name], new[name] + 1} for name in ALL), now
    assert set((await views_point_at(db)).values()) == {schema_for(n, now[n]) for n in ALL}
    await the_oracle_holds(db, bootstrap, topic)
    assert total > 0


async def test_an_in_place_rebuild_empties_the_tables_and_replays_them(
    db: AsyncEngine, writer: Writer, bootstrap: str, topic: str, group_prefix: str
) -> None:
    accepted = await projected_orders(db, writer, bootstrap, topic, group_prefix, "p", 200)
    async with db.begin() as connection:  # damage the read models: a rebuild must repair them
        await connection.execute(sa.text("DELETE FROM orders WHERE order_id LIKE 'p-1%'"))
        await connection.execute(sa.text("UPDATE customer_summaries SET order_count = 0"))

    before = await live_versions(db)
    result = await rebuild(
        db, config_for(bootstrap, topic, group_prefix), ALL, in_place=True, tick_s=0.1
    )
    assert result.in_place
    assert not result.switched
    assert await live_versions(db) == before, "in place: the same versions stay live"
    for name in ALL:
        stored = await checkpoints(db, name, topic)
        assert all(stored[p] >= end for p, end in ends(accepted).items()), (name, stored)
    await the_oracle_holds(db, bootstrap, topic)


async def write_steadily(
    writer: Writer, accepted: list[Accepted], stop: asyncio.Event, *, orders: int, clients: int = 16
) -> None:
    """Order life cycles back to back, from ``clients`` clients, until ``stop`` or ``orders``."""

    async def client(first: int) -> None:
        for n in range(first, orders, clients):
            if stop.is_set():
                return
            accepted.extend(await write_orders(writer, [f"load-{n}"], first=n, clients=1))

    await asyncio.gather(*(client(first) for first in range(clients)))


async def still_writing(load: asyncio.Task[None], accepted: list[Accepted], count: int) -> None:
    """Wait until ``load`` has had more than ``count`` commands accepted, still running."""

    async def more() -> tuple[bool, Any]:
        assert not load.done(), f"the load is over: {load}"
        return len(accepted) > count, len(accepted)

    await eventually(more, f"more than {count} commands accepted")


async def test_an_in_place_rebuild_finishes_while_commands_keep_arriving(
    db: AsyncEngine, writer: Writer, bootstrap: str, topic: str, group_prefix: str
) -> None:
    """It replays what was committed when it began; what arrives later (and keeps arriving) is
    the live projector's business, as in normal running."""
    accepted = await projected_orders(db, writer, bootstrap, topic, group_prefix, "r", 200)
    initial = len(accepted)
    stop = asyncio.Event()
    # More orders than the rebuild can outlast: the load must still run when it is done.
    load = asyncio.create_task(write_steadily(writer, accepted, stop, orders=20_000, clients=32))
    try:
        await still_writing(load, accepted, len(accepted))
        acknowledged = ends(list(accepted))  # all in the log before the rebuild began
        result = await asyncio.wait_for(
            rebuild(db, config_for(bootstrap, topic, group_prefix), ALL, in_place=True),
            REBUILD_UNDER_LOAD_S,
        )
        for name in ALL:  # it did not stop short of them
            stored = await checkpoints(db, name, topic)
            assert all(stored[p] >= end for p, end in acknowledged.items()), (name, stored)
        # The load outlasted the rebuild, or the test would prove nothing.
        await still_writing(load, accepted, len(accepted))
    finally:
        stop.set()
        await load
    print(f"rebuilt in place in {result.seconds:.1f}s; {len(accepted) - initial} commands came")
    async with running(db, bootstrap, topic, group_prefix, ALL, assigned=PARTITIONS) as run:
        await wait_caught_up(db, topic, ALL, ends(accepted), alive=run, timeout=90)
    await the_oracle_holds(db, bootstrap, topic)


async def test_a_row_stored_twice_in_an_append_only_table_fails_the_build_loudly(
    db: AsyncEngine,
) -> None:
    """A building version's append-only table gets its key after the load: a row stored twice
    (which the checkpoints should make impossible) must stop the build, never go live."""
    history = catalog.PROJECTIONS["order_history"]
    async with begin(db) as connection:
        (live,) = await live_targets(connection, [history])
        new = await create_building(connection, live)
    try:
        row = ("o-1", 1, "e-1", "OrderCreated", 1, datetime.now(UTC), "c-1", "c-1", "{}", 0, 0)
        async with begin(db) as connection:
            await connection.executemany(
                f'INSERT INTO "{new.schema}".order_history VALUES '
                "($1, $2, $3, $4, $5, $6, $7, $8, $9::text::jsonb, $10, $11)",
                [row, row],
            )
        with pytest.raises(asyncpg.UniqueViolationError):
            async with begin(db) as connection:
                await build_indexes(connection, live, new)
    finally:
        async with begin(db) as connection:
            await drop(connection, new)


async def rebuild_locks_held(db: AsyncEngine) -> list[str]:
    """The sessions holding a rebuild lock, by application name."""
    async with db.connect() as connection:
        rows = await connection.execute(
            sa.text(
                "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = :space"
            ),
            {"space": REBUILD_LOCK_SPACE},
        )
        return [row[0] for row in rows]


async def test_a_second_rebuild_of_the_same_projection_is_refused_at_once(
    db: AsyncEngine, writer: Writer, bootstrap: str, topic: str, group_prefix: str
) -> None:
    """Run B (``--restart``) would drop the version run A is building: it must not start."""
    await projected_orders(db, writer, bootstrap, topic, group_prefix, "l", 50)
    config = config_for(bootstrap, topic, group_prefix)
    old = await live_now(db)
    async with db.connect() as blocker:
        # Run A takes its lock, then waits here for the registry: it is running, not done.
        await blocker.execute(sa.text("LOCK TABLE projection_versions IN EXCLUSIVE MODE"))
        first = asyncio.create_task(rebuild(db, config, ["orders", "daily_sales"], tick_s=0.1))

        async def locked() -> tuple[bool, Any]:
            assert not first.done(), first
            held = await rebuild_locks_held(db)
            return len(held) == 2, held

        await eventually(locked, "the first rebuild to take its locks")
        with pytest.raises(RebuildAlreadyRunning) as refused:
            await asyncio.wait_for(rebuild(db, config, ["orders"], restart=True), 10)
        await blocker.rollback()
    message = str(refused.value)
    assert f"a rebuild of orders is already running (orders rebuild pid {os.getpid()}" in message
    assert "wait for it to end, or stop it" in message, message
    result = await asyncio.wait_for(first, 60)  # run A, untouched by B, goes on to the end
    assert sorted(result.switched) == sorted(
        f"{name} v{old[name] + 1}" for name in ("orders", "daily_sales")
    )
    assert await rebuild_locks_held(db) == []  # released at the end
    again = await rebuild(db, config, ["orders"], tick_s=0.1)
    assert again.switched == [f"orders v{old['orders'] + 2}"]
    assert set((await views_point_at(db)).values()) == {
        schema_for(n, (await live_now(db))[n]) for n in ALL
    }
    await the_oracle_holds(db, bootstrap, topic)


async def test_dropping_a_version_that_went_live_meanwhile_is_refused_and_drops_nothing(
    db: AsyncEngine, writer: Writer, bootstrap: str, topic: str, group_prefix: str
) -> None:
    """Run B read v2 as building; run A then made it live; B's drop must leave it alone."""
    await projected_orders(db, writer, bootstrap, topic, group_prefix, "d", 50)
    orders = catalog.PROJECTIONS["orders"]
    await build_until_caught_up(db, config_for(bootstrap, topic, group_prefix), ["orders"], topic)
    async with begin(db) as connection:
        (live,) = await live_targets(connection, [orders])
        seen_building = await building(connection, orders)  # what run B read
    assert seen_building is not None
    async with begin(db) as connection:  # run A switches
        await build_indexes(connection, live, seen_building)
        await switch(connection, live, seen_building, topic)
    with pytest.raises(VersionIsLive, match=f"{seen_building} is live"):
        async with begin(db) as connection:
            await drop(connection, seen_building)
    assert (await live_now(db))["orders"] == seen_building.version
    assert seen_building.schema in await schemas(db)
    assert (await views_point_at(db))["orders"] == seen_building.schema
    await the_oracle_holds(db, bootstrap, topic)


async def test_a_switch_succeeds_whichever_row_of_the_registry_comes_first(
    db: AsyncEngine, writer: Writer, bootstrap: str, topic: str, group_prefix: str
) -> None:
    """One live version per projection is a unique index, checked row by row as an UPDATE
    reaches each row: the switch must retire the old version before the new one goes live."""
    await projected_orders(db, writer, bootstrap, topic, group_prefix, "s", 50)
    orders = catalog.PROJECTIONS["orders"]
    await build_until_caught_up(db, config_for(bootstrap, topic, group_prefix), ["orders"], topic)
    async with begin(db) as connection:
        (live,) = await live_targets(connection, [orders])
        new = await building(connection, orders)
        assert new is not None
        await build_indexes(connection, live, new)
    async with begin(db) as connection:
        in_heap_order = (
            "SELECT version FROM projection_versions WHERE projection = 'orders' "
            "AND state IN ('live', 'building') ORDER BY ctid"
        )
        for _ in range(50):  # each UPDATE writes the row anew, further on in the heap
            if [row["version"] for row in await connection.fetch(in_heap_order)] == [
                new.version,
                live.version,
            ]:
                break
            await connection.execute(
                "UPDATE projection_versions SET switched_at = switched_at "
                "WHERE projection = 'orders' AND version = $1",
                live.version,
            )
        else:
            raise AssertionError("the live version's row stays first in the heap")
    async with begin(db) as connection:
        # Rows in heap order, as the planner may well choose for a table this small.
        await connection.execute("SET LOCAL enable_indexscan = off")
        await connection.execute("SET LOCAL enable_bitmapscan = off")
        await switch(connection, live, new, topic)
    assert (await live_now(db))["orders"] == new.version
    assert (await views_point_at(db))["orders"] == new.schema
    await the_oracle_holds(db, bootstrap, topic)
