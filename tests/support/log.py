"""Reading the events topic back in tests, and the oracle built from it."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from aiokafka import ConsumerRecord

from projections.projection import Applied
from service.infra.eventlog import read_to_end
from service.kernel import envelope
from service.kernel.domain import Order, fold, settled
from service.kernel.events import DomainEvent


@dataclass(frozen=True)
class LoggedEvent:
    record: ConsumerRecord[bytes, bytes]
    envelope: envelope.Envelope
    event: DomainEvent

    def applied(self) -> Applied:
        return Applied(self.envelope, self.event, self.record.partition, self.record.offset)


async def read_topic(bootstrap: str, topic: str, partitions: int) -> list[LoggedEvent]:
    """Every committed event in the topic, partition by partition, in offset order."""
    events = []
    async for batch in read_to_end(bootstrap, topic, range(partitions)):
        for record in batch:
            sealed, event = envelope.decode(record.value)
            events.append(LoggedEvent(record, sealed, event))
    return events


def by_order(events: list[LoggedEvent]) -> dict[str, list[LoggedEvent]]:
    grouped: dict[str, list[LoggedEvent]] = defaultdict(list)
    for logged in events:
        grouped[logged.envelope.order_id].append(logged)
    return dict(grouped)


def folded_orders(events: list[LoggedEvent]) -> dict[str, Order | None]:
    """The writer's state as a pure fold of the topic (delivered and cancelled orders
    settled, as the writer keeps them)."""
    folded = {
        order_id: fold(order_id, [e.event for e in logged])
        for order_id, logged in by_order(events).items()
    }
    return {
        order_id: None if order is None else settled(order) for order_id, order in folded.items()
    }
