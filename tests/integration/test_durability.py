"""On a cluster of three brokers, the events topic must keep three copies, acknowledge an event
only once two have it, and never elect a leader that missed events: otherwise ``acks=all`` can
mean one copy. A real three-node KRaft cluster, started for this module."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from service.infra.topic import TopicNotDurable, check_topic, create_topic
from service.kernel.domain import CreateOrder
from service.write.contract import CommandRequest, WriterConfig
from service.write.writer import Writer
from tests.support.kafka_cluster import KafkaCluster
from tests.support.projection_harness import eventually


@pytest.fixture(scope="module")
def cluster() -> Iterator[KafkaCluster]:
    started = KafkaCluster()
    started.start()
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
async def bootstrap(cluster: KafkaCluster) -> str:
    """The cluster, once all three brokers have registered."""
    admin = AIOKafkaAdminClient(bootstrap_servers=cluster.bootstrap_servers)
    await admin.start()
    try:

        async def registered() -> tuple[bool, Any]:
            brokers = (await admin.describe_cluster())["brokers"]
            return len(brokers) == 3, brokers

        await eventually(registered, "three brokers in the cluster's metadata")
    finally:
        await admin.close()
    return cluster.bootstrap_servers


async def _made_by_hand(bootstrap: str, replicas: int, config: dict[str, str]) -> str:
    topic = f"hand.{uuid.uuid4().hex[:8]}"
    history = {"retention.ms": "-1", "retention.bytes": "-1"}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 3, replicas, topic_configs=history | config)])
    finally:
        await admin.close()
    return topic


async def test_topic_create_makes_three_copies_two_in_sync_and_the_writer_uses_it(
    bootstrap: str,
) -> None:
    topic = f"durable.{uuid.uuid4().hex[:8]}"
    created = await create_topic(bootstrap, topic, partitions=3)

    facts = created.facts
    assert (facts.brokers, facts.replication_factor, facts.min_in_sync) == (3, 3, 2)
    assert (await check_topic(bootstrap, topic)).topic_id == facts.topic_id
    writer = Writer(WriterConfig(kafka=bootstrap, topic=topic, transactional_id=topic))
    await writer.start()
    try:
        accepted = await writer.submit(
            CommandRequest(
                command=CreateOrder(
                    order_id="o-1", at=datetime.now(UTC), customer_id="c", currency="EUR"
                )
            )
        )
    finally:
        await writer.stop()
    assert accepted.version == 1


@pytest.mark.parametrize(
    ("replicas", "config", "problem"),
    [
        (1, {}, "replication factor 1"),
        (2, {"min.insync.replicas": "2"}, "replication factor 2"),
        (3, {"min.insync.replicas": "1"}, "min.insync.replicas=1"),
        (
            3,
            {"min.insync.replicas": "2", "unclean.leader.election.enable": "true"},
            "unclean.leader.election.enable=true",
        ),
    ],
)
async def test_a_topic_that_could_keep_an_event_on_one_broker_is_refused(
    bootstrap: str, replicas: int, config: dict[str, str], problem: str
) -> None:
    topic = await _made_by_hand(bootstrap, replicas, config)

    with pytest.raises(
        TopicNotDurable, match=rf"not durable on a cluster of 3 brokers \({problem}"
    ):
        await check_topic(bootstrap, topic)
    with pytest.raises(TopicNotDurable, match="ORDERS_ALLOW_UNDURABLE_TOPIC"):
        await create_topic(bootstrap, topic, partitions=3)
    # The operator's override: started, with a warning.
    assert (await check_topic(bootstrap, topic, allow_undurable=True)).replication_factor == (
        replicas
    )
