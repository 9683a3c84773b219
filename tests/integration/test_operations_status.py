"""``orders projections status`` for a caught-up, a lagging and a halted projection (issue 5).

The same report is checked three ways: ``status(...)`` and its rendered table in-process, the
real CLI (``projections status --json``) as a subprocess, and ``GET /ops/projections`` on the
app. Commands go through the HTTP API to a real writer; runners apply them in-process; poison
records are produced straight to the topic. Nothing is mocked; waiting is polling.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import msgspec
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

import projections.status
from projections.bookkeeping.checkpoints import behind
from projections.models import catalog
from projections.projection import begin
from projections.runner import ProjectionRunner, RunnerConfig
from projections.status import (
    CAUGHT_UP,
    HALTED,
    REBUILDING,
    RUNNING,
    STOPPED,
    TopicStatus,
    render,
    status,
)
from projections.versions import create_building, live_targets, switch
from service.edge.http.app import Resources, create_app
from tests.support.cli import OrdersCli
from tests.support.http import serve
from tests.support.identity import access
from tests.support.poison import not_json, produce, unknown_type
from tests.support.projection_harness import Api, Done, eventually, running

PARTITIONS = 4
ALL = ["customer_summary", "daily_sales", "order_history", "orders"]  # status sorts by name

Report = dict[str, Any]


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
async def ops(
    db: AsyncEngine, bootstrap: str, topic: str, group_prefix: str
) -> AsyncIterator[httpx.AsyncClient]:
    """The app with operations only: an engine and the Kafka address, no writer."""
    resources = Resources(
        engine=db, kafka_bootstrap=bootstrap, topic=topic, projection_group_prefix=group_prefix
    )
    app = create_app(resources, access=access())
    async with serve(app) as client:
        yield client


# -- helpers -----------------------------------------------------------------------------------


def new_events(accepted: list[Done], since: int = 0) -> Counter[int]:
    """Per partition, how many events the acknowledgements ``accepted[since:]`` stand for.

    A command's events are the versions it added to its order (one event per version).
    """
    versions: dict[str, int] = {}
    counted: Counter[int] = Counter()
    for index, done in enumerate(accepted):
        before = versions.get(done.order_id, 0)
        versions[done.order_id] = done.version
        if index >= since:
            counted[done.partition] += done.version - before
    return counted


async def workload(api: Api, label: str, orders: int = 6) -> dict[int, str]:
    """Orders in every partition, each with a few steps of its life; returns, per partition,
    an order left open (a draft: items can still be added)."""
    made: list[Done] = []
    while len(made) < orders or {d.partition for d in made} != set(range(PARTITIONS)):
        made.append(await api.create(f"{label}-{len(made)}"))
        assert len(made) < 64, "orders never reached every partition"
    drafts: dict[int, str] = {}
    for index, created in enumerate(made):
        await api.add(created.order_id, "MUG", 1 + index % 3, 1250)
        if created.partition in drafts:
            await api.place(created.order_id)
        else:
            drafts[created.partition] = created.order_id
    return drafts


async def more_commands(api: Api, order_ids: list[str], label: str) -> None:
    for index, order_id in enumerate(order_ids):
        await api.add(order_id, f"EXTRA-{label}-{index}", 1, 100)


async def commands_waiting(api: Api, drafts: dict[int, str]) -> tuple[int, dict[int, int]]:
    """More commands on the drafts of every partition but the last (idle), two in the first:
    the idle partition, and the new events per partition."""
    idle = max(drafts)
    busy = [drafts[p] for p in sorted(drafts) if p != idle]
    since = len(api.accepted)
    await more_commands(api, busy, "a")
    await more_commands(api, busy[:1], "b")
    return idle, new_events(api.accepted, since)


POISONS: dict[str, tuple[Callable[[str], bytes], str]] = {
    "not-json": (not_json, "not a valid envelope"),
    "unknown-type": (unknown_type, "unknown event type 'NoSuchEvent'"),
}


def as_json(report: TopicStatus) -> Report:
    """The report as the CLI and the HTTP endpoint give it (JSON types)."""
    decoded: Report = json.loads(msgspec.json.encode(report))
    return decoded


async def cli_status(bootstrap: str, database_url: str, topic: str, group_prefix: str) -> Report:
    """``projections status --json`` through the real CLI in a subprocess (this worktree)."""
    code, out, err = await OrdersCli(bootstrap, database_url, topic, group_prefix).run(
        "projections", "status", "--json"
    )
    assert code == 0, f"exit {code}: {err}"
    parsed: Report = json.loads(out)
    return parsed


async def http_status(ops: httpx.AsyncClient) -> Report:
    response = await ops.get("/ops/projections")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    parsed: Report = response.json()
    return parsed


def without_lag_seconds(report: Report) -> Report:
    """The report minus ``lag_seconds`` (it grows with the clock between two readings) and
    ``consumers`` (a runner stopped between two readings leaves its group)."""
    copy: Report = json.loads(json.dumps(report))
    for version in copy["projections"]:
        version.pop("consumers")
        for row in version["partitions"]:
            row.pop("lag_seconds")
    return copy


def by_projection(report: Report) -> dict[str, Report]:
    return {version["projection"]: version for version in report["projections"]}


async def status_when(
    db: AsyncEngine,
    bootstrap: str,
    topic: str,
    group_prefix: str,
    condition: Callable[[TopicStatus], bool],
    what: str,
    alive: Any = None,
) -> TopicStatus:
    async def check() -> tuple[bool, Any]:
        report = await status(db, bootstrap, topic, group_prefix=group_prefix)
        return condition(report), report

    found: TopicStatus = await eventually(check, what, alive=alive)
    return found


def all_caught_up(report: TopicStatus) -> bool:
    """Every event applied, and every checkpoint moved past the last commit marker."""
    return bool(report.projections) and all(
        row.lag_events == 0 and row.lag_offsets == 0
        for version in report.projections
        for row in version.partitions
    )


async def three_views(
    report: TopicStatus,
    bootstrap: str,
    database_url: str,
    topic: str,
    group_prefix: str,
    ops: httpx.AsyncClient,
) -> tuple[Report, Report]:
    """The CLI's and the endpoint's reports; both must match ``report`` but for lag_seconds
    and consumers."""
    from_cli = await cli_status(bootstrap, database_url, topic, group_prefix)
    from_http = await http_status(ops)
    expected = without_lag_seconds(as_json(report))
    assert without_lag_seconds(from_cli) == expected
    assert without_lag_seconds(from_http) == expected
    return from_cli, from_http


def table_lines(rendered: str, name: str) -> dict[int, list[str]]:
    """The rendered table's partition lines of ``name``, split into columns, by partition."""
    lines: dict[int, list[str]] = {}
    for line in rendered.splitlines():
        columns = line.split()
        if columns and columns[0] == name and len(columns) >= 9:
            lines[int(columns[3])] = columns
    return lines


