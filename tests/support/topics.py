"""Events topics for tests, made the way an operator makes them (``orders topic create``'s
code): the API and the projector never create one."""

from __future__ import annotations

from service.infra.embedded.kafka import run_coroutine
from service.infra.kafka_clients import KafkaTarget
from service.infra.topic import create_state_topic, create_topic, state_topic_for


async def new_topic(
    kafka: KafkaTarget, topic: str, partitions: int, *, snapshots: bool = True
) -> None:
    """The events topic and (unless not ``snapshots``) the writer's changelog, as `orders
    topic create` makes both."""
    await create_topic(kafka, topic, partitions=partitions)
    if snapshots:
        await create_state_topic(kafka, state_topic_for(topic), partitions=partitions)


def new_topic_now(kafka: KafkaTarget, topic: str, partitions: int) -> None:
    """``new_topic`` from synchronous code (a fixture, a process's set-up)."""
    run_coroutine(new_topic(kafka, topic, partitions))
