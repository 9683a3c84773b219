"""Broker outages against a real broker of this module's own: 503s, self-recovery, a clean log.

The session broker is never touched: this module starts its own ``LocalKafka`` and kills and
restarts it. Every command carries a unique ``X-Correlation-Id``, which the envelope keeps, so
the topic can be checked command by command against what each client was told.

The broker answers a commit before it writes the commit markers into the partitions, and this
single-node KRaft broker, killed with SIGKILL in between, can restart without some of them:
its transaction coordinator completes the commit while the partitions are briefly leaderless
and skips their markers, leaving a transaction open there for good ("hanging"). The writer
acknowledges a command only once its markers are in (the mid-stream kill checks that no
acknowledged command is lost), aborts on loading what its own producer id left open (the last
test reproduces the broker's loss), and refuses to decide while another producer's transaction
holds the log back (the test before). Where a test kills the broker at a quiet moment, it
first waits for the markers (``_wait_settled``) so that the kill is what the test means.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition

from service.edge.http.app import Resources, create_app
from service.infra.embedded import free_port
from service.infra.embedded.kafka import LocalKafka
from service.infra.eventlog import committed_reader
from service.kernel import envelope
from service.kernel.events import OrderCreated
from service.write.contract import WriterConfig
from service.write.recovery import OpenTransactionInLog
from service.write.writer import Writer, WriterState
from tests.support.http import serve
from tests.support.identity import access
from tests.support.log import LoggedEvent, by_order, folded_orders, read_topic
from tests.support.topics import new_topic

pytestmark = pytest.mark.chaos

PARTITIONS = 4
COMMIT_TIMEOUT = 3.0
# A command waits out at most one commit attempt (COMMIT_TIMEOUT); the rest is slack for a busy
# machine. Anything longer is a hang.
RESPONSE_BOUND = COMMIT_TIMEOUT + 10.0
# From the broker accepting connections again to the writer taking commands.
RECOVERY_BOUND = 60.0
Client = httpx.AsyncClient


# -- the module's own broker ------------------------------------------------------------------


@dataclass
class Broker:
    """A LocalKafka plus the one thread that (re)starts it.

    The broker dies with the thread that spawned it (PR_SET_PDEATHSIG is per thread), so every
    start runs on this module's single long-lived worker thread: the test's event loop stays
    free while the broker restarts, and the writer has to find its way back on its own.
    """

    kafka: LocalKafka
    thread: ThreadPoolExecutor

    @property
    def bootstrap_servers(self) -> str:
        return self.kafka.bootstrap_servers

    @property
    def alive(self) -> bool:
        return self.kafka.process is not None and self.kafka.process.poll() is None

    def kill(self) -> None:
        self.kafka.kill()
        assert not self.alive

    async def restart(self) -> float:
        started = time.monotonic()
        await asyncio.get_running_loop().run_in_executor(self.thread, self.kafka.restart)
        return time.monotonic() - started


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outage-broker")
    kafka = LocalKafka(port=free_port(), data_dir=tmp_path_factory.mktemp("outage-kafka"))
    try:
        thread.submit(kafka.start).result()
        yield Broker(kafka, thread)
    finally:
        thread.submit(kafka.stop).result()
        thread.shutdown()


def _config(broker: Broker, topic: str) -> WriterConfig:
    """A writer of its own (a fresh transactional id) on the module's broker."""
    return WriterConfig(
        kafka=broker.bootstrap_servers,
        topic=topic,
        transactional_id=f"outage-{uuid.uuid4().hex[:8]}",
        commit_timeout=COMMIT_TIMEOUT,
    )


@pytest.fixture
async def topic(broker: Broker) -> str:
    """The test's events topic on the module's broker, created."""
    if not broker.alive:  # an earlier test failed while the broker was down
        await broker.restart()
    name = f"test.outage.{uuid.uuid4().hex[:12]}"
    await new_topic(broker.bootstrap_servers, name, PARTITIONS)
    return name


@pytest.fixture
async def writer(broker: Broker, topic: str) -> AsyncIterator[Writer]:
    if not broker.alive:  # an earlier test failed while the broker was down
        await broker.restart()
    writer = Writer(_config(broker, topic))
    await writer.start()
    yield writer
    if not broker.alive:
        await broker.restart()
    await writer.stop()