# -- caught up ---------------------------------------------------------------------------------


async def test_status_of_caught_up_projections(
    api: Api,
    db: AsyncEngine,
    ops: httpx.AsyncClient,
    bootstrap: str,
    database_url: str,
    topic: str,
    group_prefix: str,
    suffix: str,
) -> None:
    async with running(db, bootstrap, topic, group_prefix, ALL, assigned=PARTITIONS) as run:
        await workload(api, f"up-{suffix}")
        # The checkpoints pass the last commit markers in housekeeping: poll for lag 0.
        report = await status_when(
            db, bootstrap, topic, group_prefix, all_caught_up, "every partition caught up", run
        )

    ends = api.ends()  # offset after the last acknowledged event, per partition
    assert set(ends) == set(range(PARTITIONS))
    assert report.topic == topic
    assert report.partitions == PARTITIONS
    assert [version.projection for version in report.projections] == ALL
    for version in report.projections:
        assert (version.role, version.state) == ("live", CAUGHT_UP), version
        assert (version.lag_events, version.parked_events) == (0, 0), version
        assert version.consumers == 1, version  # the runner, as Kafka counts its group
        assert [row.partition for row in version.partitions] == list(range(PARTITIONS))
        for row in version.partitions:
            where = (version.projection, row.partition)
            assert row.state == CAUGHT_UP, where
            assert (row.lag_events, row.lag_seconds) == (0, 0.0), where
            assert row.checkpoint == row.last_stable_offset, where
            # The last event is followed by its transaction's commit marker: the checkpoint
            # moved past that marker, not only past the event.
            assert row.last_stable_offset is not None
            assert row.last_stable_offset > ends[row.partition], where
            assert row.last_event_at is not None, where
            assert (row.halted_at_offset, row.halted_order_id, row.reason) == (None, None, None)

    rendered = render(report)
    assert rendered.splitlines()[0] == f"topic {topic}: {PARTITIONS} partitions"
    for name in ALL:
        lines = table_lines(rendered, name)
        assert sorted(lines) == list(range(PARTITIONS)), rendered
        for partition, columns in lines.items():
            row = report.projections[ALL.index(name)].partitions[partition]
            assert columns[1:3] == ["v1", "live"], columns
            assert columns[4:8] == [str(row.checkpoint), str(row.checkpoint), "0", "0.0"]
            assert " ".join(columns[8:]) == CAUGHT_UP
        assert f"  -> {name} v1: {CAUGHT_UP}, 1 projector consumer(s)" in rendered.splitlines()
    assert HALTED not in rendered
    assert "parked" not in rendered

    from_cli, from_http = await three_views(
        report, bootstrap, database_url, topic, group_prefix, ops
    )
    for view in (from_cli, from_http):
        for version in view["projections"]:
            # The runner has stopped and left its group; caught up all the same.
            assert (version["state"], version["consumers"]) == (CAUGHT_UP, 0)
            assert {row["lag_seconds"] for row in version["partitions"]} == {0.0}


