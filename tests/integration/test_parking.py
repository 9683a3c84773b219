"""Poison events halt their projection's partition; park, retry and skip (issue 6, invariant 7).

Each kind of poison (raw bytes that are not JSON, an unknown event type, an upcast failure, a
handler exception) is put in one partition behind real orders. The test then checks that only
that projection's partition halts, that ``park`` sets the event aside with every later event of
its order while the partition goes on, that ``retry`` and ``skip`` do what they say and nothing
else, and that the tables end equal to the oracle: a pure fold of every decodable event, minus
what was explicitly skipped. One kind is operated through the real CLI, as a subprocess.
Everything runs against the real broker and database; waiting is polling with a deadline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from projections import parking
from projections.models import catalog
from projections.parking import ParkingRefused
from projections.projection import Applied, Db, Projection, State, begin
from projections.status import HALTED, status
from service.kernel import envelope
from tests.support.cli import OrdersCli
from tests.support.poison import envelope_json, not_json, produce, unknown_type
from tests.support.projection_harness import (
    Api,
    Done,
    Running,
    assert_tables_equal_oracle,
    decoded,
    eventually,
    read_records,
    running,
    table_contents,
    wait_caught_up,
)

PARTITIONS = 4
ALL = ["orders", "order_history", "customer_summary", "daily_sales"]
PARKED_WITH_ORDER = "its order is parked"


# -- poisons -----------------------------------------------------------------------------------


class Failing:
    """A real projection whose fold raises for chosen (order, version)s: a handler bug.

    Same name, tables and load as the real one; clearing ``fails`` is the fix.
    """

    def __init__(self, inner: Projection) -> None:
        self.inner = inner
        self.name = inner.name
        self.tables = inner.tables
        self.fails: set[tuple[str, int]] = set()

    async def load(self, db: Db, batch: Sequence[Applied]) -> State:
        return await self.inner.load(db, batch)

    def fold(self, state: State, applied: Applied) -> None:
        key = (applied.envelope.order_id, applied.envelope.version)
        if key in self.fails:
            raise RuntimeError(f"handler bug on order {key[0]} v{key[1]}")
        self.inner.fold(state, applied)


def item_added_v0(order_id: str, version: int) -> bytes:
    """An ItemAdded of schema version 0: decodable only through an upcaster from v0."""
    data = {"sku": "OLD", "name": "Old item", "quantity": 1, "unit_price": 100}
    return envelope_json(order_id, version, type="ItemAdded", schema_version=0, data=data)


def _upcaster_that_fails(data: dict[str, Any]) -> dict[str, Any]:
    raise ValueError(f"cannot upcast {sorted(data)}: the old data has no currency")


@dataclass(frozen=True)
class Poison:
    """How a kind of poison is made, which projections it halts, and the reason they give."""

    make: Callable[[str, int], bytes] | None  # None: a real command that a handler refuses
    halts: Sequence[str]
    runs: Sequence[str]
    reason: str
    upcasters: dict[tuple[str, int], Callable[[dict[str, Any]], dict[str, Any]]] = field(
        default_factory=dict
    )
    cli: bool = False


POISONS: dict[str, Poison] = {
    "not-json": Poison(not_json, ALL, ALL, "not a valid envelope"),
    # Operated through the real CLI (its projections are the catalogue's own).
    "unknown-type": Poison(
        unknown_type, ["orders"], ["orders"], "unknown event type 'NoSuchEvent'", cli=True
    ),
    "no-upcaster": Poison(item_added_v0, ALL, ALL, "no upcaster for ItemAdded v0"),
    "upcaster-raises": Poison(
        item_added_v0,
        ALL,
        ALL,
        "ItemAdded",
        upcasters={("ItemAdded", 0): _upcaster_that_fails},
    ),
    # Only the wrapped ``orders`` fold fails; order_history applies the same event.
    "handler-exception": Poison(
        None, ["orders"], ["orders", "order_history"], "RuntimeError: handler bug on order"
    ),
}


# -- operating: in-process or through the CLI --------------------------------------------------


class Operator(Protocol):
    """park / parked / retry / skip; a refusal raises ``ParkingRefused`` with its message."""

    async def park(self, name: str, partition: int, offset: int) -> str: ...
    async def parked(self) -> str: ...
    async def retry(self, name: str, order_id: str | None = None) -> str: ...
    async def skip(self, name: str, partition: int, offset: int) -> str: ...


def _line(event: parking.ParkedEvent) -> str:
    return f"{event.projection} v{event.version} {event.partition}/{event.offset} {event.order_id}"


@dataclass
class InProcess:
    db: AsyncEngine
    bootstrap: str
    topic: str

    async def park(self, name: str, partition: int, offset: int) -> str:
        return _line(
            await parking.park(self.db, self.bootstrap, self.topic, name, partition, offset)
        )

    async def parked(self) -> str:
        return "\n".join(_line(event) for event in await parking.parked(self.db, self.topic))

    async def retry(self, name: str, order_id: str | None = None) -> str:
        events = await parking.retry(self.db, self.topic, name, order_id=order_id)
        return "\n".join(_line(event) for event in events)

    async def skip(self, name: str, partition: int, offset: int) -> str:
        return _line(await parking.skip(self.db, self.topic, name, partition, offset))


class Cli(OrdersCli):
    """``orders projections ...`` of this checkout, as a subprocess."""

    async def projections(self, *args: str) -> tuple[int, str, str]:
        return await self.run("projections", *args)

    async def ok_or_refused(self, *args: str) -> str:
        code, out, err = await self.projections(*args)
        if code == 1:
            refusal = [line for line in err.splitlines() if line.startswith("orders: ")]
            assert len(refusal) == 1, (args, out, err)
            assert not out, (args, out, err)
            raise ParkingRefused(refusal[0].removeprefix("orders: "))
        assert code == 0, (args, code, out, err)
        return out

    async def park(self, name: str, partition: int, offset: int) -> str:
        out = await self.ok_or_refused(
            "park", name, "--partition", str(partition), "--offset", str(offset)
        )
        assert out.startswith(f"parked {partition}/{offset} of {name} v1 with order "), out
        assert f"orders projections retry {name} --order " in out, out
        return out

    async def parked(self) -> str:
        return await self.ok_or_refused("parked")

    async def retry(self, name: str, order_id: str | None = None) -> str:
        order = ("--order", order_id) if order_id else ()
        out = await self.ok_or_refused("retry", name, *order)
        assert out.startswith("applied "), out
        return out

    async def skip(self, name: str, partition: int, offset: int) -> str:
        out = await self.ok_or_refused(
            "skip", name, "--partition", str(partition), "--offset", str(offset)
        )
        assert out.startswith(f"discarded parked event {partition}/{offset} of order "), out
        assert out.rstrip().endswith("the order stays parked until retry"), out
        return out


# -- the database, read back -------------------------------------------------------------------

ParkedRow = tuple[str, int, int, str, str]  # projection, partition, offset, order id, reason


async def parked_rows(db: AsyncEngine, topic: str) -> list[ParkedRow]:
    return [
        (e.projection, e.partition, e.offset, e.order_id, e.reason)
        for e in await parking.parked(db, topic)
    ]


async def parked_orders(db: AsyncEngine) -> set[tuple[str, str]]:
    async with begin(db) as connection:
        rows = await connection.fetch("SELECT projection, order_id FROM parked_orders")
    return {(row["projection"], row["order_id"]) for row in rows}


async def stored_halts(db: AsyncEngine, topic: str) -> dict[tuple[str, int], tuple[int, str, str]]:
    """(projection, partition) -> (offset, order id, reason) of the halts the runner stored."""
    async with begin(db) as connection:
        rows = await connection.fetch(
            'SELECT projection, partition, "offset", order_id, reason FROM projection_halts '
            "WHERE topic = $1",
            topic,
        )
    return {
        (row["projection"], row["partition"]): (row["offset"], row["order_id"], row["reason"])
        for row in rows
    }


async def snapshot(db: AsyncEngine, topic: str, names: Sequence[str]) -> Any:
    """Everything park/retry/skip may change: parked events and orders, every table."""
    tables = {name: await table_contents(db, catalog.PROJECTIONS[name]) for name in names}
    return await parked_rows(db, topic), await parked_orders(db), tables


async def events_of_topic(
    bootstrap: str, topic: str, *, leave_out: set[tuple[int, int]]
) -> list[Applied]:
    """Every event in the topic, decoded as the runner does, minus ``leave_out`` positions."""
    return decoded(await read_records(bootstrap, topic, PARTITIONS), skip=leave_out)


# -- the scenario ------------------------------------------------------------------------------


async def create_on(api: Api, customer_id: str, wanted: set[int]) -> Done:
    for _ in range(64):
        created = await api.create(customer_id)
        if created.partition in wanted:
            return created
    raise AssertionError(f"no order landed in partitions {wanted}")


async def wait_halted(
    db: AsyncEngine, topic: str, names: Sequence[str], partition: int, run: Running
) -> dict[tuple[str, int], tuple[int, str, str]]:
    async def check() -> tuple[bool, Any]:
        halts = await stored_halts(db, topic)
        return all((name, partition) in halts for name in names), halts

    found: dict[tuple[str, int], tuple[int, str, str]] = await eventually(
        check, f"{list(names)} to store a halt in partition {partition}", alive=run
    )
    return found


async def wait_lag_zero(
    db: AsyncEngine, bootstrap: str, topic: str, names: Sequence[str], run: Running
) -> None:
    """Until every partition's checkpoint has reached its last stable offset (past markers)."""

    async def check() -> tuple[bool, Any]:
        report = await status(db, bootstrap, topic, names)
        lags = {v.projection: [row.lag_events for row in v.partitions] for v in report.projections}
        return all(lag == 0 for lag_list in lags.values() for lag in lag_list), lags

    await eventually(check, f"{list(names)} to reach the last stable offsets", alive=run)


