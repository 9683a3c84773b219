"""Three API instances and the projector under a seeded workload, while instances are killed
(SIGKILL), stopped (SIGTERM) and started again at random moments, and a fourth joins mid-load.

The clients reach the instances at random, as behind a load balancer that drops an instance
from its list when it goes down and adds it back once it is ready: a command goes to any
instance, its retries often to another, and racing ``If-Match`` commands for one order
(``WorkloadConfig.race_share``) come through different instances. Afterwards:

1. every acknowledged command is in the topic exactly once, nothing unasked is there, versions
   are gapless per order (so every If-Match race had exactly one winner);
2. every takeover of a partition holds both transactional ids that guard it (the topic's, for an
   instance that owns every partition, and the partition's own) at a higher epoch than the
   takeover before: each handover fenced the last owner (``service.write.ownership``);
3. no 5xx but 503 with Retry-After; the read models equal the oracle fold of the topic.

Sizes: ``CHAOS_SEED``, ``CHAOS_CLIENTS``, ``CHAOS_INSTANCE_FAULTS``. Run with ``-s`` for the
figures.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from projections.models import catalog
from tests.support.processes import (
    ApiProcess,
    ServiceProcess,
    projector_process,
    running,
    service_env,
    takeovers,
    unfenced_handovers,
    wait_no_open_transaction,
    wait_partitions_shared,
)
from tests.support.projection_harness import decoded, read_records
from tests.support.workload import (
    Workload,
    WorkloadConfig,
    audit,
    oracle_mismatches,
    wait_projected,
)

pytestmark = pytest.mark.chaos

PARTITIONS = 6
SEED = os.environ.get("CHAOS_SEED", "20261128")
CLIENTS = int(os.environ.get("CHAOS_CLIENTS", "12"))
FAULTS = int(os.environ.get("CHAOS_INSTANCE_FAULTS", "4"))
# Acknowledged commands between two faults: the load goes on through each handover.
PROGRESS = 150


@dataclass
class Instances:
    apis: list[ApiProcess]
    joiner: ApiProcess  # starts mid-load
    projector: ServiceProcess
    topic: str
    timeline: list[str] = field(default_factory=list)

    @property
    def logs(self) -> dict[str, Path]:
        return {f"api-{i}": api.log for i, api in enumerate([*self.apis, self.joiner])}


@pytest.fixture
async def instances(
    engine: AsyncEngine, bootstrap: str, database_url: str, topic: str, tmp_path: Path
) -> AsyncIterator[Instances]:
    env = service_env(
        bootstrap=bootstrap,
        database_url=database_url,
        topic=topic,
        partitions=PARTITIONS,
        name=topic,
        extra={"ORDERS_CONSISTENCY_WAIT_MS": "1000"},
    )
    apis = [ApiProcess.create(env, tmp_path / f"api-{i}.log") for i in range(4)]
    projector = projector_process(env, tmp_path / "projector.log")
    async with running([*apis[:3], projector], also=apis[3:]):
        yield Instances(apis[:3], apis[3], projector, topic)


async def _progress(workload: Workload, count: int, *, timeout: float = 120) -> None:
    """Wait until ``count`` more commands are acknowledged."""
    target = workload.ledger.outcomes()["acknowledged"] + count
    deadline = time.monotonic() + timeout
    while workload.ledger.outcomes()["acknowledged"] < target:
        assert time.monotonic() < deadline, f"fewer than {count} commands acknowledged"
        await asyncio.sleep(0.1)  # polling interval


async def _faults(cluster: Instances, workload: Workload, rng: random.Random) -> None:
    started = time.monotonic()

    def note(what: str) -> None:
        cluster.timeline.append(f"{time.monotonic() - started:6.1f}s {what}")

    for round_ in range(FAULTS):
        await _progress(workload, PROGRESS)
        if round_ == 1:
            cluster.joiner.start()
            await cluster.joiner.wait_ready()
            workload.instances.append(cluster.joiner.base_url)
            note(f"a new instance joined on port {cluster.joiner.port}")
            await _progress(workload, PROGRESS)
        running = [api for api in (*cluster.apis, cluster.joiner) if api.alive]
        victim = rng.choice(running)
        workload.instances.remove(victim.base_url)
        if rng.random() < 0.5:
            await asyncio.to_thread(victim.kill)
            note(f"kill -9 of the instance on port {victim.port}")
        else:
            code = await asyncio.to_thread(victim.terminate, grace_seconds=30)
            note(f"SIGTERM of the instance on port {victim.port}: exit code {code}")
            assert code == 0, victim.tail()
        await _progress(workload, PROGRESS)
        victim.start()
        await victim.wait_ready()
        workload.instances.append(victim.base_url)
        note(f"the instance on port {victim.port} is back")


async def test_instances_killed_stopped_and_joining_under_load_lose_and_double_nothing(
    instances: Instances, bootstrap: str, engine: AsyncEngine
) -> None:
    rng = random.Random(f"{SEED}-scale-out")
    urls = [api.base_url for api in instances.apis]
    workload = Workload(
        urls[0], WorkloadConfig(clients=CLIENTS, seed=SEED, race_share=0.2), instances=urls
    )
    stop = asyncio.Event()
    clients = asyncio.create_task(workload.run(stop))
    try:
        await _faults(instances, workload, rng)
        await _progress(workload, PROGRESS)
    finally:
        stop.set()
    ledger = await clients
    running = [api for api in (*instances.apis, instances.joiner) if api.alive]
    await wait_partitions_shared(running, PARTITIONS)

    still_open = await wait_no_open_transaction(bootstrap, instances.topic, PARTITIONS, timeout=30)
    fetched = await read_records(bootstrap, instances.topic, PARTITIONS)
    events = decoded(fetched)
    result = audit(ledger, events)
    behind = await wait_projected(
        engine, catalog.PROJECTIONS, instances.topic, fetched, timeout=180
    )
    mismatches = await oracle_mismatches(engine, catalog.PROJECTIONS, events)
    taken = takeovers(instances.logs)
    unfenced = unfenced_handovers(taken, PARTITIONS)
    outcomes = ledger.outcomes()
    print("\n" + "\n".join(instances.timeline))
    print(
        f"acknowledged: {outcomes['acknowledged']}, rejected: {result.rejected}, unknown: "
        f"{result.unknown}; answers by status: {dict(sorted(ledger.statuses.items()))}; "
        f"partition takeovers: {len(taken)}; lost {len(result.lost)}, duplicated "
        f"{len(result.duplicated)}, unasked {len(result.phantom)}, version problems "
        f"{len(result.version_problems)}, read-model mismatches {len(mismatches)}"
    )

    assert len(instances.timeline) == FAULTS + 1 + FAULTS  # faults, the join, the returns
    assert len(taken) > PARTITIONS, "no partition ever moved"
    assert unfenced == [], "a partition was taken without fencing the last owner"
    assert result.lost == []
    assert result.duplicated == []
    assert result.phantom == []
    assert result.version_problems == []
    assert still_open == {}
    assert behind == []
    assert mismatches == {}
    assert ledger.violations == []