# -- lagging -----------------------------------------------------------------------------------


async def test_status_of_lagging_projections(
    api: Api,
    db: AsyncEngine,
    ops: httpx.AsyncClient,
    bootstrap: str,
    database_url: str,
    topic: str,
    group_prefix: str,
    suffix: str,
) -> None:
    # Events that no runner has applied yet: no checkpoint, no event time.
    drafts = await workload(api, f"lag-{suffix}")
    written = new_events(api.accepted)
    never_applied = await status(db, bootstrap, topic, group_prefix=group_prefix)
    for version in never_applied.projections:
        assert (version.state, version.consumers) == (STOPPED, 0), version  # no projector yet
        assert version.lag_events == sum(written.values()), version
        for row in version.partitions:
            where = (version.projection, row.partition)
            assert row.state == STOPPED, where
            assert row.checkpoint == 0, where
            assert row.lag_events == written[row.partition], (where, row)
            assert (row.lag_seconds, row.last_event_at) == (None, None), where

    async with running(db, bootstrap, topic, group_prefix, ALL, assigned=PARTITIONS) as run:
        await status_when(
            db, bootstrap, topic, group_prefix, all_caught_up, "every partition caught up", run
        )

    # No runner: more commands, in some partitions only.
    idle, waiting = await commands_waiting(api, drafts)
    assert sum(waiting.values()) == len(drafts)
    assert idle not in waiting

    report = await status(db, bootstrap, topic, group_prefix=group_prefix)
    assert [version.projection for version in report.projections] == ALL
    for version in report.projections:
        assert (version.role, version.state, version.consumers) == ("live", STOPPED, 0), version
        assert version.lag_events == sum(waiting.values()), version
        for row in version.partitions:
            where = (version.projection, row.partition)
            assert row.lag_events == waiting[row.partition], (where, row)
            assert row.last_event_at is not None, where
            if waiting[row.partition]:
                assert row.state == STOPPED, where
                assert (row.lag_seconds or 0) > 0, (where, row)
            else:
                assert (row.state, row.lag_seconds) == (CAUGHT_UP, 0.0), where

    rendered = render(report)
    for name in ALL:
        lines = table_lines(rendered, name)
        assert sorted(lines) == list(range(PARTITIONS)), rendered
        for partition, columns in lines.items():
            assert columns[6] == str(waiting[partition]), columns
            assert " ".join(columns[8:]) == (STOPPED if waiting[partition] else CAUGHT_UP)
        stopped = (
            f"  -> {name} v1: {STOPPED}, no projector consuming it (start one: orders projector)"
        )
        assert stopped in rendered.splitlines()

    from_cli, from_http = await three_views(
        report, bootstrap, database_url, topic, group_prefix, ops
    )
    for view in (from_cli, from_http):
        for version in view["projections"]:
            for row in version["partitions"]:
                if waiting[row["partition"]]:
                    assert row["lag_seconds"] > 0, row
                else:
                    assert row["lag_seconds"] == 0.0, row

    # A projector that is slow, not stopped (its batch waits 2 s: time for several status
    # readings): running, one consumer, until it has caught up.
    async with running(db, bootstrap, topic, group_prefix, ALL, lag_s=2.0) as slow:

        def consumed_while_lagging(report: TopicStatus) -> bool:
            return all(
                (version.state, version.consumers) == (RUNNING, 1) for version in report.projections
            )

        await status_when(
            db, bootstrap, topic, group_prefix, consumed_while_lagging, "running, 1 consumer", slow
        )
        await status_when(db, bootstrap, topic, group_prefix, all_caught_up, "caught up", slow)


