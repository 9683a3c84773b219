"""Writers as the tests run them: on the test's topic, with a transactional id of their own,
and patient with a busy machine (load shedding has its own tests: test_writer_limits,
test_http_limits)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from service.infra.topic import state_topic_for
from service.write.contract import WriterConfig
from service.write.writer import Writer


def writer_config_for(kafka: str, topic: str, **overrides: Any) -> WriterConfig:
    """A writer's configuration, with its changelog (snapshots) unless ``state_topic=None``."""
    settings: dict[str, Any] = {
        "state_topic": state_topic_for(topic),
        "transactional_id": f"writer-{uuid.uuid4().hex[:8]}",
        "commit_timeout": 10,
        "max_queue_delay": 30,  # a slow batch on a busy machine must not refuse commands
    }
    return WriterConfig(kafka=kafka, topic=topic, **(settings | overrides))


@asynccontextmanager
async def started_writer(kafka: str, topic: str, **overrides: Any) -> AsyncIterator[Writer]:
    """A writer started on ``topic`` (which must exist), stopped when the block ends."""
    writer = Writer(writer_config_for(kafka, topic, **overrides))
    await writer.start()
    try:
        yield writer
    finally:
        await writer.stop()
