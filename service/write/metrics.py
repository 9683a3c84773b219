"""The writer's Prometheus series (docs/telemetry.md, "API").

Events (commands, batches, transactions) are counted as they happen, once per command or per
batch; the writer's state (queue, orders held, ready or fenced) is read when Prometheus
scrapes, by a collector over one writer that the composition root registers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.kernel.domain import OrderNotFound
from service.kernel.errors import Conflict, DomainError, Unavailable
from service.write.contract import VersionMismatch, WriterOverloaded

COMMANDS = Counter(
    "orders_writer_commands",
    "Commands the writer answered, by command type and outcome",
    ["command", "outcome"],
)
QUEUE_DELAY = Histogram(
    "orders_writer_queue_delay_seconds",
    "Time from a command's submission to the beginning of its batch",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
BATCH_COMMANDS = Histogram(
    "orders_writer_batch_commands",
    "Commands per group-commit batch",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
)
TRANSACTION_SECONDS = Histogram(
    "orders_writer_transaction_duration_seconds",
    "One Kafka transaction of a batch: its records sent and committed",
    buckets=(0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0),
)

STATES = ("starting", "ready", "recovering", "fenced", "stopped")


def outcome_of(answer: BaseException | None, *, replayed: bool = False) -> str:
    """The ``outcome`` label of a command's answer (None: accepted)."""
    match answer:
        case None:
            return "replayed" if replayed else "accepted"
        case OrderNotFound():
            return "not_found"
        case DomainError():
            return "rejected"
        case VersionMismatch():
            return "version_mismatch"
        case Conflict():
            return "conflict"
        case WriterOverloaded():
            return "overloaded"
        case Unavailable():
            return "unavailable"
        case asyncio.CancelledError():
            return "withdrawn"
        case _:
            return "failed"


class ObservedWriter(Protocol):
    """What the collector reads of a writer (``service.write.writer.Writer``)."""

    @property
    def state_name(self) -> str: ...
    @property
    def queue_depth(self) -> int: ...
    @property
    def orders_held(self) -> int: ...
    @property
    def idempotency_keys_held(self) -> int: ...

    @property
    def load_seconds(self) -> float: ...
    @property
    def loaded_events(self) -> int: ...


class WriterCollector(Collector):
    """The writer's state, read at scrape time."""

    def __init__(self, writer: ObservedWriter) -> None:
        self._writer = writer

    def collect(self) -> Iterator[GaugeMetricFamily]:
        writer = self._writer
        state = GaugeMetricFamily(
            "orders_writer_state", "1 for the writer's current state", labels=["state"]
        )
        for name in STATES:
            state.add_metric([name], 1.0 if writer.state_name == name else 0.0)
        yield state
        yield GaugeMetricFamily(
            "orders_writer_queue_depth",
            "Commands waiting for a batch",
            value=writer.queue_depth,
        )
        yield GaugeMetricFamily(
            "orders_writer_state_rebuild_seconds",
            "How long the last rebuild of the writer's state from the log took",
            value=writer.load_seconds,
        )
        yield GaugeMetricFamily(
            "orders_writer_state_rebuild_events",
            "Events the last rebuild of the writer's state read",
            value=writer.loaded_events,
        )
        yield GaugeMetricFamily(
            "orders_writer_orders", "Orders held in memory", value=writer.orders_held
        )
        yield GaugeMetricFamily(
            "orders_writer_idempotency_keys",
            "Idempotency keys held in memory",
            value=writer.idempotency_keys_held,
        )