@pytest.fixture
async def client(writer: Writer) -> AsyncIterator[Client]:
    async with serve(create_app(Resources(writer=writer), access=access())) as client:
        yield client


# -- commands, and what each client was told --------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    correlation_id: str
    status: int
    seconds: float
    order_id: str | None = None
    version: int | None = None
    headers: httpx.Headers | None = None
    body: Any = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


async def _command(
    client: Client, method: str, path: str, body: Any = None, **headers: str
) -> Outcome:
    """One command with a unique correlation id; a response slower than RESPONSE_BOUND fails."""
    correlation_id = f"cmd-{uuid.uuid4().hex}"
    started = time.monotonic()
    try:
        async with asyncio.timeout(RESPONSE_BOUND):
            response = await client.request(
                method, path, json=body, headers={"X-Correlation-Id": correlation_id, **headers}
            )
    except TimeoutError:
        pytest.fail(f"{method} {path} hung for more than {RESPONSE_BOUND}s")
    seconds = time.monotonic() - started
    assert response.status_code != 500, response.text
    payload = response.json()
    if 200 <= response.status_code < 300:
        return Outcome(
            correlation_id,
            response.status_code,
            seconds,
            payload["order_id"],
            payload["version"],
            response.headers,
            payload,
        )
    return Outcome(
        correlation_id, response.status_code, seconds, None, None, response.headers, payload
    )


async def _create(client: Client, customer: str = "c-1") -> Outcome:
    return await _command(client, "POST", "/orders", {"customer_id": customer, "currency": "EUR"})


async def _add(client: Client, order_id: str, sku: str) -> Outcome:
    body = {"sku": sku, "name": f"Item {sku}", "quantity": 1, "unit_price": 500}
    return await _command(client, "POST", f"/orders/{order_id}/items", body)


def _assert_unavailable(outcome: Outcome) -> None:
    """A 503 problem+json that tells the client when to come back."""
    assert outcome.status == 503, outcome.body
    assert outcome.headers is not None
    assert outcome.headers["content-type"].startswith("application/problem+json")
    assert outcome.body["type"].endswith("/unavailable")
    assert outcome.body["status"] == 503
    assert int(outcome.headers["retry-after"]) >= 1


async def _open_transactions(bootstrap: str, topic: str) -> dict[int, tuple[int, int]]:
    """Partitions whose last stable offset is behind their end: (stable, end) for each."""
    partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    ends = {}
    for isolation_level in ("read_committed", "read_uncommitted"):
        consumer = committed_reader(bootstrap, isolation_level=isolation_level)
        await consumer.start()
        try:
            ends[isolation_level] = await consumer.end_offsets(partitions)
        finally:
            await consumer.stop()
    stable, end = ends["read_committed"], ends["read_uncommitted"]
    return {tp.partition: (stable[tp], end[tp]) for tp in partitions if stable[tp] < end[tp]}


async def _wait_settled(broker: Broker, topic: str, *, bound: float = 15.0) -> None:
    """Poll until every commit marker is in the partitions (see the module docstring)."""
    started = time.monotonic()
    while open_at := await _open_transactions(broker.bootstrap_servers, topic):
        if time.monotonic() - started > bound:
            pytest.fail(f"transactions still open after {bound}s: {open_at}")
        await asyncio.sleep(0.05)  # pacing between polls, not synchronisation


async def _wait_ready(
    client: Client, writer: Writer, broker: Broker, topic: str, *, bound: float = RECOVERY_BOUND
) -> float:
    """Poll readiness until 200; returns how long it took."""
    started = time.monotonic()
    while True:
        response = await client.get("/health/ready")
        if response.status_code == 200:
            return time.monotonic() - started
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "1"
        if time.monotonic() - started > bound:
            open_at = await _open_transactions(broker.bootstrap_servers, topic)
            pytest.fail(
                f"the writer did not recover within {bound}s (state {writer.state}); "
                + (
                    f"the broker came back with hanging transactions {open_at}"
                    if open_at
                    else "the log has no open transaction"
                )
            )
        await asyncio.sleep(0.1)  # pacing between polls, not synchronisation


