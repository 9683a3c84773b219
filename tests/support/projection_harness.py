"""Projection tests: commands over HTTP, runners in-process, tables read back next to the oracle.

Everything here talks to the real broker and the real database; nothing is mocked. Waiting is
always polling with a deadline, never a sleep that hopes something has happened meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import traceback
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import httpx
import msgspec
import sqlalchemy as sa
from aiokafka import ConsumerRecord, TopicPartition
from sqlalchemy.ext.asyncio import AsyncEngine

from projections.batches import Halt
from projections.checkpoints import live_checkpoints
from projections.models import catalog
from projections.projection import Applied, Db, Projection, State, oracle
from projections.runner import ProjectionRunner, RunnerConfig
from service.infra.eventlog import read_to_end
from service.kernel import envelope
from tests.support.database import reset_read_side

DEADLINE_S = 45.0
POLL_S = 0.02

Row = dict[str, Any]

# -- commands over HTTP ---------------------------------------------------------------------


@dataclass(frozen=True)
class Done:
    """A command the API accepted: the order's new version and where its event sits."""

    order_id: str
    version: int
    partition: int
    offset: int

    @property
    def token(self) -> str:
        return f"{self.partition}:{self.offset}"


@dataclass
class Api:
    """The command endpoints, each asserting success and remembering where its event went."""

    client: httpx.AsyncClient
    accepted: list[Done] = field(default_factory=list)

    async def _command(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, status: int = 200
    ) -> Done:
        response = await self.client.request(method, path, json=body)
        assert response.status_code == status, f"{method} {path}: {response.text}"
        payload = response.json()
        assert response.headers["etag"] == f'"{payload["version"]}"'
        assert response.headers["x-consistency-token"] == payload["consistency_token"]
        partition, offset = payload["consistency_token"].split(":")
        done = Done(payload["order_id"], payload["version"], int(partition), int(offset))
        self.accepted.append(done)
        return done

    async def create(
        self,
        customer_id: str,
        currency: str = "EUR",
        shipping_address: dict[str, Any] | None = None,
    ) -> Done:
        body: dict[str, Any] = {"customer_id": customer_id, "currency": currency}
        if shipping_address is not None:
            body["shipping_address"] = shipping_address
        return await self._command("POST", "/orders", body, status=201)

    async def set_address(self, order_id: str, address: dict[str, Any]) -> Done:
        return await self._command("PUT", f"/orders/{order_id}/shipping-address", address)

    async def add(
        self, order_id: str, sku: str, quantity: int, unit_price: int, name: str | None = None
    ) -> Done:
        body = {
            "sku": sku,
            "name": name if name is not None else f"Item {sku}",
            "quantity": quantity,
            "unit_price": unit_price,
        }
        return await self._command("POST", f"/orders/{order_id}/items", body)

    async def change(self, order_id: str, sku: str, quantity: int) -> Done:
        return await self._command(
            "PATCH", f"/orders/{order_id}/items/{sku}", {"quantity": quantity}
        )

    async def remove(self, order_id: str, sku: str) -> Done:
        return await self._command("DELETE", f"/orders/{order_id}/items/{sku}")

    async def place(self, order_id: str) -> Done:
        return await self._command("POST", f"/orders/{order_id}/place")

    async def pay(self, order_id: str, amount: int, currency: str = "EUR") -> Done:
        body = {"amount": amount, "currency": currency, "payment_reference": f"psp-{order_id[:8]}"}
        return await self._command("POST", f"/orders/{order_id}/pay", body)

    async def ship(self, order_id: str, carrier: str = "DHL", tracking: str = "JD0001") -> Done:
        body = {"carrier": carrier, "tracking_number": tracking}
        return await self._command("POST", f"/orders/{order_id}/ship", body)

    async def deliver(self, order_id: str) -> Done:
        return await self._command("POST", f"/orders/{order_id}/deliver")

    async def cancel(self, order_id: str, reason: str = "changed mind") -> Done:
        return await self._command("POST", f"/orders/{order_id}/cancel", {"reason": reason})

    def ends(self) -> dict[int, int]:
        """Per partition, the offset just after the last accepted event."""
        return ends_of((done.partition, done.offset) for done in self.accepted)


def ends_of(positions: Iterable[tuple[int, int]]) -> dict[int, int]:
    ends: dict[int, int] = {}
    for partition, offset in positions:
        ends[partition] = max(ends.get(partition, 0), offset + 1)
    return ends


# -- runners in-process -----------------------------------------------------------------------