@pytest.mark.parametrize("kind", list(POISONS))
async def test_a_poison_event_halts_its_partition_until_parked_then_retry_and_skip(
    kind: str,
    api: Api,
    db: AsyncEngine,
    bootstrap: str,
    database_url: str,
    topic: str,
    group_prefix: str,
    suffix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    poison = POISONS[kind]
    halts, runs = list(poison.halts), list(poison.runs)
    going = [name for name in runs if name not in halts]  # projections the poison must not stop
    for key, upcast in poison.upcasters.items():
        monkeypatch.setitem(envelope.UPCASTERS, key, upcast)
    failing = Failing(catalog.PROJECTIONS["orders"])
    if poison.make is None:
        # park and retry look the projection up in the catalogue: they use the wrapper too.
        monkeypatch.setitem(catalog.PROJECTIONS, "orders", failing)
    operator: Operator = (
        Cli(bootstrap, database_url, topic) if poison.cli else InProcess(db, bootstrap, topic)
    )
    # The refusals not worth a subprocess each go straight to the functions.
    direct = InProcess(db, bootstrap, topic)
    everything = set(range(PARTITIONS))

    async with running(db, bootstrap, topic, group_prefix, runs, assigned=PARTITIONS) as run:
        # The victim, a neighbour in its partition, and an order elsewhere; all applied.
        victim = await api.create(f"victim-{suffix}")
        poisoned = victim.partition
        await api.add(victim.order_id, "MUG", 2, 1250)
        neighbour = await create_on(api, f"neighbour-{suffix}", {poisoned})
        await api.add(neighbour.order_id, "TEA", 1, 500)
        other = await create_on(api, f"other-{suffix}", everything - {poisoned})
        await api.add(other.order_id, "PEN", 3, 200)
        # Caught up past the last commit markers too: the poison is the next record each
        # checkpoint points at (the case where a marker sits between them is a test below).
        await wait_lag_zero(db, bootstrap, topic, runs, run)
        orders_before = await table_contents(db, catalog.PROJECTIONS["orders"])
        victim_before = orders_before["orders"][(victim.order_id,)]
        assert victim_before["version"] == 2

        # The poison, in the victim's partition, keyed by the victim's id.
        if poison.make is None:
            failing.fails = {(victim.order_id, 3)}
            poison_at = (await api.add(victim.order_id, "CUP", 1, 800)).offset
        else:
            value = poison.make(victim.order_id, 3)
            poison_at = await produce(bootstrap, topic, poisoned, value, victim.order_id.encode())

        # After it: more of the victim (to be parked with it), of its neighbour, elsewhere.
        victim_later = [await api.add(victim.order_id, f"LATER-{i}", 1, 100) for i in range(2)]
        neighbour_later = await api.add(neighbour.order_id, "SCONE", 2, 500)
        other_later = await api.add(other.order_id, "INK", 1, 150)
        assert all(done.offset > poison_at for done in [*victim_later, neighbour_later])

        # -- halted: that projection's partition only -----------------------------------------
        found = await wait_halted(db, topic, halts, poisoned, run)
        assert set(found) == {(name, poisoned) for name in halts}, found
        for name in halts:
            offset, order_id, reason = found[(name, poisoned)]
            assert (offset, order_id) == (poison_at, victim.order_id), (name, found)
            assert poison.reason in reason, (name, reason)
        others = {p: end for p, end in api.ends().items() if p != poisoned}
        await wait_caught_up(db, topic, halts, others, alive=run)
        await wait_caught_up(db, topic, going, api.ends(), alive=run)
        report = {v.projection: v for v in (await status(db, bootstrap, topic, runs)).projections}
        for name in halts:
            row = report[name].partitions[poisoned]
            assert (row.state, row.halted_at_offset) == (HALTED, poison_at), row
            assert row.halted_order_id == victim.order_id, row
            assert poison.reason in (row.reason or ""), row
        undecodable = set() if poison.make is None else {(poisoned, poison_at)}
        halted_part = {(poisoned, d.offset) for d in [*victim_later, neighbour_later]}
        await assert_tables_equal_oracle(
            db,
            halts,
            await events_of_topic(
                bootstrap, topic, leave_out=undecodable | halted_part | {(poisoned, poison_at)}
            ),
        )
        if going:
            await assert_tables_equal_oracle(
                db, going, await events_of_topic(bootstrap, topic, leave_out=undecodable)
            )

        # -- park refuses any other offset ----------------------------------------------------
        with pytest.raises(ParkingRefused, match=f"is halted at {poison_at}"):
            await operator.park(halts[0], poisoned, neighbour_later.offset)
        with pytest.raises(ParkingRefused, match="is not halted"):
            await direct.park(halts[0], other_later.partition, other_later.offset)
        assert await parked_rows(db, topic) == []

        # -- park: the event and its order set aside; the partition goes on -------------------
        for name in halts:
            message = await operator.park(name, poisoned, poison_at)
            assert victim.order_id in message, message
            assert f"{poisoned}/{poison_at}" in message, message
        victim_parked_later = await api.add(victim.order_id, "WHILE-PARKED", 1, 50)
        neighbour_last = await api.add(neighbour.order_id, "CAKE", 1, 300)
        await wait_caught_up(db, topic, runs, api.ends(), alive=run)
        assert await stored_halts(db, topic) == {}
        assert not run.runner.halted, run.runner.halted

        set_aside = [*victim_later, victim_parked_later]
        expected_parked = sorted(
            [
                (name, poisoned, poison_at, victim.order_id, found[(name, poisoned)][2])
                for name in halts
            ]
            + [
                (name, poisoned, done.offset, victim.order_id, PARKED_WITH_ORDER)
                for name in halts
                for done in set_aside
            ]
        )
        assert await parked_rows(db, topic) == expected_parked
        assert await parked_orders(db) == {(name, victim.order_id) for name in halts}
        listed = await operator.parked()
        for _, partition, offset, order_id, _ in expected_parked:
            assert f"{partition}/{offset}  order {order_id}" in listed or (
                f"{partition}/{offset} {order_id}" in listed
            ), listed
        # The victim's row stays as it was before the poison; its neighbour's moved on.
        orders_now = (await table_contents(db, catalog.PROJECTIONS["orders"]))["orders"]
        assert orders_now[(victim.order_id,)] == victim_before
        assert orders_now[(neighbour.order_id,)]["version"] == neighbour_last.version
        parked_positions = {(poisoned, poison_at)} | {(poisoned, d.offset) for d in set_aside}
        await assert_tables_equal_oracle(
            db, halts, await events_of_topic(bootstrap, topic, leave_out=parked_positions)
        )
        report = {v.projection: v for v in (await status(db, bootstrap, topic, runs)).projections}
        for name in halts:
            assert report[name].parked_events == 1 + len(set_aside), report[name]
            assert HALTED not in {row.state for row in report[name].partitions}, report[name]

        # -- retry while the cause is still there: refused, nothing changes --------------------
        if poison.make is None:
            # The fold now fails on the LAST parked event only: the earlier ones would apply,
            # so an unchanged row proves that retry is one transaction.
            failing.fails = {(victim.order_id, victim_parked_later.version)}
            refusal = f"{poisoned}/{victim_parked_later.offset} still fails"
        else:
            refusal = f"{poisoned}/{poison_at} still cannot be decoded"
        before = await snapshot(db, topic, runs)
        for name in halts:
            with pytest.raises(ParkingRefused, match=refusal):
                await operator.retry(name)
        assert await snapshot(db, topic, runs) == before

        # -- skip: only what is asked, and only a parked event --------------------------------
        with pytest.raises(ParkingRefused, match="no parked event"):
            await direct.skip(halts[0], poisoned, neighbour_later.offset)
        assert await snapshot(db, topic, runs) == before
        if poison.make is None:
            failing.fails = set()  # the fix
            skipped = victim_parked_later.offset  # discarded by the operator's choice
        else:
            skipped = poison_at  # it can never be applied
        for name in halts:
            message = await operator.skip(name, poisoned, skipped)
            assert f"{poisoned}/{skipped}" in message, message
            assert victim.order_id in message, message
        assert await parked_rows(db, topic) == [row for row in expected_parked if row[2] != skipped]
        assert await parked_orders(db) == {(name, victim.order_id) for name in halts}

        # -- retry after the fix: every parked event applied, in order, once ------------------
        for name in halts:
            message = await operator.retry(name, victim.order_id)
            assert victim.order_id in message, message
        assert await parked_rows(db, topic) == []
        assert await parked_orders(db) == set()
        await wait_caught_up(db, topic, runs, api.ends(), alive=run)
        await assert_tables_equal_oracle(
            db, halts, await events_of_topic(bootstrap, topic, leave_out={(poisoned, skipped)})
        )
        if going:
            await assert_tables_equal_oracle(
                db, going, await events_of_topic(bootstrap, topic, leave_out=undecodable)
            )
        victim_row = (await table_contents(db, catalog.PROJECTIONS["orders"]))["orders"][
            (victim.order_id,)
        ]
        last = victim_parked_later if poison.make is not None else victim_later[-1]
        assert victim_row["version"] == last.version
        # Nothing left to retry.
        with pytest.raises(ParkingRefused, match="no parked order"):
            await direct.retry(halts[0])


async def test_an_undecodable_event_right_after_a_transaction_can_be_parked(
    api: Api, db: AsyncEngine, bootstrap: str, topic: str, group_prefix: str, suffix: str
) -> None:
    """The usual place of a poison: just after a writer transaction's commit marker.

    Written before the runner starts, the poison comes in the same fetch as the events before
    it; the checkpoint then stops on the marker, one offset before the halt. Parking must
    still take the event the projection is halted at, and the partition must go on.
    """
    victim = await api.create(f"marker-{suffix}")
    await api.add(victim.order_id, "MUG", 1, 1250)
    poisoned = victim.partition
    poison_at = await produce(
        bootstrap, topic, poisoned, not_json(victim.order_id, 3), victim.order_id.encode()
    )
    later = await api.add(victim.order_id, "TEA", 1, 500)
    neighbour = await create_on(api, f"marker-n-{suffix}", {poisoned})

    async with running(db, bootstrap, topic, group_prefix, ["orders"], assigned=PARTITIONS) as run:
        found = await wait_halted(db, topic, ["orders"], poisoned, run)
        assert found[("orders", poisoned)][:2] == (poison_at, victim.order_id)
        parked = await parking.park(db, bootstrap, topic, "orders", poisoned, poison_at)
        assert (parked.offset, parked.order_id) == (poison_at, victim.order_id)
        await wait_caught_up(db, topic, ["orders"], api.ends(), alive=run)
        assert await parked_rows(db, topic) == [
            ("orders", poisoned, poison_at, victim.order_id, found[("orders", poisoned)][2]),
            ("orders", poisoned, later.offset, victim.order_id, PARKED_WITH_ORDER),
        ]
        rows = (await table_contents(db, catalog.PROJECTIONS["orders"]))["orders"]
        assert rows[(victim.order_id,)]["version"] == 2
        assert rows[(neighbour.order_id,)]["version"] == neighbour.version


@pytest.mark.parametrize("where", ["key", "order-id"])
async def test_a_nul_character_from_the_log_halts_its_partition_and_the_order_can_be_parked(
    where: str,
    api: Api,
    db: AsyncEngine,
    bootstrap: str,
    topic: str,
    group_prefix: str,
    suffix: str,
) -> None:
    """Postgres text holds no U+0000, yet a record's key or an event's order id may carry one.

    ``key``: an undecodable record keyed ``bad\\x00key``; ``order-id``: an OrderCreated whose
    order id (and key) holds the NUL, which no projection can store. Either way its partition
    halts saying why, with the order id written readably (``\\x00``); the runner lives on and
    the other partitions keep projecting; parking sets the event aside with its order, and the
    order's later event too, and the partition goes on.
    """
    order_id = f"bad\x00key-{suffix}"
    shown = order_id.replace("\x00", "\\x00")
    if where == "key":
        poison = not_json(order_id, 1)
        reason = "not a valid envelope"
    else:
        data = {"customer_id": f"nul-{suffix}", "currency": "EUR"}
        poison = envelope_json(order_id, 1, type="OrderCreated", schema_version=1, data=data)
        reason = "the database refused it"
    later = envelope_json(
        order_id,
        2,
        type="ItemAdded",
        schema_version=1,
        data={"sku": "MUG", "name": "Mug", "quantity": 1, "unit_price": 100},
    )
    everything = set(range(PARTITIONS))

    async with running(db, bootstrap, topic, group_prefix, ALL, assigned=PARTITIONS) as run:
        neighbour = await api.create(f"nul-neighbour-{suffix}")
        poisoned = neighbour.partition
        other = await create_on(api, f"nul-other-{suffix}", everything - {poisoned})
        await wait_caught_up(db, topic, ALL, api.ends(), alive=run)

        poison_at = await produce(bootstrap, topic, poisoned, poison, order_id.encode())
        later_at = await produce(bootstrap, topic, poisoned, later, order_id.encode())
        neighbour_later = await api.add(neighbour.order_id, "TEA", 1, 500)
        await api.add(other.order_id, "PEN", 3, 200)

        found = await wait_halted(db, topic, ALL, poisoned, run)
        assert set(found) == {(name, poisoned) for name in ALL}, found
        for name in ALL:
            offset, halted_order, why = found[(name, poisoned)]
            assert (offset, halted_order) == (poison_at, shown), (name, found)
            assert reason in why, (name, why)
            assert "\x00" not in why, (name, why)
        others = {p: end for p, end in api.ends().items() if p != poisoned}
        await wait_caught_up(db, topic, ALL, others, alive=run)

        for name in ALL:
            parked = await parking.park(db, bootstrap, topic, name, poisoned, poison_at)
            assert (parked.offset, parked.order_id) == (poison_at, shown)
        await wait_caught_up(db, topic, ALL, api.ends(), alive=run)
        assert neighbour_later.offset > later_at
        assert await stored_halts(db, topic) == {}
        assert not run.runner.halted, run.runner.halted
        assert await parked_rows(db, topic) == sorted(
            [(name, poisoned, poison_at, shown, found[(name, poisoned)][2]) for name in ALL]
            + [(name, poisoned, later_at, shown, PARKED_WITH_ORDER) for name in ALL]
        )
        assert await parked_orders(db) == {(name, shown) for name in ALL}
    await assert_tables_equal_oracle(
        db,
        ALL,
        await events_of_topic(
            bootstrap, topic, leave_out={(poisoned, poison_at), (poisoned, later_at)}
        ),
    )


@pytest.mark.parametrize("copy", [False, True], ids=["json-insert", "binary-copy"])
async def test_a_value_beyond_its_columns_range_halts_its_partition_in_either_write_mode(
    copy: bool,
    api: Api,
    db: AsyncEngine,
    bootstrap: str,
    topic: str,
    group_prefix: str,
    suffix: str,
) -> None:
    """order_history keeps an event's version in an int4: an event of version 2**31 (decodable,
    so it reaches the tables) cannot be stored. Live batches send rows as JSON, and the server
    refuses it; a rebuild's builders COPY them, and asyncpg's encoder refuses it before
    sending. Either way its partition halts there saying why, and the rest goes on.
    """
    names = ["order_history"]
    everything = set(range(PARTITIONS))
    async with running(db, bootstrap, topic, group_prefix, names, assigned=PARTITIONS) as run:
        run.runner.config.copy_append_only = copy  # read per batch: the builders' way
        neighbour = await api.create(f"huge-neighbour-{suffix}")
        poisoned = neighbour.partition
        other = await create_on(api, f"huge-other-{suffix}", everything - {poisoned})
        order_id = f"huge-{suffix}"
        data = {"customer_id": f"huge-{suffix}", "currency": "EUR"}
        value = envelope_json(order_id, 2**31, type="OrderCreated", schema_version=1, data=data)
        poison_at = await produce(bootstrap, topic, poisoned, value, order_id.encode())
        await api.add(neighbour.order_id, "TEA", 1, 500)
        await api.add(other.order_id, "PEN", 3, 200)

        found = await wait_halted(db, topic, names, poisoned, run)
        offset, halted_order, reason = found[("order_history", poisoned)]
        assert (offset, halted_order) == (poison_at, order_id), found
        assert "the database refused it" in reason, reason
        assert "range" in reason, reason
        others = {p: end for p, end in api.ends().items() if p != poisoned}
        await wait_caught_up(db, topic, names, others, alive=run)
        await wait_caught_up(db, topic, names, {poisoned: poison_at}, alive=run)
        assert set(run.runner.halted) == {("order_history", poisoned)}


async def test_a_repeated_version_of_an_order_halts_the_orders_projection(
    api: Api, db: AsyncEngine, bootstrap: str, topic: str, group_prefix: str, suffix: str
) -> None:
    """An event that repeats a version its order already has (a log anomaly: the checkpoints
    never hand an event over twice) halts ``orders`` in its partition, as customer_summary and
    daily_sales would count it; the order's row stays as it was, the other partitions go on."""
    names = ["orders"]
    everything = set(range(PARTITIONS))
    async with running(db, bootstrap, topic, group_prefix, names, assigned=PARTITIONS) as run:
        victim = await api.create(f"repeat-{suffix}")
        await api.add(victim.order_id, "MUG", 1, 1250)
        poisoned = victim.partition
        other = await create_on(api, f"repeat-other-{suffix}", everything - {poisoned})
        await wait_caught_up(db, topic, names, api.ends(), alive=run)
        row_before = (await table_contents(db, catalog.PROJECTIONS["orders"]))["orders"][
            (victim.order_id,)
        ]
        assert row_before["version"] == 2

        data = {"sku": "TEA", "name": "Tea", "quantity": 1, "unit_price": 500}
        repeated = envelope_json(victim.order_id, 2, type="ItemAdded", schema_version=1, data=data)
        repeat_at = await produce(bootstrap, topic, poisoned, repeated, victim.order_id.encode())
        await api.add(other.order_id, "PEN", 3, 200)

        found = await wait_halted(db, topic, names, poisoned, run)
        offset, halted_order, reason = found[("orders", poisoned)]
        assert (offset, halted_order) == (repeat_at, victim.order_id), found
        assert "ProjectionBug" in reason, reason
        assert "repeats a version" in reason, reason
        others = {p: end for p, end in api.ends().items() if p != poisoned}
        await wait_caught_up(db, topic, names, others, alive=run)
        rows = (await table_contents(db, catalog.PROJECTIONS["orders"]))["orders"]
        assert rows[(victim.order_id,)] == row_before