async def _fail_while_down(client: Client, writer: Writer, order_ids: list[str]) -> list[Outcome]:
    """Commands sent with the broker dead: each one a 503, none of them hanging."""
    first = await _add(client, order_ids[0], f"DOWN-{uuid.uuid4().hex[:6]}")
    burst = await asyncio.gather(
        *(_add(client, order_id, f"DOWN-{uuid.uuid4().hex[:6]}") for order_id in order_ids),
        _create(client, "down"),
    )
    outcomes = [first, *burst]
    for outcome in outcomes:
        _assert_unavailable(outcome)
    assert writer.state is WriterState.RECOVERING
    return outcomes


# -- the log against the outcomes -------------------------------------------------------------


@dataclass(frozen=True)
class LogCheck:
    events: list[LoggedEvent]
    ambiguous_present: int


def _check_log(
    events: list[LoggedEvent],
    *,
    acknowledged: list[Outcome],
    absent: Sequence[Outcome] = (),
    ambiguous: Sequence[Outcome] = (),
) -> LogCheck:
    """Every acknowledged command exactly once where it was told; ``absent`` ones nowhere;
    per order versions 1..n without gap or repeat; no event of a command nobody sent."""
    counts = Counter(e.envelope.correlation_id for e in events)
    located = {e.envelope.correlation_id: e for e in events}
    for outcome in acknowledged:
        assert counts[outcome.correlation_id] == 1, (outcome, counts[outcome.correlation_id])
        logged = located[outcome.correlation_id].envelope
        assert (logged.order_id, logged.version) == (outcome.order_id, outcome.version)
    for outcome in absent:
        assert counts[outcome.correlation_id] == 0, f"half-written: {outcome}"
    present = 0
    for outcome in ambiguous:
        assert counts[outcome.correlation_id] <= 1, outcome
        present += counts[outcome.correlation_id]
    known = {o.correlation_id for o in [*acknowledged, *absent, *ambiguous]}
    assert set(counts) <= known, set(counts) - known
    assert len({e.envelope.event_id for e in events}) == len(events)
    for order_id, logged_events in by_order(events).items():
        versions = [e.envelope.version for e in logged_events]
        assert versions == list(range(1, len(versions) + 1)), (order_id, versions)
        assert len({e.record.partition for e in logged_events}) == 1
    return LogCheck(events, present)


# -- the tests --------------------------------------------------------------------------------


async def test_with_the_broker_dead_commands_get_a_bounded_503_with_retry_after(
    client: Client, writer: Writer, broker: Broker, topic: str
) -> None:
    orders = [await _create(client, f"c-{n}") for n in range(3)]
    assert all(o.ok for o in orders)
    order_ids = [o.order_id for o in orders if o.order_id]

    await _wait_settled(broker, topic)
    broker.kill()
    refused = await _fail_while_down(client, writer, order_ids)
    # Once the writer knows, it refuses at once instead of trying again per command.
    later = [await _add(client, order_ids[1], f"LATER-{n}") for n in range(5)]
    for outcome in later:
        _assert_unavailable(outcome)
        assert outcome.seconds < 1.0, outcome
    ready = await client.get("/health/ready")
    assert ready.status_code == 503
    assert ready.json()["writer"] == "recovering"
    print(
        f"\nbroker dead: first command answered 503 in {refused[0].seconds:.2f}s, "
        f"slowest {max(o.seconds for o in refused):.2f}s, "
        f"once recovering {max(o.seconds for o in later) * 1000:.0f}ms"
    )


