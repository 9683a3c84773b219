"""Several ``orders api`` instances on one topic (service.write.ownership): they share its
partitions, each decides only for its own, and any of them answers any command, forwarding it
to the partition's owner (service.edge.http.forwarding), with the owner's answer, byte for byte.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from service.infra.eventlog import partition_for
from tests.support.identity import BACK_OFFICE, bearer
from tests.support.processes import (
    ApiProcess,
    projector_process,
    running,
    service_env,
    takeovers,
    unfenced_handovers,
    wait_partitions_shared,
)

PARTITIONS = 6
# What an answer is made of, for a client: a forwarded one must not differ in any of these.
ANSWER_HEADERS = ("content-type", "etag", "x-consistency-token", "location", "retry-after")


@dataclass
class Cluster:
    apis: list[ApiProcess]
    logs: dict[str, Path]
    env: dict[str, str]


@pytest.fixture
async def cluster(
    engine: AsyncEngine, bootstrap: str, database_url: str, topic: str, tmp_path: Path
) -> AsyncIterator[Cluster]:
    env = service_env(
        bootstrap=bootstrap,
        database_url=database_url,
        topic=topic,
        partitions=PARTITIONS,
        name=topic,
    )
    apis = [ApiProcess.create(env, tmp_path / f"api-{i}.log") for i in range(3)]
    projector = projector_process(env, tmp_path / "projector.log")
    async with running([*apis, projector]):
        yield Cluster(apis, {f"api-{i}": api.log for i, api in enumerate(apis)}, env)


def _answer(response: httpx.Response) -> tuple[int, bytes, tuple[str | None, ...]]:
    return (
        response.status_code,
        response.content,
        tuple(response.headers.get(name) for name in ANSWER_HEADERS),
    )


def _elsewhere(owners: dict[int, ApiProcess], order_id: str) -> tuple[ApiProcess, ApiProcess]:
    """The owner of the order's partition, and an instance that is not."""
    owner = owners[partition_for(order_id.encode(), PARTITIONS)]
    other = next(api for api in owners.values() if api is not owner)
    return owner, other


async def test_three_instances_share_the_partitions_and_any_of_them_answers_as_the_owner(
    cluster: Cluster,
) -> None:
    owners = await wait_partitions_shared(cluster.apis, PARTITIONS)
    assert {api.port for api in owners.values()} == {api.port for api in cluster.apis}
    async with httpx.AsyncClient(headers=bearer(BACK_OFFICE), timeout=30) as http:
        # A create retried on every instance: one order, and the same answer from each.
        key = uuid.uuid4().hex
        body = {"customer_id": "c-1", "currency": "EUR"}
        created = [
            await http.post(
                f"{api.base_url}/orders",
                json=body,
                headers={"Idempotency-Key": key, "X-Correlation-Id": "create-1"},
            )
            for api in cluster.apis
        ]
        assert created[0].status_code == 201, created[0].text
        assert {_answer(response) for response in created} == {_answer(created[0])}
        order_id = created[0].json()["order_id"]
        owner, other = _elsewhere(owners, order_id)

        # A command first sent to a non-owner (forwarded), replayed on the owner (direct) and
        # on the third instance: byte-identical.
        item = {"sku": "sku-1", "name": "Tea", "quantity": 2, "unit_price": 450}
        key = uuid.uuid4().hex
        path = f"/orders/{order_id}/items"
        headers = {"Idempotency-Key": key, "If-Match": '"1"', "X-Correlation-Id": "add-1"}
        forwarded = await http.post(f"{other.base_url}{path}", json=item, headers=headers)
        assert forwarded.status_code == 200, forwarded.text
        replays = [
            await http.post(f"{api.base_url}{path}", json=item, headers=headers)
            for api in cluster.apis
        ]
        assert {_answer(response) for response in replays} == {_answer(forwarded)}
        assert forwarded.json()["version"] == 2

        # A refusal, direct and forwarded (the same stale If-Match): the same problem.
        stale = {"If-Match": '"1"', "X-Correlation-Id": "stale-1"}
        refusals = [
            await http.post(f"{api.base_url}/orders/{order_id}/place", headers=stale)
            for api in (owner, other)
        ]
        assert refusals[0].status_code == 412, refusals[0].text
        assert _answer(refusals[1]) == _answer(refusals[0])

        # Commands racing with one If-Match through all three instances: exactly one wins.
        racing = [
            http.post(
                f"{cluster.apis[i % 3].base_url}/orders/{order_id}/items",
                json={**item, "sku": f"race-{i}"},
                headers={"If-Match": '"2"'},
            )
            for i in range(30)
        ]
        statuses = sorted(response.status_code for response in await asyncio.gather(*racing))
        assert statuses == [200] + [412] * 29, statuses

        # Queries answer on every instance, up to the forwarded command's consistency token.
        token = {"X-Consistency-Token": forwarded.headers["x-consistency-token"]}
        for api in cluster.apis:
            seen = await http.get(f"{api.base_url}/orders/{order_id}", headers=token)
            assert seen.status_code == 200, seen.text
            assert seen.json()["version"] >= 2