# -- halted ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(POISONS))
async def test_status_of_a_halted_projection(
    kind: str,
    api: Api,
    db: AsyncEngine,
    ops: httpx.AsyncClient,
    bootstrap: str,
    database_url: str,
    topic: str,
    group_prefix: str,
    suffix: str,
) -> None:
    make_poison, reason = POISONS[kind]
    async with running(db, bootstrap, topic, group_prefix, ALL, assigned=PARTITIONS) as run:
        drafts = await workload(api, f"{kind}-{suffix}")
        await status_when(
            db, bootstrap, topic, group_prefix, all_caught_up, "every partition caught up", run
        )

        victim = api.accepted[0]
        poisoned = victim.partition
        poison_at = await produce(
            bootstrap, topic, poisoned, make_poison(victim.order_id), victim.order_id.encode()
        )
        # After the poison, commands in every partition: the others must still be applied.
        await more_commands(api, [drafts[p] for p in sorted(drafts)], "after")
        ends = api.ends()
        assert ends[poisoned] > poison_at

        def halted_and_others_applied(report: TopicStatus) -> bool:
            return all(
                (row.state == HALTED)
                if row.partition == poisoned
                else (row.lag_events == 0 and row.lag_offsets == 0)
                for version in report.projections
                for row in version.partitions
            )

        report = await status_when(
            db,
            bootstrap,
            topic,
            group_prefix,
            halted_and_others_applied,
            f"a halt in {poisoned}",
            run,
        )
        for name in ALL:
            halt = run.halt(name, poisoned)
            assert halt is not None, name
            assert halt.offset == poison_at, (name, halt)

        assert [version.projection for version in report.projections] == ALL
        for version in report.projections:
            assert version.state == HALTED, version
            for row in version.partitions:
                where = (version.projection, row.partition)
                if row.partition != poisoned:
                    assert (row.state, row.lag_events, row.lag_seconds) == (CAUGHT_UP, 0, 0.0)
                    assert row.checkpoint >= ends[row.partition], where
                    continue
                assert row.halted_at_offset == poison_at, (where, row)
                assert row.halted_order_id == victim.order_id, (where, row)
                assert reason in (row.reason or ""), (where, row)
                assert victim.offset < row.checkpoint <= poison_at, (where, row)
                assert (row.lag_events or 0) > 0, (where, row)
                assert (row.lag_seconds or 0) > 0, (where, row)

        rendered = render(report)
        lines = rendered.splitlines()
        for version in report.projections:
            row = version.partitions[poisoned]
            columns = table_lines(rendered, version.projection)[poisoned]
            assert " ".join(columns[8:]) == HALTED, columns
            explained = f"at offset {poison_at}, order {victim.order_id}: {row.reason}"
            hint = (
                f"orders projections park {version.projection} --partition {poisoned} "
                f"--offset {poison_at}"
            )
            assert sum(line.strip() == explained for line in lines) == len(ALL), rendered
            assert any(line.strip().endswith(hint) for line in lines), rendered
            assert f"  -> {version.projection} v1: {HALTED}, 1 projector consumer(s)" in lines

        from_cli, from_http = await three_views(
            report, bootstrap, database_url, topic, group_prefix, ops
        )
        for view in (from_cli, from_http):
            for shown in by_projection(view).values():
                shown_row = shown["partitions"][poisoned]
                assert (shown_row["state"], shown_row["halted_at_offset"]) == (HALTED, poison_at)
                assert shown_row["halted_order_id"] == victim.order_id
                assert reason in shown_row["reason"]
                assert shown_row["lag_seconds"] > 0


# -- Kafka away --------------------------------------------------------------------------------


async def test_the_status_endpoint_answers_503_when_kafka_cannot_be_reached(
    db: AsyncEngine, topic: str, group_prefix: str
) -> None:
    """Nothing listens on port 9: the report cannot be made, and the client is told to retry."""
    resources = Resources(
        engine=db, kafka_bootstrap="127.0.0.1:9", topic=topic, projection_group_prefix=group_prefix
    )
    async with serve(create_app(resources, access=access())) as client:
        response = await client.get("/ops/projections")
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.headers["retry-after"] == "1"
    body = response.json()
    assert (body["status"], body["title"], body["instance"]) == (
        503,
        "Service Unavailable",
        "/ops/projections",
    )
    assert body["type"].endswith("/unavailable"), body
    assert "Kafka" in body["detail"], body
    assert "retry" in body["detail"], body


# -- a version far behind the live one ---------------------------------------------------------

# How the second version of ``orders`` falls behind: a building version never filled (no
# checkpoints: it starts at 0), one filled and then left behind, and a retired version that a
# switch left in place (``--keep-old``, or a crash between the switch and the drop). Retired
# last: it leaves ``orders`` live at its new version for the rest of this module's database.
BEHIND = ["unfilled building", "building", "retired"]


