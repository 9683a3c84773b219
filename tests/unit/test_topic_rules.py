"""What a topic must be, and what tells a topic from another of the same name (pure)."""

from __future__ import annotations

import uuid

from projections.identity import replaced
from projections.models import catalog
from projections.projection import Target
from service.infra.topic import (
    PartitionReplicas,
    TopicDescription,
    durability_problems,
    history_problems,
    min_in_sync_for,
)

KEEPS = {"retention.ms": "-1", "retention.bytes": "-1", "cleanup.policy": "delete"}


def _described(replicas: int, brokers: int) -> TopicDescription:
    copies = tuple(range(replicas))
    partitions = tuple(PartitionReplicas(p, copies, copies) for p in range(3))
    return TopicDescription("t", uuid.uuid4(), partitions, brokers)


def test_a_topic_keeps_history_only_without_retention_limits_or_compaction() -> None:
    assert history_problems(KEEPS) == []
    assert history_problems({**KEEPS, "retention.ms": "604800000"}) == ["retention.ms=604800000"]
    assert history_problems({**KEEPS, "cleanup.policy": "compact,delete"}) == [
        "cleanup.policy=compact,delete"
    ]
    assert history_problems({**KEEPS, "retention.bytes": "1"}) == ["retention.bytes=1"]


def test_on_three_brokers_a_topic_needs_three_copies_two_in_sync_and_no_unclean_election() -> None:
    durable = {"min.insync.replicas": "2", "unclean.leader.election.enable": "false"}
    assert durability_problems(_described(3, brokers=3), durable) == []
    assert durability_problems(_described(1, brokers=3), durable) == ["replication factor 1"]
    assert durability_problems(_described(3, brokers=5), {"min.insync.replicas": "1"}) == [
        "min.insync.replicas=1"
    ]
    unclean = {**durable, "unclean.leader.election.enable": "true"}
    assert durability_problems(_described(3, brokers=3), unclean) == [
        "unclean.leader.election.enable=true"
    ]


def test_a_smaller_cluster_cannot_do_better_and_is_not_refused() -> None:
    assert durability_problems(_described(1, brokers=1), {"min.insync.replicas": "1"}) == []
    assert durability_problems(_described(2, brokers=2), {"min.insync.replicas": "1"}) == []


def test_a_new_topic_acknowledges_with_two_copies_once_it_has_three() -> None:
    assert [min_in_sync_for(n) for n in (1, 2, 3, 5)] == [1, 1, 2, 2]


def test_another_topic_id_or_a_checkpoint_past_the_end_means_the_topic_was_replaced() -> None:
    topic_id = uuid.uuid4()
    orders = Target(catalog.PROJECTIONS["orders"], 1)
    history = Target(catalog.PROJECTIONS["order_history"], 2)
    same = {orders: topic_id, history: topic_id}

    assert replaced("t", topic_id, same, {0: 10, 1: 4}, {0: 10, 1: 7}) is None
    assert replaced("t", topic_id, same, {}, {}) is None  # nothing applied yet

    other = replaced("t", topic_id, {**same, history: uuid.uuid4()}, {0: 1}, {0: 5})
    assert other is not None
    assert "order_history v2 began on another topic" in str(other)
    assert "orders v1" not in str(other)

    truncated = replaced("t", topic_id, same, {0: 11, 1: 3}, {0: 10, 1: 7})
    assert truncated is not None
    assert "beyond the end of partition(s) 0" in str(truncated)
    assert "orders projections rebuild all" in str(truncated)
