"""What the writer takes and gives: its configuration, a command request, the answer to one,
and the refusals a caller can get back (each in a family of ``service.kernel.errors``)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol

from opentelemetry.trace import SpanContext

from service.infra.kafka_clients import KafkaTarget
from service.kernel.access import Actor
from service.kernel.domain import Command
from service.kernel.errors import Conflict, Unavailable

# How long a command's idempotency key stays taken: a request with the same key later than that
# is a new request (a retry is expected within minutes, not days).
DEFAULT_IDEMPOTENCY_TTL = timedelta(hours=24)


@dataclass(frozen=True, kw_only=True)
class WriterConfig:
    kafka: KafkaTarget
    topic: str
    transactional_id: str = "orders-writer"
    allow_deleting_topic: bool = False
    allow_undurable_topic: bool = False
    max_batch: int = 500
    commit_timeout: float = 15.0
    idempotency_ttl: timedelta = DEFAULT_IDEMPOTENCY_TTL
    # The longest a command waits in the queue for its batch to begin (seconds): one that would
    # wait longer is refused at once, one that did is refused then (WriterOverloaded).
    max_queue_delay: float = 0.3
    # The writer's changelog (``service.write.snapshots``): its state per partition, so that a
    # start reads the live orders and the log's tail, not the whole history. None, or a topic
    # that does not exist: the whole log is read at every start.
    state_topic: str | None = None
    # The partitions this writer decides for; None: all of the topic's. Each set of partitions
    # needs its own transactional id (``service.write.ownership`` gives one per partition).
    partitions: frozenset[int] | None = None
    # Transactional ids this writer fences once it holds its own, before it reads: those of
    # writers that split the same partitions another way (``service.write.ownership``).
    fences: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CommandRequest:
    """A command with what the HTTP edge knows about it."""

    command: Command
    expected_version: int | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None
    correlation_id: str | None = None
    # Who sends it, recorded in its events; None when authentication is off. Its idempotency
    # keys are its own: another caller's same key is another key.
    actor: Actor | None = None
    # Set for a caller that may act only for one customer: the order must be that customer's
    # (one of another customer's is "not found", never a hint that it exists;
    # ``service.kernel.access.order_seen_by``).
    owner: str | None = None
    command_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    # The caller's span (its HTTP request's) when tracing is on and it is sampled: the
    # command's producer span is its child, and its records carry the trace on.
    trace: SpanContext | None = None


@dataclass(frozen=True, slots=True)
class Accepted:
    """A committed command: the order's new version and where its last event sits."""

    order_id: str
    version: int
    partition: int
    offset: int
    replayed: bool = False

    def as_replayed(self) -> Accepted:
        """The same answer, given again to a repeated request (``Idempotent-Replayed``)."""
        return Accepted(self.order_id, self.version, self.partition, self.offset, replayed=True)

    @property
    def consistency_token(self) -> str:
        return f"{self.partition}:{self.offset}"


class WriterUnavailable(Unavailable):
    """The writer cannot take commands now (starting, recovering, broker down, or fenced)."""

    def __init__(self, reason: str, *, retry_after: int | None = 1) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class WriterOverloaded(WriterUnavailable):
    """More commands are waiting than the writer decides within ``max_queue_delay``: this one
    was refused before it was decided, so nothing of it is in the log."""

    def __init__(self) -> None:
        super().__init__(
            "the writer is at capacity: the command was not recorded; retry shortly",
            retry_after=1,
        )


class VersionMismatch(Conflict):
    """``If-Match`` named a version the order is no longer (or not yet) at."""

    def __init__(self, expected: int, actual: int) -> None:
        super().__init__(f"the order is at version {actual}, not {expected}")
        self.expected = expected
        self.actual = actual


class IdempotencyKeyReused(Conflict):
    """The same Idempotency-Key came with a different request."""


class WriteSide(Protocol):
    """What the edge uses of the write side: one ``Writer`` over every partition, or an
    instance's share of them (``service.write.ownership.WriterGroup``)."""

    @property
    def partition_count(self) -> int: ...
    @property
    def state_name(self) -> str: ...
    @property
    def ready(self) -> bool: ...
    @property
    def deciding_partitions(self) -> list[int]: ...
    async def submit(self, request: CommandRequest) -> Accepted: ...
