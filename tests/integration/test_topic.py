"""The events topic as users' clusters have it.

A stock broker (``auto.create.topics.enable=true``) creates any topic a metadata request
names, with its own defaults (7-day retention): the API and the projector must never make it
do that, and ``orders topic create`` is the only way a topic comes to be. A topic deleted and
created again under the same name is another topic: checkpoints of the old one must neither
be resumed from nor count as proof that an event of the new one was applied.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.metadata import MetadataRequest
from sqlalchemy.ext.asyncio import AsyncEngine

from projections.identity import TopicReplaced
from projections.models import catalog
from service.edge.http.app import Resources, create_app
from service.infra import topic as topics
from service.infra.embedded import free_port
from service.infra.embedded.kafka import LocalKafka
from service.infra.kafka_clients import client_options
from service.infra.topic import TopicWouldLoseHistory, create_topic, describe_topic
from service.write.contract import WriterConfig
from service.write.writer import Writer
from tests.support.cli import OrdersCli
from tests.support.http import serve
from tests.support.identity import access
from tests.support.lifecycles import write_orders
from tests.support.projection_harness import (
    assert_tables_equal_oracle,
    decoded,
    ends_of,
    eventually,
    read_records,
    runner_for,
    running,
    wait_caught_up,
)
from tests.support.topics import new_topic

ALL = list(catalog.PROJECTIONS)
PARTITIONS = 2


@pytest.fixture(scope="module")
def stock() -> Iterator[LocalKafka]:
    """A broker with the shipped defaults: it creates the topics metadata requests name."""
    kafka = LocalKafka(stock=True)
    kafka.start()
    try:
        yield kafka
    finally:
        kafka.stop()


async def _topic_config(bootstrap: str, topic: str) -> dict[str, str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        response = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        await admin.close()
    entries = response[0].to_object()["resources"][0]["config_entries"]
    return {entry["config_names"]: entry["config_value"] for entry in entries}


async def _topic_names(bootstrap: str) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        names: list[str] = await admin.list_topics()
        return names
    finally:
        await admin.close()


async def _metadata_request(
    bootstrap: str, topic: str, *, allow_auto_topic_creation: bool | None = None
) -> None:
    """The metadata request of a Kafka client that names ``topic`` (what any producer sends
    before its first record), with the flag as given; aiokafka's own says true."""
    client = AIOKafkaClient(**client_options(bootstrap))  # as the service makes its clients
    await client.bootstrap()
    try:
        await client.send(
            client.get_random_node(), MetadataRequest([topic], allow_auto_topic_creation)
        )
    finally:
        await client.close()


async def _auto_created(bootstrap: str, topic: str) -> None:
    """Wait until the broker has finished creating ``topic`` (its configuration readable)."""

    async def configured() -> tuple[bool, Any]:
        try:
            config = await _topic_config(bootstrap, topic)
        except Exception as error:  # not there yet
            return False, repr(error)
        return "retention.ms" in config, config

    await eventually(configured, f"the broker to create {topic}")


def _last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


async def test_on_a_stock_broker_the_api_and_projector_refuse_a_missing_topic_and_never_create_it(
    stock: LocalKafka, database_url: str
) -> None:
    topic = f"stock.missing.{uuid.uuid4().hex[:8]}"
    cli = OrdersCli(stock.bootstrap_servers, database_url, topic)
    for command in (["api", "--port", str(free_port())], ["projector"], ["events", "tail"]):
        code, _, err = await cli.run(*command)
        assert code != 0, f"orders {command[0]} started without its topic"
        assert "Traceback" not in err, err
        assert f"no topic {topic}" in _last_line(err), err
        assert "orders topic create" in _last_line(err), err
    assert topic not in await _topic_names(stock.bootstrap_servers)


