"""Records a projection cannot apply, written straight to the topic by poison-event tests."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaProducer


def envelope_json(order_id: str, version: int = 1, **fields: Any) -> bytes:
    """An envelope as JSON, with ``fields`` (type, schema_version, data...) as given."""
    command_id = str(uuid.uuid4())
    body = {
        "event_id": str(uuid.uuid4()),
        "order_id": order_id,
        "version": version,
        "occurred_at": datetime.now(UTC).isoformat(),
        "command_id": command_id,
        "correlation_id": command_id,
        **fields,
    }
    return json.dumps(body).encode()


def not_json(order_id: str, version: int = 1) -> bytes:
    """Bytes that are no JSON at all."""
    return b"\x00\x9f{ not json at all, order " + order_id.encode()


def unknown_type(order_id: str, version: int = 1) -> bytes:
    """A well-formed envelope of an event type nobody knows."""
    return envelope_json(order_id, version, type="NoSuchEvent", schema_version=1, data={})


async def produce(bootstrap: str, topic: str, partition: int, value: bytes, key: bytes) -> int:
    """One record written straight to ``partition`` (no writer, no transaction): its offset."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        metadata = await producer.send_and_wait(topic, value=value, key=key, partition=partition)
    finally:
        await producer.stop()
    assert metadata.partition == partition
    return int(metadata.offset)
