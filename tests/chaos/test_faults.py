"""Faults at random moments under a live workload: nothing acknowledged is lost or doubled.

A real broker and a real PostgreSQL server of this module's own (the session's are never
touched), the API and the projector as ``orders`` processes, and many HTTP clients (see
``tests/support/workload.py``). While the clients run, each process and each server is killed
with SIGKILL, or stopped with SIGTERM, at random (seeded) moments, and started again. Then:

1. every acknowledged command's event is in the topic exactly once, where its answer said; no
   event exists for a command that was not acknowledged, except for commands whose outcome the
   client could not know (counted separately);
2. per order, versions are gapless and never repeat;
3. every read-model table equals the oracle, a pure fold of every event in the topic;
4. no 500; during outages only 503 with Retry-After, or no connection while the API is down.

Two victims also go down together (``OVERLAPS``): a process killed or stopped while the server
it needs is away, or both servers at once.

Sizes: ``CHAOS_SEED``, ``CHAOS_FAULT_ROUNDS`` (each round injects every kind of fault once, in
random order), ``CHAOS_CLIENTS``, ``CHAOS_MIN_ACKNOWLEDGED``. The defaults fit the CI budget;
raise them for longer runs. Run with ``-s`` to see the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from projections.models import catalog
from projections.projection import Applied
from projections.runner import ProjectionRunner, RunnerConfig
from service.infra.database import create_engine, migrate
from service.infra.embedded.kafka import LocalKafka
from service.infra.embedded.postgres import LocalPostgres
from service.kernel import domain, envelope
from service.kernel.events import OrderPlaced
from service.write.contract import CommandRequest, WriterConfig
from service.write.writer import Writer
from tests.support.processes import (
    ApiProcess,
    ServiceProcess,
    projector_process,
    service_env,
    wait_no_open_transaction,
)
from tests.support.projection_harness import decoded, eventually, read_records
from tests.support.topics import new_topic
from tests.support.workload import (
    Audit,
    Ledger,
    Sent,
    Workload,
    WorkloadConfig,
    audit,
    oracle_mismatches,
    wait_projected,
)

pytestmark = pytest.mark.chaos

PARTITIONS = 6
SEED = os.environ.get("CHAOS_SEED", "20261128")
FAULT_ROUNDS = int(os.environ.get("CHAOS_FAULT_ROUNDS", "1"))
CLIENTS = int(os.environ.get("CHAOS_CLIENTS", "12"))
MIN_ACKNOWLEDGED = int(os.environ.get("CHAOS_MIN_ACKNOWLEDGED", "1000"))
TARGETS = ("projector", "api", "kafka", "postgres")
MODES = ("kill -9", "SIGTERM")
# Two victims at once: a process killed or stopped while a server it needs is away (it comes
# back after the server), or both servers away together. Each pair once per round, in a
# random mode.
OVERLAPS = ("api+kafka", "projector+postgres", "kafka+postgres")
# A client error is expected only while the API is down, give or take this much.
OUTAGE_SLACK_S = 1.0


# -- the module's own broker and database ----------------------------------------------------


@dataclass
class Servers:
    """A LocalKafka and a LocalPostgres, always (re)started from one long-lived thread.

    Each server dies with the thread that spawned it (PR_SET_PDEATHSIG is per thread), and
    the test's event loop must stay free while a server restarts: the clients keep going.
    """

    kafka: LocalKafka
    postgres: LocalPostgres
    thread: ThreadPoolExecutor

    @property
    def ports(self) -> list[int]:
        return [self.kafka.port, self.postgres.port]

    async def call(self, action: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.thread, action)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fault-servers")
    kafka = LocalKafka(data_dir=tmp_path_factory.mktemp("fault-kafka"))
    postgres = LocalPostgres(data_dir=tmp_path_factory.mktemp("fault-pg"))
    try:
        thread.submit(postgres.start).result()
        thread.submit(kafka.start).result()
        yield Servers(kafka, postgres, thread)
    finally:
        thread.submit(kafka.stop).result()
        thread.submit(postgres.stop).result()
        thread.shutdown()


# -- the fault injector ------------------------------------------------------------------------


@dataclass
class Faults:
    """Injects one fault at a time and brings its victims back before the next one."""

    servers: Servers
    api: ApiProcess
    projector: ServiceProcess
    rng: random.Random
    injected: Counter[str] = field(default_factory=Counter)
    api_outages: list[tuple[float, float]] = field(default_factory=list)
    graceful_exit_codes: dict[str, list[int]] = field(default_factory=dict)
    unexpected_exits: list[str] = field(default_factory=list)
    recovery_seconds: dict[str, list[float]] = field(default_factory=dict)
    timeline: list[str] = field(default_factory=list)
    acknowledged: Callable[[], int] = lambda: 0
    _origin: float = field(default_factory=time.monotonic)

    def note(self, what: str) -> None:
        self.timeline.append(
            f"{time.monotonic() - self._origin:6.1f}s {what} (acknowledged so far: "
            f"{self.acknowledged()})"
        )

    async def run(self, rounds: int) -> None:
        schedule = []
        for _ in range(rounds):
            schedule += [(target, mode) for target in TARGETS for mode in MODES]
            schedule += [(pair, self.rng.choice(MODES)) for pair in OVERLAPS]
        self.rng.shuffle(schedule)
        for target, mode in schedule:
            await asyncio.sleep(self.rng.uniform(1.0, 4.0))  # a random moment to strike at
            self.check_alive(f"before {mode} of {target}")
            started = time.monotonic()
            self.note(f"{mode} {target}")
            await self._inject(target, mode)
            self.injected[f"{mode} {target}"] += 1
            self.recovery_seconds.setdefault(target, []).append(time.monotonic() - started)
            self.note(f"{target} back after {time.monotonic() - started:.1f}s")

    def check_alive(self, when: str) -> None:
        """A process that died by itself is a finding; restart it so the run can go on."""
        for process in (self.api, self.projector):
            if not process.alive:
                code = process.process.returncode if process.process else None
                self.unexpected_exits.append(
                    f"{process.argv[0]} exited by itself ({code}) {when}:\n{process.tail()}"
                )
                process.start()

    async def _inject(self, target: str, mode: str) -> None:
        """Take the victims down one after the other in random order, keep them down for a
        random moment, then bring them back and wait until the service is whole again.

        Servers come back first, in random order: a process started while a server it needs
        is away exits at once with a one-line message, by design (tests/integration/
        test_infrastructure.py), for its supervisor to start it again."""
        victims = target.split("+")
        api_down = 0.0
        for victim in self.rng.sample(victims, len(victims)):
            if victim == "api":
                api_down = time.monotonic()
            await self._down(victim, mode)
        await asyncio.sleep(self.rng.uniform(0.0, 1.5))  # the length of the outage
        for victim in sorted(victims, key=lambda v: (v in ("api", "projector"), self.rng.random())):
            await self._up(victim)
        if "api" in victims or "kafka" in victims:
            await self.api.wait_ready()  # the writer finds its way back to the broker by itself
        if "api" in victims:
            self.api_outages.append((api_down, time.monotonic()))
        if "projector" in victims:
            await self.projector.wait_connected(self.servers.ports)

    async def _down(self, victim: str, mode: str) -> None:
        kill = mode == "kill -9"
        if victim in ("api", "projector"):
            process = self.api if victim == "api" else self.projector
            if kill:
                await asyncio.to_thread(process.kill)
            else:
                code = await asyncio.to_thread(process.terminate)
                self.graceful_exit_codes.setdefault(process.argv[0], []).append(code)
        elif victim == "kafka":
            kafka = self.servers.kafka
            await self.servers.call(kafka.kill if kill else kafka.terminate)
        else:
            postgres = self.servers.postgres
            await self.servers.call(postgres.kill if kill else self._terminate_postgres)
        self.note(f"{victim} down")

    async def _up(self, victim: str) -> None:
        if victim in ("api", "projector"):
            (self.api if victim == "api" else self.projector).start()
        elif victim == "kafka":
            await self.servers.call(self.servers.kafka.restart)
        else:
            await self.servers.call(self.servers.postgres.restart)
        self.note(f"{victim} up")

    def _terminate_postgres(self) -> None:
        """SIGTERM is PostgreSQL's "smart" shutdown: no new sessions, while pooled ones go on
        for ever. After a moment, as an operator would, ask for the fast shutdown."""
        postgres = self.servers.postgres
        assert postgres.process is not None
        postgres.process.send_signal(signal.SIGTERM)
        try:
            postgres.process.wait(timeout=self.rng.uniform(0.5, 3.0))
        except subprocess.TimeoutExpired:
            postgres.terminate()


# -- the run -----------------------------------------------------------------------------------


@dataclass
class Run:
    servers: Servers
    api: ApiProcess
    projector: ServiceProcess
    topic: str


@pytest.fixture
async def run(servers: Servers, tmp_path: Path) -> AsyncIterator[Run]:
    url = servers.postgres.url()
    engine = create_engine(url)
    try:
        await migrate(engine)
    finally:
        await engine.dispose()
    topic = f"faults.{os.urandom(4).hex()}"
    env = service_env(
        bootstrap=servers.kafka.bootstrap_servers,
        database_url=url,
        topic=topic,
        partitions=PARTITIONS,
        name=topic,
        extra={"ORDERS_CONSISTENCY_WAIT_MS": "1000"},
    )
    api = ApiProcess.create(env, tmp_path / "api.log")
    projector = projector_process(env, tmp_path / "projector.log")
    api.start()
    projector.start()
    try:
        await api.wait_ready()
        await projector.wait_connected(servers.ports)
        yield Run(servers, api, projector, topic)
    finally:
        for process in (api, projector):
            if process.alive:
                await asyncio.to_thread(process.terminate, grace_seconds=30)


async def _load_while(
    workload: Workload, faults: Awaitable[None], *, min_acknowledged: int, timeout: float
) -> Ledger:
    """Run the workload until the faults are over and enough commands were acknowledged."""
    stop = asyncio.Event()
    clients = asyncio.create_task(workload.run(stop))
    try:
        await faults
        deadline = time.monotonic() + timeout
        while workload.ledger.outcomes()["acknowledged"] < min_acknowledged:
            assert time.monotonic() < deadline, "the workload stalled after the faults"
            assert not clients.done(), "the clients ended early"
            await asyncio.sleep(0.2)  # polling interval
    finally:
        stop.set()
    return await clients


def _misplaced_transport_errors(ledger: Ledger, outages: list[tuple[float, float]]) -> list[str]:
    """Requests that got no HTTP answer although the API was not down at the time."""
    return [
        f"{failure.operation}: {failure.kind}"
        for failure in ledger.transport_failures
        if not any(
            failure.started <= end + OUTAGE_SLACK_S and failure.ended >= start - OUTAGE_SLACK_S
            for start, end in outages
        )
    ]


def _figures(
    faults: Faults,
    ledger: Ledger,
    result: Audit,
    mismatches: dict[str, str],
    misplaced: list[str],
    seconds: float,
) -> str:
    statuses = ", ".join(f"{code}: {n}" for code, n in sorted(ledger.statuses.items()))
    kinds = ", ".join(f"{kind}: {n}" for kind, n in sorted(faults.injected.items()))
    recovery = ", ".join(
        f"{target} {max(values):.1f}s" for target, values in sorted(faults.recovery_seconds.items())
    )
    return "\n".join(
        [
            f"faults injected: {sum(faults.injected.values())} ({kinds})",
            f"longest fault + recovery: {recovery}",
            f"graceful exit codes: {faults.graceful_exit_codes}",
            f"processes that died by themselves: {len(faults.unexpected_exits)}",
            f"commands sent: {result.sent} (attempts: {sum(ledger.statuses.values())} answered, "
            f"{len(ledger.transport_failures)} without answer), queries: {ledger.queries}",
            f"acknowledged: {result.acknowledged}, rejected: {result.rejected}, "
            f"unknown outcome: {result.unknown}, never sent: {result.not_sent}, "
            f"unkeyed with an unknown attempt: {result.ambiguous_unkeyed}",
            f"events in the topic: {result.events}; of commands never acknowledged (ack lost): "
            f"{result.ack_lost}; extra events of unkeyed retries: {result.unknown_duplicates}",
            f"lost: {len(result.lost)}, duplicated: {len(result.duplicated)}, "
            f"unasked: {len(result.phantom)}, version gaps/repeats: "
            f"{len(result.version_problems)}",
            f"read-model mismatches: {len(mismatches)} of {len(catalog.PROJECTIONS)} projections",
            f"answers by status: {statuses}",
            f"5xx other than 503 with Retry-After: {len(ledger.violations)}; "
            f"transport errors while the API was up: {len(misplaced)}",
            f"took {seconds:.0f}s",
        ]
    )


def _print_problems(**problems: list[str]) -> None:
    for name, found in problems.items():
        if found:
            print(f"{name} ({len(found)}):\n  " + "\n  ".join(found[:5]))


async def test_random_faults_under_load_lose_nothing_and_double_nothing(run: Run) -> None:
    started = time.monotonic()
    rng = random.Random(f"{SEED}-faults")
    workload = Workload(run.api.base_url, WorkloadConfig(clients=CLIENTS, seed=SEED))
    faults = Faults(run.servers, run.api, run.projector, rng)
    faults.acknowledged = lambda: workload.ledger.outcomes()["acknowledged"]
    ledger = await _load_while(
        workload,
        faults.run(FAULT_ROUNDS),
        min_acknowledged=MIN_ACKNOWLEDGED,
        timeout=max(180.0, MIN_ACKNOWLEDGED / 10),
    )
    faults.check_alive("after the run")

    bootstrap = run.servers.kafka.bootstrap_servers
    still_open = await wait_no_open_transaction(bootstrap, run.topic, PARTITIONS, timeout=30)
    fetched = await read_records(bootstrap, run.topic, PARTITIONS)
    events = decoded(fetched)
    result = audit(ledger, events)
    engine = create_engine(run.servers.postgres.url())
    try:
        behind = await wait_projected(engine, catalog.PROJECTIONS, run.topic, fetched, timeout=180)
        mismatches = await oracle_mismatches(engine, catalog.PROJECTIONS, events)
    finally:
        await engine.dispose()
    misplaced = _misplaced_transport_errors(ledger, faults.api_outages)
    print("\n" + "\n".join(faults.timeline))
    _print_problems(
        lost=result.lost,
        duplicated=result.duplicated,
        unasked=result.phantom,
        versions=result.version_problems,
        read_models=list(mismatches.values()),
        server_errors=ledger.violations,
        transport_errors_while_up=misplaced,
        died_by_themselves=faults.unexpected_exits,
    )
    print(
        "\n" + _figures(faults, ledger, result, mismatches, misplaced, time.monotonic() - started)
    )

    assert faults.injected.total() == (len(TARGETS) * len(MODES) + len(OVERLAPS)) * FAULT_ROUNDS
    assert result.acknowledged >= MIN_ACKNOWLEDGED
    assert result.lost == []
    assert result.duplicated == []
    assert result.phantom == []
    assert result.version_problems == []
    assert still_open == {}, "a transaction was left open in the topic"
    assert behind == [], "the projector did not catch up"
    assert mismatches == {}
    assert ledger.violations == []
    assert misplaced == []
    assert faults.unexpected_exits == []
    assert all(code == 0 for codes in faults.graceful_exit_codes.values() for code in codes), (
        f"a SIGTERM did not end in a clean exit: {faults.graceful_exit_codes}"
    )


# -- a stop while the broker is away ----------------------------------------------------------

STOP_DEADLINE_S = 15.0


async def _until(condition: Callable[[], bool], what: str, task: asyncio.Task[None]) -> None:
    async def check() -> tuple[bool, None]:
        assert not task.done(), f"the runner ended while waiting for {what}: {task!r}"
        return condition(), None

    await eventually(check, what, timeout=60)


async def test_a_stop_during_a_broker_outage_ends_the_projector_without_the_broker(
    servers: Servers,
) -> None:
    """Invariant 8 while Kafka is down: the runner, caught in its informational offset commit
    to Kafka (which never fails during an outage, it keeps looking for the coordinator), still
    stops promptly when told to, with what it applied committed in Postgres."""
    engine = create_engine(servers.postgres.url())
    await migrate(engine)
    bootstrap = servers.kafka.bootstrap_servers
    topic = f"outage.{os.urandom(4).hex()}"
    await new_topic(bootstrap, topic, 2)
    writer = Writer(WriterConfig(kafka=bootstrap, topic=topic, transactional_id=topic))
    await writer.start()
    order_ids = [f"outage-{topic}-{n}" for n in range(5)]
    try:
        for order_id in order_ids:
            create = domain.CreateOrder(
                order_id=order_id, at=datetime.now(UTC), customer_id="c", currency="EUR"
            )
            await writer.submit(CommandRequest(command=create))
    finally:
        await writer.stop()
    config = RunnerConfig(kafka=bootstrap, topic=topic, group_prefix=topic)
    runner = ProjectionRunner([catalog.PROJECTIONS["orders"]], engine, config)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        await _until(lambda: runner.stats.events == len(order_ids), "the events applied", task)
        await servers.call(servers.kafka.kill)
        killed = time.monotonic()
        # The runner has begun an offset commit to the broker that is gone (the moment it
        # would hang in it for good).
        await _until(lambda: runner._last_kafka_commit > killed, "a commit to Kafka", task)
        stop.set()
        done, _ = await asyncio.wait({task}, timeout=STOP_DEADLINE_S)
        assert done, f"the runner did not stop within {STOP_DEADLINE_S}s of the stop"
        task.result()
        async with engine.connect() as connection:
            stored = await connection.scalar(
                sa.text("SELECT count(*) FROM orders WHERE order_id = ANY(:ids)"),
                {"ids": order_ids},
            )
        assert stored == len(order_ids)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await servers.call(servers.kafka.restart)
        await engine.dispose()


# -- the audit itself can fail -------------------------------------------------------------------


def _logged(
    correlation_id: str, order_id: str, version: int, offset: int, key: str | None = None
) -> Applied:
    event = OrderPlaced(total=1, item_count=1)
    sealed = envelope.seal(
        event,
        event_id=f"e-{offset}",
        order_id=order_id,
        version=version,
        occurred_at=datetime.now(UTC),
        command_id=f"command-{offset}",
        correlation_id=correlation_id,
        idempotency_key=key,
    )
    return Applied(sealed, event, 0, offset)


def _acknowledged(correlation_id: str, order_id: str, version: int, offset: int) -> Sent:
    return Sent(
        correlation_id,
        "place",
        "valid",
        "POST",
        "/",
        idempotency_key=None,
        if_match=None,
        statuses=[200],
        outcome="acknowledged",
        order_id=order_id,
        version=version,
        token=(0, offset),
    )


def test_the_audit_finds_lost_doubled_and_unasked_events_and_version_gaps() -> None:
    ledger = Ledger()
    ledger.commands += [
        _acknowledged("kept", "o1", 1, 0),
        _acknowledged("lost", "o1", 2, 1),
        _acknowledged("doubled", "o2", 1, 2),
        Sent("refused", "pay", "valid", "POST", "/", None, None, [409], outcome="rejected"),
    ]
    events = [
        _logged("kept", "o1", 1, 0),
        _logged("doubled", "o2", 1, 2),
        _logged("doubled", "o2", 2, 3),
        _logged("refused", "o3", 1, 4),
        _logged("nobody", "o3", 3, 5),
    ]
    found = audit(ledger, events)
    assert (found.acknowledged, found.rejected) == (3, 1)
    assert len(found.lost) == 1
    assert "lost" in found.lost[0]
    assert len(found.duplicated) == 1
    assert "doubled" in found.duplicated[0]
    assert len(found.phantom) == 2  # the refused command's event, and one nobody sent
    assert [problem.split(":")[0] for problem in found.version_problems] == ["order o3"]
