"""The service as real OS processes (``orders api``, ``orders projector``), for fault tests.

Each process logs to a file, never a pipe (a full pipe would block it), and dies with the test
(``spawn`` asks Linux to SIGTERM it when its parent dies). Waiting is polling with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from aiokafka import TopicPartition

from service.infra.embedded import free_port, log_tail, spawn, stop_process
from service.infra.eventlog import committed_reader
from tests.support import identity
from tests.support.topics import new_topic_now

POLL_S = 0.1


def service_env(
    *,
    bootstrap: str,
    database_url: str,
    topic: str,
    partitions: int,
    name: str,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The environment of an ``orders`` process: its broker, database, topic (created here, as
    an operator would before the first start) and names."""
    new_topic_now(bootstrap, topic, partitions)
    return {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "DATABASE_URL": database_url,
        "ORDERS_TOPIC": topic,
        "ORDERS_PARTITIONS": str(partitions),
        "ORDERS_TRANSACTIONAL_ID": f"writer-{name}",
        "ORDERS_GROUP_PREFIX": f"group-{name}",
        "ORDERS_PROJECTOR_INSTANCE_ID": f"projector-{name}",
        **identity.environment(),
        **(extra or {}),
    }


@dataclass
class ServiceProcess:
    """One ``orders`` subcommand, started, signalled and restarted by a test."""

    argv: list[str]
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None
    exit_codes: list[int] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        assert not self.alive, "already running"
        self.process = spawn(
            [sys.executable, "-m", "service.edge.cli.main", *self.argv],
            log_file=self.log,
            env=self.env,
        )

    def kill(self) -> int:
        """kill -9, and reap it."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        return self._reaped()

    def terminate(self, *, grace_seconds: float = 60.0) -> int:
        """SIGTERM, wait up to ``grace_seconds`` for a clean exit (then SIGKILL); the exit code."""
        assert self.process is not None
        stop_process(self.process, grace_seconds=grace_seconds)
        return self._reaped()

    def _reaped(self) -> int:
        assert self.process is not None
        code = self.process.wait()
        self.exit_codes.append(code)
        return code

    def tail(self, lines: int = 30) -> str:
        return log_tail(self.log, lines)

    async def wait_connected(self, ports: list[int], *, timeout: float = 90.0) -> float:
        """Poll until the process holds an established connection to each of ``ports``
        (e.g. the broker's and the database's): it is past its start-up checks and serving,
        with its signal handlers in place. Seconds taken."""
        started = time.monotonic()
        deadline = started + timeout
        while True:
            assert self.process is not None
            assert self.alive, f"{self.argv[0]} exited while starting:\n{self.tail()}"
            if set(ports) <= _connected_ports(self.process.pid):
                return time.monotonic() - started
            assert time.monotonic() < deadline, f"{self.argv[0]} never connected:\n{self.tail()}"
            await asyncio.sleep(POLL_S)  # polling interval


def _connected_ports(pid: int) -> set[int]:
    try:
        connections = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return set()
    return {c.raddr.port for c in connections if c.status == "ESTABLISHED" and c.raddr}


@dataclass
class ApiProcess(ServiceProcess):
    """``orders api`` on its own port of 127.0.0.1."""

    port: int = 0

    @classmethod
    def create(cls, env: dict[str, str], log: Path) -> ApiProcess:
        port = free_port()
        return cls(["api", "--port", str(port)], env, log, port=port)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def wait_ready(self, *, timeout: float = 90.0) -> float:
        """Poll ``/health/ready`` until 200 (the writer has loaded the log); seconds taken."""
        started = time.monotonic()
        deadline = started + timeout
        async with httpx.AsyncClient(base_url=self.base_url, timeout=5.0) as client:
            while True:
                assert self.alive, f"orders api exited while starting:\n{self.tail()}"
                try:
                    if (await client.get("/health/ready")).status_code == 200:
                        return time.monotonic() - started
                except httpx.TransportError:
                    pass  # not listening yet
                assert time.monotonic() < deadline, f"orders api not ready:\n{self.tail()}"
                await asyncio.sleep(POLL_S)  # polling interval


def projector_process(env: dict[str, str], log: Path) -> ServiceProcess:
    return ServiceProcess(["projector"], env, log)


async def open_transactions(
    bootstrap: str, topic: str, partitions: int
) -> dict[int, tuple[int, int]]:
    """Partitions whose last stable offset is behind the high watermark: (stable, end)."""
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    ends = {}
    for isolation in ("read_committed", "read_uncommitted"):
        consumer = committed_reader(bootstrap, isolation_level=isolation)
        await consumer.start()
        try:
            ends[isolation] = await consumer.end_offsets(tps)
        finally:
            await consumer.stop()
    stable, end = ends["read_committed"], ends["read_uncommitted"]
    return {tp.partition: (stable[tp], end[tp]) for tp in tps if stable[tp] < end[tp]}


async def wait_no_open_transaction(
    bootstrap: str, topic: str, partitions: int, *, timeout: float
) -> dict[int, tuple[int, int]]:
    """Poll until no transaction holds a partition back; what is still open at the deadline.

    Markers of a transaction that just ended reach the partitions a moment after the
    coordinator answered; a transaction left open stays open until its timeout (a minute).
    """
    deadline = time.monotonic() + timeout
    while True:
        still_open = await open_transactions(bootstrap, topic, partitions)
        if not still_open or time.monotonic() >= deadline:
            return still_open
        await asyncio.sleep(POLL_S)  # polling interval


async def wait_partitions_shared(
    apis: list[ApiProcess], partitions: int, *, timeout: float = 90.0
) -> dict[int, ApiProcess]:
    """Poll every instance's ``/health`` until each partition is decided by exactly one of
    them (the group settled, every writer ready); partition -> its owner."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5.0) as client:
        while True:
            owners: dict[int, list[ApiProcess]] = {}
            for api in apis:
                assert api.alive, f"orders api exited:\n{api.tail()}"
                try:
                    health = (await client.get(f"{api.base_url}/health")).json()
                except httpx.TransportError:
                    continue
                for partition in health.get("partitions") or []:
                    owners.setdefault(partition, []).append(api)
            if sorted(owners) == list(range(partitions)) and all(
                len(held) == 1 for held in owners.values()
            ):
                return {partition: held[0] for partition, held in owners.items()}
            assert time.monotonic() < deadline, f"the partitions never settled: {owners}"
            await asyncio.sleep(POLL_S)  # polling interval


