"""SIGTERM under load: the API and the projector stop cleanly, losing and half-doing nothing.

The API and the projector run as ``orders`` processes against the session's broker and
database, with the HTTP workload of ``tests/support/workload.py`` running. Then:

* SIGTERM of the API: it exits with 0; every command it acknowledged (before the signal or
  while finishing the requests in flight) is in the topic exactly once; it left no transaction
  open (a read_committed reader's end, the last stable offset, equals the high watermark).
* SIGTERM of the projector, several times at random moments: it exits with 0, and each
  projection's tables equal the oracle of exactly the events below its checkpoints (its last
  batch went in with its checkpoint, or not at all); restarted, it ends equal to the oracle of
  the whole topic (nothing applied twice).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from projections.checkpoints import wait_for_checkpoint
from projections.models import catalog
from tests.support.processes import (
    ApiProcess,
    ServiceProcess,
    open_transactions,
    projector_process,
    service_env,
    wait_no_open_transaction,
)
from tests.support.projection_harness import decoded, read_records
from tests.support.workload import (
    Audit,
    Workload,
    WorkloadConfig,
    applied_part,
    audit,
    oracle_mismatches,
    wait_projected,
)

pytestmark = pytest.mark.chaos

PARTITIONS = 4
SEED = os.environ.get("CHAOS_SEED", "20261128")
CLIENTS = int(os.environ.get("CHAOS_CLIENTS", "8"))
PROJECTOR_STOPS = int(os.environ.get("CHAOS_PROJECTOR_STOPS", "2"))


@dataclass
class Service:
    api: ApiProcess
    projector: ServiceProcess
    bootstrap: str
    topic: str
    ports: list[int]


@pytest.fixture
async def service(
    engine: AsyncEngine, bootstrap: str, database_url: str, topic: str, tmp_path: Path
) -> AsyncIterator[Service]:
    env = service_env(
        bootstrap=bootstrap,
        database_url=database_url,
        topic=topic,
        partitions=PARTITIONS,
        name=topic,
    )
    api = ApiProcess.create(env, tmp_path / "api.log")
    projector = projector_process(env, tmp_path / "projector.log")
    kafka_port = int(bootstrap.split(",")[0].rpartition(":")[2])
    postgres_port = engine.url.port or 5432
    api.start()
    try:
        await api.wait_ready()
        yield Service(api, projector, bootstrap, topic, [kafka_port, postgres_port])
    finally:
        for process in (api, projector):
            if process.alive:
                await asyncio.to_thread(process.terminate, grace_seconds=30)


async def _until_acknowledged(workload: Workload, count: int, *, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while workload.ledger.outcomes()["acknowledged"] < count:
        assert time.monotonic() < deadline, f"fewer than {count} commands acknowledged"
        await asyncio.sleep(0.05)  # polling interval


async def _until_applying(engine: AsyncEngine, topic: str, workload: Workload) -> None:
    """Wait until every projection has applied a command acknowledged after this call."""
    count = workload.ledger.outcomes()["acknowledged"]
    await _until_acknowledged(workload, count + 1)
    latest = next(
        sent.token
        for sent in reversed(workload.ledger.commands)
        if sent.outcome == "acknowledged" and sent.token is not None
    )
    for name in catalog.PROJECTIONS:
        partition, offset = latest
        assert await wait_for_checkpoint(engine, name, topic, partition, offset, 60), name


def _assert_exactly_once(result: Audit) -> None:
    assert result.lost == []
    assert result.duplicated == []
    assert result.phantom == []
    assert result.version_problems == []


async def test_sigterm_of_the_api_under_load_keeps_every_acknowledged_command(
    service: Service,
) -> None:
    started = time.monotonic()
    workload = Workload(service.api.base_url, WorkloadConfig(clients=CLIENTS, seed=SEED))
    stop = asyncio.Event()
    clients = asyncio.create_task(workload.run(stop))
    await _until_acknowledged(workload, 200)
    acknowledged_before = workload.ledger.outcomes()["acknowledged"]
    signalled = time.monotonic()
    code = await asyncio.to_thread(service.api.terminate)
    stopping_seconds = time.monotonic() - signalled
    stop.set()
    ledger = await clients
    still_open = await open_transactions(service.bootstrap, service.topic, PARTITIONS)
    settled = await wait_no_open_transaction(
        service.bootstrap, service.topic, PARTITIONS, timeout=10
    )

    events = decoded(await read_records(service.bootstrap, service.topic, PARTITIONS))
    result = audit(ledger, events)
    print(
        f"\nSIGTERM of the API: exit code {code} after {stopping_seconds:.1f}s; "
        f"acknowledged before the signal: {acknowledged_before}, in all: {result.acknowledged}; "
        f"events: {result.events}; lost: {len(result.lost)}, duplicated: "
        f"{len(result.duplicated)}; open transactions right after the exit: {still_open}; "
        f"5xx: {ledger.violations[:3]}; took {time.monotonic() - started:.0f}s"
    )
    assert code == 0, service.api.tail()
    _assert_exactly_once(result)
    assert result.acknowledged >= acknowledged_before >= 200
    assert settled == {}, "the API left a transaction open"
    assert ledger.violations == []


async def test_sigterm_of_the_projector_under_load_leaves_whole_batches_only(
    service: Service, engine: AsyncEngine
) -> None:
    started = time.monotonic()
    rng = random.Random(f"{SEED}-graceful-projector")
    workload = Workload(service.api.base_url, WorkloadConfig(clients=CLIENTS, seed=SEED))
    stop = asyncio.Event()
    clients = asyncio.create_task(workload.run(stop))
    partial: list[str] = []
    try:
        for _ in range(PROJECTOR_STOPS):
            phases = [time.monotonic()]
            service.projector.start()
            await service.projector.wait_connected(service.ports)
            phases.append(time.monotonic())
            await _until_applying(engine, service.topic, workload)
            phases.append(time.monotonic())
            await asyncio.sleep(rng.uniform(0.2, 1.5))  # a random moment to stop at
            code = await asyncio.to_thread(service.projector.terminate)
            assert code == 0, service.projector.tail()
            phases.append(time.monotonic())
            partial.append(await _whole_batches_only(engine, service))
            phases.append(time.monotonic())
            timing = "/".join(f"{b - a:.1f}" for a, b in itertools.pairwise(phases))
            partial[-1] += f" (start/apply/stop/check: {timing}s)"
    finally:
        stop.set()
        ledger = await clients
    service.projector.start()
    fetched = await read_records(service.bootstrap, service.topic, PARTITIONS)
    events = decoded(fetched)
    behind = await wait_projected(engine, catalog.PROJECTIONS, service.topic, fetched, timeout=120)
    assert await asyncio.to_thread(service.projector.terminate) == 0
    mismatches = await oracle_mismatches(engine, catalog.PROJECTIONS, events)
    result = audit(ledger, events)
    print(
        "\nSIGTERM of the projector: "
        + "; ".join(partial)
        + f"; then caught up on {len(events)} events: mismatches {len(mismatches)}; "
        f"took {time.monotonic() - started:.0f}s"
    )
    assert behind == []
    assert mismatches == {}
    _assert_exactly_once(result)
    assert ledger.violations == []


async def _whole_batches_only(engine: AsyncEngine, service: Service) -> str:
    """Each projection's tables equal the oracle of exactly the events below its checkpoints."""
    fetched = await read_records(service.bootstrap, service.topic, PARTITIONS)
    total = sum(len(records) for records in fetched.values())
    applied_counts = []
    for name in catalog.PROJECTIONS:
        applied = decoded(await applied_part(engine, name, service.topic, fetched))
        assert applied, f"{name} applied nothing before its SIGTERM: a vacuous check"
        assert await oracle_mismatches(engine, [name], applied) == {}
        applied_counts.append(f"{name} {len(applied)}")
    return f"stopped with {', '.join(applied_counts)} of {total} events applied"