async def test_a_partition_that_moves_is_fenced_by_its_new_owner(cluster: Cluster) -> None:
    owners = await wait_partitions_shared(cluster.apis, PARTITIONS)
    leaving = cluster.apis[0]
    moved = sorted(p for p, api in owners.items() if api is leaving)
    assert moved, "the first instance owns no partition"
    assert await asyncio.to_thread(leaving.terminate, grace_seconds=30) == 0
    staying = cluster.apis[1:]
    owners = await wait_partitions_shared(staying, PARTITIONS)
    async with httpx.AsyncClient(headers=bearer(BACK_OFFICE), timeout=30) as http:
        for _ in range(12):  # orders in every partition, through one instance
            created = await http.post(
                f"{staying[0].base_url}/orders",
                json={"customer_id": "c-1", "currency": "EUR"},
                headers={"Idempotency-Key": uuid.uuid4().hex},
            )
            assert created.status_code == 201, created.text

    taken = takeovers(cluster.logs)
    assert unfenced_handovers(taken, PARTITIONS) == []
    prefix = f"{cluster.env['ORDERS_TRANSACTIONAL_ID']}-{cluster.env['ORDERS_TOPIC']}"
    for partition in range(PARTITIONS):
        holders = [t for t in taken if t.partition == partition]
        assert {t.transactional_id for t in holders} <= {prefix, f"{prefix}-{partition}"}
        assert set(holders[-1].epochs) == {prefix, f"{prefix}-{partition}"}
    for partition in moved:
        holders_ = [t.instance for t in taken if t.partition == partition]
        # Another instance may have held it before the three settled; api-0 did, then not.
        assert "api-0" in holders_, (partition, holders_)
        assert holders_[-1] != "api-0", (partition, holders_)


async def test_one_instance_writes_every_partition_in_one_and_splits_when_another_joins(
    engine: AsyncEngine, bootstrap: str, database_url: str, topic: str, tmp_path: Path
) -> None:
    env = service_env(
        bootstrap=bootstrap,
        database_url=database_url,
        topic=topic,
        partitions=PARTITIONS,
        name=topic,
    )
    first, second = (ApiProcess.create(env, tmp_path / f"api-{i}.log") for i in range(2))
    logs = {"api-0": first.log, "api-1": second.log}
    prefix = f"{env['ORDERS_TRANSACTIONAL_ID']}-{env['ORDERS_TOPIC']}"

    async def create_orders(http: httpx.AsyncClient, via: ApiProcess) -> None:
        for _ in range(12):
            created = await http.post(
                f"{via.base_url}/orders",
                json={"customer_id": "c-1", "currency": "EUR"},
                headers={"Idempotency-Key": uuid.uuid4().hex},
            )
            assert created.status_code == 201, created.text

    async with running([first], also=[second]):
        async with httpx.AsyncClient(headers=bearer(BACK_OFFICE), timeout=30) as http:
            await create_orders(http, first)
            # Alone, it owns every partition with ONE writer: the topic's transactional id.
            assert {t.transactional_id for t in takeovers(logs)} == {prefix}
            second.start()
            await second.wait_ready()
            await wait_partitions_shared([first, second], PARTITIONS)
            await create_orders(http, second)
            split = takeovers(logs)
            assert {t.transactional_id for t in split[PARTITIONS:]} == {
                f"{prefix}-{p}" for p in range(PARTITIONS)
            }
            assert await asyncio.to_thread(second.terminate, grace_seconds=30) == 0
            await wait_partitions_shared([first], PARTITIONS)
            await create_orders(http, first)
        taken = takeovers(logs)
        assert taken[-1].transactional_id == prefix  # alone again: one writer again
        assert unfenced_handovers(taken, PARTITIONS) == []