@dataclass(frozen=True)
class Takeover:
    """Partitions taken by an instance, as its log says: the transactional id of the writer,
    and the epoch each id that guards the partition got (the writer's own, and the one it
    fenced: the topic's id and the partition's, ``service.write.ownership``)."""

    at: str
    instance: str
    partition: int
    transactional_id: str
    epochs: dict[str, int]


def takeovers(logs: dict[str, Path]) -> list[Takeover]:
    """Every "took partition" line of the instances' JSON logs, in time order."""
    found = []
    for instance, path in logs.items():
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        for line in lines:
            if '"took partition' not in line:
                continue
            record = json.loads(line)
            found.append(
                Takeover(
                    record["ts"],
                    instance,
                    record["partition"],
                    record["transactional_id"],
                    record["epochs"],
                )
            )
    return sorted(found, key=lambda takeover: takeover.at)


def unfenced_handovers(taken: list[Takeover], partitions: int) -> list[str]:
    """Handovers after which an earlier holder of a partition could still write it: each
    takeover of a partition must hold both of its ids at a higher epoch than the last one."""
    problems = []
    for partition in range(partitions):
        holders = [t for t in taken if t.partition == partition]
        for before, after in itertools.pairwise(holders):
            for tid, epoch in after.epochs.items():
                if epoch <= before.epochs.get(tid, -1):
                    problems.append(f"partition {partition}: {before} then {after}")
    return problems


@contextlib.asynccontextmanager
async def running(
    started: Sequence[ServiceProcess], *, also: Sequence[ServiceProcess] = ()
) -> AsyncIterator[None]:
    """Start ``started`` and wait until its APIs are ready; on exit, SIGTERM every one of them
    and of ``also`` (processes the test starts itself) still alive."""
    for process in started:
        process.start()
    try:
        await asyncio.gather(*(p.wait_ready() for p in started if isinstance(p, ApiProcess)))
        yield
    finally:
        for process in (*started, *also):
            if process.alive:
                await asyncio.to_thread(process.terminate, grace_seconds=30)