async def test_topic_create_makes_a_topic_that_keeps_history_and_checks_it_the_next_time(
    stock: LocalKafka, database_url: str
) -> None:
    topic = f"stock.made.{uuid.uuid4().hex[:8]}"
    cli = OrdersCli(stock.bootstrap_servers, database_url, topic)

    code, out, err = await cli.run("topic", "create", "--partitions", "3")
    assert code == 0, err
    assert f"created topic {topic}: 3 partitions, replication factor 1" in out
    config = await _topic_config(stock.bootstrap_servers, topic)
    assert (config["retention.ms"], config["retention.bytes"]) == ("-1", "-1")
    assert config["cleanup.policy"] == "delete"
    assert config["min.insync.replicas"] == "1"  # one broker: one copy is all there is
    assert f"created topic {topic}.writer-state: the writer's snapshots (compacted)" in out
    state = await _topic_config(stock.bootstrap_servers, f"{topic}.writer-state")
    assert state["cleanup.policy"] == "compact"

    code, out, err = await cli.run("topic", "create", "--partitions", "5")
    assert code == 0, err
    assert f"checked topic {topic}: 3 partitions" in out
    assert "existed already with 3 partitions, not 5" in out
    assert f"checked topic {topic}.writer-state" in out


async def test_a_topic_the_broker_created_by_itself_is_refused_not_taken_for_ours(
    stock: LocalKafka, database_url: str
) -> None:
    """What a client of a stock broker gets when it produces to a topic nobody created."""
    topic = f"stock.auto.{uuid.uuid4().hex[:8]}"
    await _metadata_request(stock.bootstrap_servers, topic, allow_auto_topic_creation=True)
    await _auto_created(stock.bootstrap_servers, topic)
    assert (await _topic_config(stock.bootstrap_servers, topic))["retention.ms"] == "604800000"
    cli = OrdersCli(stock.bootstrap_servers, database_url, topic)

    code, out, err = await cli.run("topic", "create")
    assert code != 0
    assert "created" not in out
    assert "would lose history (retention.ms=604800000)" in _last_line(err), err

    code, _, err = await cli.run("api", "--port", str(free_port()))
    assert code != 0
    assert "would lose history" in _last_line(err), err