async def test_after_the_broker_returns_the_writer_recovers_and_the_log_holds_only_acknowledged(
    client: Client, writer: Writer, broker: Broker, topic: str
) -> None:
    before = [await _create(client, f"c-{n}") for n in range(4)]
    order_ids = [o.order_id for o in before if o.order_id]
    before += [await _add(client, order_id, "BEFORE") for order_id in order_ids]
    assert all(o.ok for o in before)

    await _wait_settled(broker, topic)
    broker.kill()
    refused = await _fail_while_down(client, writer, order_ids)
    restart_seconds = await broker.restart()
    ready_seconds = await _wait_ready(client, writer, broker, topic)

    after = [await _add(client, order_id, "AFTER") for order_id in order_ids]
    after += [await _create(client, "c-after")]
    assert all(o.ok for o in after), [o.body for o in after if not o.ok]
    # Versions carry on from the last acknowledged one: the refused commands left no trace.
    assert [o.version for o in after[:-1]] == [3] * len(order_ids)

    events = await read_topic(broker.bootstrap_servers, topic, PARTITIONS)
    _check_log(events, acknowledged=[*before, *after], absent=refused)
    assert len(events) == len(before) + len(after)
    print(
        f"\nbroker restart {restart_seconds:.1f}s, writer ready {ready_seconds:.1f}s later; "
        f"{len(refused)} commands refused while down, none in the log"
    )


async def test_after_recovery_the_writer_state_is_the_fold_of_the_topic(
    client: Client, writer: Writer, broker: Broker, topic: str
) -> None:
    orders = [await _create(client, f"c-{n}") for n in range(5)]
    order_ids = [o.order_id for o in orders if o.order_id]
    for n, order_id in enumerate(order_ids):
        for k in range(n + 1):
            assert (await _add(client, order_id, f"SKU-{k}")).ok
    placed = await _command(client, "POST", f"/orders/{order_ids[-1]}/place")
    assert placed.ok
    before_outage = dict(writer.orders)

    await _wait_settled(broker, topic)
    broker.kill()
    await _fail_while_down(client, writer, order_ids[:-1])
    await broker.restart()
    await _wait_ready(client, writer, broker, topic)

    events = await read_topic(broker.bootstrap_servers, topic, PARTITIONS)
    assert writer.loaded_events == len(events)  # rebuilt from the log, not kept
    assert writer.orders == folded_orders(events)
    assert writer.orders == before_outage

    # And it decides on that state: the next commands land on the next versions.
    cancel = await _command(
        client, "POST", f"/orders/{order_ids[-1]}/cancel", {"reason": "after the outage"}
    )
    assert cancel.ok
    assert cancel.version == writer.orders[order_ids[-1]].version == len(order_ids) + 3
    events = await read_topic(broker.bootstrap_servers, topic, PARTITIONS)
    assert writer.orders == folded_orders(events)


CLIENTS = 20
COMMANDS_PER_CLIENT = 10
SHARED_ORDERS = 10