async def fill_building(db: AsyncEngine, config: RunnerConfig, live: Any, new: Any) -> None:
    """Apply events to the building ``new`` (as a rebuild's builder does) until it has applied
    all that ``live`` has; then stop its builder."""
    builder = ProjectionRunner([live.projection], db, config, building=True)
    stop = asyncio.Event()
    task = asyncio.create_task(builder.run(stop))

    async def caught_up() -> tuple[bool, Any]:
        assert not task.done(), task
        async with begin(db) as connection:
            lagging = await behind(connection, live, new, config.topic)
        return not lagging, lagging

    try:
        await eventually(caught_up, f"{new} to catch up with {live}")
    finally:
        stop.set()
        await task


async def events_in_every_partition(api: Api, label: str, at_least: int) -> None:
    """New orders with an item each until every partition holds ``at_least`` more events."""
    since = len(api.accepted)
    while min(new_events(api.accepted, since).get(p, 0) for p in range(PARTITIONS)) < at_least:
        created = await api.create(f"{label}-{len(api.accepted)}")
        await api.add(created.order_id, "MUG", 1, 1250)
        assert len(api.accepted) - since < 400, "orders never reached every partition"


def live_caught_up(report: TopicStatus) -> bool:
    return all(
        row.lag_events == 0 and row.lag_offsets == 0
        for version in report.projections
        if version.role == "live"
        for row in version.partitions
    )


@pytest.mark.parametrize("how", BEHIND)
async def test_a_version_far_behind_leaves_the_live_lag_exact(
    how: str,
    api: Api,
    db: AsyncEngine,
    ops: httpx.AsyncClient,
    bootstrap: str,
    topic: str,
    group_prefix: str,
    suffix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Counting the events behind a version far behind stops at COUNT_CAP; the live versions,
    a few events behind, are still counted exactly (not ``~offsets``), and a retired version is
    neither shown nor read."""
    drafts = await workload(api, f"far-{suffix}")
    async with running(db, bootstrap, topic, group_prefix, ALL, assigned=PARTITIONS) as run:
        await status_when(db, bootstrap, topic, group_prefix, all_caught_up, "caught up", run)

    config = RunnerConfig(kafka=bootstrap, topic=topic, group_prefix=group_prefix)
    async with begin(db) as connection:
        (old,) = await live_targets(connection, [catalog.PROJECTIONS["orders"]])
        new = await create_building(connection, old)
    if how != "unfilled building":
        await fill_building(db, config, old, new)
    if how == "retired":
        async with begin(db) as connection:
            await switch(connection, old, new, topic)
    live, left_behind = (new, old) if how == "retired" else (old, new)

    # Events the live versions apply and the version left behind does not; then, with no
    # projector, a few that wait for every live version. The cap is checked after each fetch
    # of at most ``cap`` records: with 2 * cap events behind, the count surely stops at it.
    cap = 3
    since = len(api.accepted)
    await events_in_every_partition(api, f"more-{suffix}", at_least=2 * cap)
    async with running(db, bootstrap, topic, group_prefix, ALL, assigned=PARTITIONS) as run:
        await status_when(db, bootstrap, topic, group_prefix, live_caught_up, "live caught up", run)
    _, waiting = await commands_waiting(api, drafts)
    assert 0 < max(waiting.values()) < cap
    behind_live = new_events(api.accepted, since)
    assert min(behind_live[p] for p in range(PARTITIONS)) >= 2 * cap

    monkeypatch.setattr(projections.status, "COUNT_CAP", cap)
    report = await status(db, bootstrap, topic, group_prefix=group_prefix)
    from_http = await http_status(ops)
    assert without_lag_seconds(from_http) == without_lag_seconds(as_json(report))

    shown = {(v.projection, v.version): v for v in report.projections}
    expected = {(name, live.version if name == "orders" else 1) for name in ALL}
    if how != "retired":
        expected.add(("orders", left_behind.version))
    assert set(shown) == expected
    for (name, version_number), version in shown.items():
        if (name, version_number) == ("orders", left_behind.version):
            assert (version.role, version.state) == ("building", REBUILDING), version
            for row in version.partitions:
                assert row.lag_events is None, row  # more than COUNT_CAP: not all counted
                assert row.lag_offsets == (row.last_stable_offset or 0) - row.checkpoint, row
            continue
        assert (version.role, version.state) == ("live", STOPPED), version
        assert version.lag_events == sum(waiting.values()), version
        for row in version.partitions:
            where = (name, version_number, row.partition)
            assert row.lag_events == waiting[row.partition], (where, row)
            assert row.state == (STOPPED if waiting[row.partition] else CAUGHT_UP), (where, row)