class Lagging:
    """A projection whose every batch first waits ``lag_s`` in Postgres: a read model that lags.

    Same name, tables, load and fold as the real one; only slower, as under load.
    """

    def __init__(self, inner: Projection, lag_s: float) -> None:
        self.inner = inner
        self.name = inner.name
        self.tables = inner.tables
        self.lag_s = lag_s

    async def load(self, db: Db, batch: Sequence[Applied]) -> State:
        await db.connection.execute("SELECT pg_sleep($1)", self.lag_s)
        return await self.inner.load(db, batch)

    def fold(self, state: State, applied: Applied) -> None:
        self.inner.fold(state, applied)


def runner_for(
    names: Sequence[str],
    engine: AsyncEngine,
    bootstrap: str,
    topic: str,
    group_prefix: str,
    *,
    lag_s: float = 0.0,
    wrap: Callable[[Projection], Projection] | None = None,
) -> ProjectionRunner:
    """One runner (one consumer) applying the named projections (each ``wrap``ped if given)."""
    config = RunnerConfig(kafka=bootstrap, topic=topic, group_prefix=group_prefix)
    projections: list[Projection] = [catalog.PROJECTIONS[name] for name in names]
    if lag_s:
        projections = [Lagging(projection, lag_s) for projection in projections]
    if wrap is not None:
        projections = [wrap(projection) for projection in projections]
    return ProjectionRunner(projections, engine, config)


@dataclass
class Running:
    """A runner of some projections, consuming in its own task until ``stop`` is set."""

    runner: ProjectionRunner
    tasks: dict[str, asyncio.Task[None]]
    stop: asyncio.Event

    def halt(self, name: str, partition: int) -> Halt | None:
        return self.runner.halted.get((name, partition))

    def check_alive(self) -> None:
        for name, task in self.tasks.items():
            if task.done():
                error = None if task.cancelled() else task.exception()
                where = "".join(traceback.format_exception(error)[-6:]) if error else ""
                raise AssertionError(f"the {name} runner stopped on its own: {error!r}\n{where}")


@contextlib.asynccontextmanager
async def running(
    engine: AsyncEngine,
    bootstrap: str,
    topic: str,
    group_prefix: str,
    names: Sequence[str],
    *,
    assigned: int | None = None,
    lag_s: float = 0.0,
    wrap: Callable[[Projection], Projection] | None = None,
) -> AsyncIterator[Running]:
    """Run the named projections until the block ends; then stop them and await their tasks.

    With ``assigned``, the block starts once every runner has sought that many partitions to
    their checkpoints (its rebalance listener has finished).
    """
    stop = asyncio.Event()
    runner = runner_for(names, engine, bootstrap, topic, group_prefix, lag_s=lag_s, wrap=wrap)
    tasks = {"+".join(names): asyncio.create_task(runner.run(stop), name="runner")}
    handle = Running(runner, tasks, stop)
    failed = False
    try:
        if assigned is not None:

            async def sought() -> tuple[bool, Any]:
                return len(runner.positions) >= assigned, runner.positions

            await eventually(
                sought, f"{list(names)} to be assigned {assigned} partitions", alive=handle
            )
        yield handle
    except BaseException:
        failed = True
        raise
    finally:
        stop.set()
        results = await asyncio.wait_for(
            asyncio.gather(*tasks.values(), return_exceptions=True), DEADLINE_S
        )
        errors = {n: r for n, r in zip(tasks, results, strict=True) if isinstance(r, BaseException)}
        if errors and not failed:
            raise AssertionError(f"runners failed: {errors!r}")


async def eventually(
    check: Callable[[], Awaitable[tuple[bool, Any]]],
    what: str,
    *,
    alive: Running | None = None,
    timeout: float = DEADLINE_S,
) -> Any:
    """Poll ``check`` (-> (done, detail)) until done; fail with the last detail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        done, detail = await check()
        if done:
            return detail
        if alive is not None:
            alive.check_alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}: {detail!r}")
        await asyncio.sleep(POLL_S)  # polling interval, not synchronisation


async def checkpoints(engine: AsyncEngine, projection: str, topic: str) -> dict[int, int]:
    """The live version's checkpoints: partition -> next offset."""
    live = live_checkpoints(topic)
    async with engine.connect() as connection:
        rows = await connection.execute(
            sa.select(live.c.partition, live.c.next_offset).where(live.c.projection == projection)
        )
        return {row.partition: row.next_offset for row in rows}


async def wait_caught_up(
    engine: AsyncEngine,
    topic: str,
    names: Iterable[str],
    ends: dict[int, int],
    *,
    alive: Running | None = None,
    timeout: float = DEADLINE_S,
) -> None:
    """Wait until each projection's checkpoint has passed ``ends`` (partition -> offset after)."""
    names = list(names)

    async def check() -> tuple[bool, Any]:
        behind = {}
        for name in names:
            stored = await checkpoints(engine, name, topic)
            for partition, end in ends.items():
                if stored.get(partition, 0) < end:
                    behind[(name, partition)] = (stored.get(partition), end)
        return not behind, behind

    await eventually(check, f"{names} to reach {ends}", alive=alive, timeout=timeout)