async def test_a_broker_killed_mid_stream_leaves_no_gap_no_duplicate_and_a_consistent_writer(
    client: Client, writer: Writer, broker: Broker, topic: str
) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    context = f"seed={seed}"
    setup = [await _create(client, f"shared-{n}") for n in range(SHARED_ORDERS)]
    assert all(o.ok for o in setup)
    shared = [o.order_id for o in setup if o.order_id]
    # About one commit cycle (the first command also pays for connecting).
    cycle = 2 * statistics.median(o.seconds for o in setup[1:])

    total = CLIENTS * COMMANDS_PER_CLIENT
    kill_after = rng.randint(total // 10, total // 2)
    answered = 0
    threshold_reached = asyncio.Event()
    outcomes: list[Outcome] = []

    async def one_client(number: int) -> None:
        nonlocal answered
        own: str | None = None
        for n in range(COMMANDS_PER_CLIENT):
            if own is None or rng.random() < 0.2:
                outcome = await _create(client, f"client-{number}")
                if outcome.ok:
                    own = outcome.order_id
            else:
                target = own if rng.random() < 0.5 else rng.choice(shared)
                outcome = await _add(client, target, f"C{number}-{n}")
            outcomes.append(outcome)
            answered += 1
            if answered >= kill_after:
                threshold_reached.set()

    async def killer() -> float:
        await threshold_reached.wait()
        # Answers arrive a batch at a time, right after a commit; a random delay of up to about
        # one commit cycle moves the kill to any point of the next one (sending, committing,
        # waiting for the markers). Fault timing, not synchronisation.
        await asyncio.sleep(rng.uniform(0, cycle))
        broker.kill()
        return time.monotonic()

    killed_at, *_ = await asyncio.gather(killer(), *(one_client(n) for n in range(CLIENTS)))
    statuses = Counter(o.status for o in outcomes)
    assert set(statuses) <= {200, 201, 503}, (statuses, context)
    refused = [o for o in outcomes if o.status == 503]
    for outcome in refused:
        _assert_unavailable(outcome)
    acknowledged = [*setup, *(o for o in outcomes if o.ok)]
    assert refused, (f"the kill after {kill_after} answers refused nothing", context)

    restart_seconds = await broker.restart()
    ready_seconds = await _wait_ready(client, writer, broker, topic)
    recovered_at = time.monotonic()

    events = await read_topic(broker.bootstrap_servers, topic, PARTITIONS)
    # A refused command whose transaction was being committed when the broker died may be in
    # the log: its outcome was unknown. That is at most one transaction, whose commands each
    # came from a different client.
    check = _check_log(events, acknowledged=acknowledged, ambiguous=refused)
    assert check.ambiguous_present <= CLIENTS, (check.ambiguous_present, context)
    assert len(events) == len(acknowledged) + check.ambiguous_present
    assert writer.orders == folded_orders(events), context

    # The recovered writer decides on the log's state: a conditional command per order, on the
    # version the log says, wins; the log stays gapless.
    final = {order_id: logged[-1].envelope.version for order_id, logged in by_order(events).items()}
    after = await asyncio.gather(
        *(
            _command(
                client,
                "POST",
                f"/orders/{order_id}/items",
                {"sku": "AFTER", "name": "after", "quantity": 1, "unit_price": 1},
                **{"If-Match": f'"{version}"'},
            )
            for order_id, version in final.items()
        )
    )
    assert all(o.ok for o in after), ([o.body for o in after if not o.ok], context)
    assert {o.order_id: o.version for o in after} == {k: v + 1 for k, v in final.items()}
    events = await read_topic(broker.bootstrap_servers, topic, PARTITIONS)
    _check_log(
        events,
        acknowledged=[*acknowledged, *after],
        ambiguous=refused,
    )
    assert writer.orders == folded_orders(events), context
    print(
        f"\n{context}: killed after {kill_after} of {total} answers "
        f"(+ up to {cycle * 1000:.0f}ms); "
        f"{len(acknowledged) - len(setup)} acknowledged, {len(refused)} refused, "
        f"{check.ambiguous_present} refused but committed; broker restart {restart_seconds:.1f}s, "
        f"writer ready {ready_seconds:.1f}s later ({recovered_at - killed_at:.1f}s after the kill)"
    )


async def test_a_writer_stopped_mid_batch_tells_its_callers_and_leaves_nothing_open(
    broker: Broker, topic: str
) -> None:
    """``stop`` waits a bounded time for the batch in flight, then cancels it. Its callers
    must hear that the outcome is unknown (not wait forever), and the transaction it left open
    must be aborted (not hold every partition's last stable offset back until the broker times
    it out, a minute by default)."""
    writer = Writer(_config(broker, topic))
    await writer.start()
    committing = asyncio.Event()
    producer = writer._appender.producer
    assert producer is not None

    async def commit_that_hangs() -> None:
        committing.set()
        await asyncio.Event().wait()  # until cancelled

    producer.commit_transaction = commit_that_hangs  # type: ignore[method-assign]
    async with serve(create_app(Resources(writer=writer), access=access())) as client:
        command = asyncio.create_task(_create(client))
        async with asyncio.timeout(RESPONSE_BOUND):
            await committing.wait()  # the batch's records are delivered, the commit "hangs"
        await writer.stop(timeout=0.5)
        outcome = await command
    _assert_unavailable(outcome)
    assert "retry with the same Idempotency-Key" in outcome.body["detail"]
    deadline = time.monotonic() + 20.0  # well within the broker's transaction timeout (60 s)
    while (left_open := await _open_transactions(broker.bootstrap_servers, topic)) != {}:
        assert time.monotonic() < deadline, f"still open after stop: {left_open}"
        await asyncio.sleep(0.2)  # polling the broker's offsets, bounded by the deadline


async def test_the_writer_will_not_decide_on_a_log_held_back_by_an_open_transaction(
    broker: Broker, topic: str
) -> None:
    """A transaction left open on a partition (here: a foreign producer's, as a broker that lost
    a commit marker leaves one) hides everything after it from read_committed readers. A writer
    loading then would decide on a stale state, so it refuses to start, and says why.

    Before it aborts anything it waits a whole commit timeout: a writer it fenced may still be
    waiting that long for the markers of a batch, and must give up before the abort could end
    that batch and move the last stable offset past it
    (``service.write.recovery.open_transactions``)."""
    first = Writer(_config(broker, topic))
    await first.start()
    await first.stop()
    squatter = AIOKafkaProducer(
        bootstrap_servers=broker.bootstrap_servers, transactional_id=f"squatter-{topic}"
    )
    await squatter.start()
    try:
        await squatter.begin_transaction()
        await squatter.send_and_wait(topic, b"never committed", partition=2)
        writer = Writer(first.config)
        aborts_after: list[float] = []
        abort_left_open = writer._appender.abort_left_open

        async def timed_abort(partitions: list[int]) -> None:
            aborts_after.append(time.monotonic() - started)
            await abort_left_open(partitions)

        writer._appender.abort_left_open = timed_abort  # type: ignore[method-assign]
        started = time.monotonic()
        with pytest.raises(OpenTransactionInLog, match=r"partition 2: last stable offset 0 <"):
            await writer.start()
        assert writer.state is WriterState.STARTING
        assert aborts_after, "the writer never tried to abort what was left open"
        assert aborts_after[0] >= COMMIT_TIMEOUT, aborts_after
        await squatter.abort_transaction()
        await writer.start()  # once the transaction is resolved, it starts
        try:
            assert writer.ready
        finally:
            await writer.stop()
    finally:
        await squatter.stop()


async def test_a_transaction_the_broker_left_open_is_aborted_before_the_writer_decides(
    broker: Broker, topic: str
) -> None:
    """Try to reproduce the broker losing commit markers (commit, then SIGKILL at once; up to
    three tries), as an earlier writer acknowledging before the markers were in would have met
    it. Whether or not the broker lost them, the writer must then start on a log with nothing
    left open and a state equal to the fold of what is committed."""
    config = _config(broker, topic)
    creator = Writer(config)
    await creator.start()
    await creator.stop()
    left_open: dict[int, tuple[int, int]] = {}
    for _attempt in range(3):
        producer = AIOKafkaProducer(
            bootstrap_servers=broker.bootstrap_servers,
            transactional_id=config.transactional_id,
            enable_idempotence=True,
            acks="all",
        )
        await producer.start()
        try:
            await producer.begin_transaction()
            for _ in range(2 * PARTITIONS):
                sealed = _order_created()
                await producer.send(
                    topic,
                    value=envelope.encode(sealed),
                    key=sealed.order_id.encode(),
                    headers=envelope.headers(sealed),
                )
            await producer.commit_transaction()
            broker.kill()  # right after the commit: the markers may not be written yet
        finally:
            await producer.stop()
        await broker.restart()
        left_open = await _open_transactions(broker.bootstrap_servers, topic)
        if left_open:
            break

    writer = Writer(config)
    await writer.start()
    try:
        assert await _open_transactions(broker.bootstrap_servers, topic) == {}
        events = await read_topic(broker.bootstrap_servers, topic, PARTITIONS)
        assert writer.loaded_events == len(events)
        assert writer.orders == folded_orders(events)
        _check_log(events, acknowledged=[], ambiguous=[_any_correlation(e) for e in events])
    finally:
        await writer.stop()
    if not left_open:  # the checks above hold, but did not exercise the abort: say so
        pytest.skip("the broker kept every commit marker in 3 tries: nothing was left to abort")
    print(f"\nthe broker left {left_open} open; the writer started on a clean log")


def _order_created() -> envelope.Envelope:
    order_id = str(uuid.uuid4())
    command_id = f"cmd-{uuid.uuid4().hex}"
    return envelope.seal(
        OrderCreated(customer_id="c-raw", currency="EUR"),
        event_id=envelope.event_id_for(None, command_id, 0),
        order_id=order_id,
        version=1,
        occurred_at=datetime.now(UTC),
        command_id=command_id,
        correlation_id=command_id,
        causation_id=command_id,
    )


def _any_correlation(logged: LoggedEvent) -> Outcome:
    return Outcome(logged.envelope.correlation_id, 503, 0.0)