async def test_a_topic_that_appears_between_the_look_and_the_create_is_checked_not_reported_created(
    stock: LocalKafka, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CreateTopics answering TOPIC_ALREADY_EXISTS (someone, or the broker, was first)."""
    topic = f"stock.race.{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=stock.bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, 1, 1, topic_configs={"retention.ms": "86400000"})]
        )
    finally:
        await admin.close()
    looks: list[str] = []
    real_describe = topics.describe_topic

    async def first_look_finds_nothing(admin: Any, name: str) -> Any:
        looks.append(name)
        return None if len(looks) == 1 else await real_describe(admin, name)

    monkeypatch.setattr(topics, "describe_topic", first_look_finds_nothing)

    with pytest.raises(TopicWouldLoseHistory, match=r"retention.ms=86400000"):
        await create_topic(stock.bootstrap_servers, topic, partitions=4)
    assert len(looks) >= 2, "the answer to CreateTopics was not checked again"

    monkeypatch.setattr(topics, "describe_topic", real_describe)
    fine = f"stock.race.ok.{uuid.uuid4().hex[:8]}"
    await create_topic(stock.bootstrap_servers, fine, partitions=1)
    looks.clear()
    monkeypatch.setattr(topics, "describe_topic", first_look_finds_nothing)
    again = await create_topic(stock.bootstrap_servers, fine, partitions=1)
    assert not again.created


async def test_the_service_s_kafka_clients_never_ask_a_stock_broker_to_create_a_topic(
    stock: LocalKafka,
) -> None:
    """A producer or consumer refreshing the metadata of a topic that was deleted asks for it
    by name; aiokafka asks with auto-creation allowed, unless the service says otherwise."""
    topic = f"stock.refresh.{uuid.uuid4().hex[:8]}"
    await _metadata_request(stock.bootstrap_servers, topic)  # as the service's clients ask
    # The broker creates topics asynchronously: one asked for later, with auto-creation
    # allowed, shows when the first would have been created.
    control = f"{topic}.control"
    await _metadata_request(stock.bootstrap_servers, control, allow_auto_topic_creation=True)
    await _auto_created(stock.bootstrap_servers, control)

    assert topic not in await _topic_names(stock.bootstrap_servers)


# -- a topic deleted and created again ---------------------------------------------------------


@pytest.fixture
async def writers(bootstrap: str) -> AsyncIterator[list[Writer]]:
    """Writers a test starts; stopped after it."""
    started: list[Writer] = []
    yield started
    for writer in started:
        await writer.stop()


async def _writer(bootstrap: str, topic: str, started: list[Writer]) -> Writer:
    writer = Writer(
        WriterConfig(kafka=bootstrap, topic=topic, transactional_id=f"w-{uuid.uuid4().hex[:8]}")
    )
    await writer.start()
    started.append(writer)
    return writer


async def _recreate(bootstrap: str, topic: str) -> uuid.UUID:
    """Delete ``topic``, then create it again; returns the new one's id."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        before = await describe_topic(admin, topic)
        assert before is not None
        await admin.delete_topics([topic])

        async def gone() -> tuple[bool, Any]:
            return await describe_topic(admin, topic) is None, topic

        await eventually(gone, f"topic {topic} to be deleted")
    finally:
        await admin.close()
    created = await create_topic(bootstrap, topic, partitions=PARTITIONS)
    assert created.created
    assert created.facts.topic_id != before.topic_id
    return created.facts.topic_id


async def test_a_topic_deleted_and_created_again_is_noticed_and_a_rebuild_recovers(
    db: AsyncEngine,
    bootstrap: str,
    database_url: str,
    group_prefix: str,
    writers: list[Writer],
) -> None:
    topic = f"test.recreated.{uuid.uuid4().hex[:8]}"
    await new_topic(bootstrap, topic, PARTITIONS)
    old = await write_orders(
        await _writer(bootstrap, topic, writers), [f"old-{n}" for n in range(12)]
    )
    async with running(db, bootstrap, topic, group_prefix, ALL) as projector:
        await wait_caught_up(
            db, topic, ALL, ends_of((a.partition, a.offset) for a in old), alive=projector
        )
    for writer in writers:
        await writer.stop()
    writers.clear()

    topic_id = await _recreate(bootstrap, topic)
    new = await write_orders(await _writer(bootstrap, topic, writers), ["new-0", "new-1"])
    created = next(a for a in new if a.order_id == "new-0" and a.version == 1)

    # Queries: the old checkpoints (far past the new offsets) prove nothing about the new topic.
    app = create_app(
        Resources(
            engine=db,
            topic=topic,
            topic_id=topic_id,
            partitions=PARTITIONS,
            consistency_wait_ms=300,
        ),
        access=access(),
    )
    async with serve(app) as client:
        answer = await client.get(
            "/orders/new-0", headers={"X-Consistency-Token": created.consistency_token}
        )
    assert answer.status_code == 503, answer.text

    # The projector refuses to go on from them.
    runner = runner_for(ALL, db, bootstrap, topic, group_prefix)
    with pytest.raises(TopicReplaced, match=r"deleted and recreated, or truncated: rebuild"):
        await asyncio.wait_for(runner.run(asyncio.Event()), 60)

    # The status says so, and what to do.
    cli = OrdersCli(bootstrap, database_url, topic, group_prefix)
    code, out, err = await cli.run("projections", "status", "--json")
    assert code == 0, err
    states = {v["projection"]: v["state"] for v in json.loads(out)["projections"]}
    assert states == dict.fromkeys(ALL, "topic replaced")
    code, out, err = await cli.run("projections", "status")
    assert "orders projections rebuild all" in out

    # The documented way out.
    code, out, err = await cli.run("projections", "rebuild", "all")
    assert code == 0, out + err

    async with running(db, bootstrap, topic, group_prefix, ALL) as projector:
        await wait_caught_up(
            db, topic, ALL, ends_of((a.partition, a.offset) for a in new), alive=projector
        )
    async with serve(app) as client:
        answer = await client.get(
            "/orders/new-0", headers={"X-Consistency-Token": created.consistency_token}
        )
    assert answer.status_code == 200, answer.text
    events = decoded(await read_records(bootstrap, topic, PARTITIONS))
    assert {e.envelope.order_id for e in events} == {"new-0", "new-1"}
    await assert_tables_equal_oracle(db, ALL, events)