# -- the topic ---------------------------------------------------------------------------------

Fetched = dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]


async def read_records(bootstrap: str, topic: str, partitions: int) -> Fetched:
    """Every committed record of the topic, by partition, in offset order (undecoded)."""
    fetched: Fetched = defaultdict(list)
    async for batch in read_to_end(bootstrap, topic, range(partitions)):
        for record in batch:
            fetched[TopicPartition(record.topic, record.partition)].append(record)
    return dict(fetched)


def decoded(fetched: Fetched, *, skip: Iterable[tuple[int, int]] = ()) -> list[Applied]:
    """The records as the runner sees them; ``skip`` names (partition, offset)s to leave out."""
    skipped = set(skip)
    applied = []
    for tp in sorted(fetched, key=lambda tp: tp.partition):
        for record in fetched[tp]:
            if (record.partition, record.offset) in skipped:
                continue
            sealed, event = envelope.decode(record.value)
            applied.append(Applied(sealed, event, record.partition, record.offset))
    return applied


# -- tables next to the oracle -----------------------------------------------------------------


async def clear_read_models(engine: AsyncEngine) -> None:
    """Empty every read-model table and checkpoint of this module's database."""
    await reset_read_side(engine)


def normalise(value: Any) -> Any:
    """Comparable plain values: datetimes as UTC ISO strings, dates as ISO, JSON recursively."""
    if isinstance(value, msgspec.Raw):
        return normalise(msgspec.json.decode(value))
    if isinstance(value, datetime):
        assert value.tzinfo is not None, f"naive datetime {value!r}"
        return value.astimezone(UTC).isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(key): normalise(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [normalise(item) for item in value]
    return value


Contents = dict[str, dict[tuple[Any, ...], Row]]


def _keyed(table: sa.Table, rows: Iterable[Row]) -> dict[tuple[Any, ...], Row]:
    keys = [column.name for column in table.primary_key.columns]
    keyed = {}
    for row in rows:
        plain = {name: normalise(value) for name, value in row.items()}
        keyed[tuple(plain[k] for k in keys)] = plain
    return keyed


async def table_contents(engine: AsyncEngine, projection: Projection) -> Contents:
    """Every row of the projection's tables (selected in primary-key order), by key."""
    contents = {}
    async with engine.connect() as connection:
        for table in projection.tables:
            result = await connection.execute(sa.select(table).order_by(*table.primary_key.columns))
            contents[table.name] = _keyed(table, (dict(row._mapping) for row in result))
    return contents


def oracle_contents(projection: Projection, events: Sequence[Applied]) -> Contents:
    snapshot = oracle(projection, events).snapshot()
    return {table.name: _keyed(table, snapshot[table.name]) for table in projection.tables}


def differences(actual: Contents, expected: Contents, *, limit: int = 8) -> list[str]:
    """Human-readable differences, table by table: missing, extra and differing rows."""
    found = []
    for name in expected:
        have, want = actual.get(name, {}), expected[name]
        problems = []
        for key in sorted(set(want) - set(have), key=repr):
            problems.append(f"{name} {key}: missing (oracle {want[key]})")
        for key in sorted(set(have) - set(want), key=repr):
            problems.append(f"{name} {key}: extra row {have[key]}")
        for key in sorted(set(have) & set(want), key=repr):
            if have[key] != want[key]:
                columns = {
                    column: (have[key].get(column), want[key].get(column))
                    for column in want[key].keys() | have[key].keys()
                    if have[key].get(column) != want[key].get(column)
                }
                problems.append(f"{name} {key}: (table, oracle) differ in {columns}")
        if problems:
            found.append(f"{name}: {len(problems)} row(s) differ")
            found.extend(problems[:limit])
    return found


async def assert_tables_equal_oracle(
    engine: AsyncEngine, names: Iterable[str], events: Sequence[Applied]
) -> dict[str, Contents]:
    """Every table of every named projection equals a pure fold of ``events`` from empty."""
    problems = []
    contents = {}
    for name in names:
        projection = catalog.PROJECTIONS[name]
        actual = await table_contents(engine, projection)
        contents[name] = actual
        expected = oracle_contents(projection, events)
        assert any(expected.values()), f"the oracle of {name} is empty: a vacuous comparison"
        problems += [f"[{name}] {line}" for line in differences(actual, expected)]
    assert not problems, "read models differ from the oracle:\n" + "\n".join(problems)
    return contents
