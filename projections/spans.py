"""The spans of a projection's transaction, while tracing is on (docs/telemetry.md, "Traces").

One span per transaction (``<projection> transaction``), a root of its own, linked to the
traced records it applies; and for each traced record one span (``apply <projection>``) that
is a child of the producer span in its headers, so that the command's own trace shows the
transaction that applied its event. Both last the transaction, and fail with it.

With tracing off, or no tracer, nothing is started: entering and leaving cost a check.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType

from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind

from projections.batches import Group, Traced
from service.infra import tracing


class TransactionSpans:
    """``async with TransactionSpans(...)`` around one projection's transaction."""

    __slots__ = ("_groups", "_spans", "_topic", "_traced")

    def __init__(self, topic: str, groups: Sequence[Group], traced: Traced | None) -> None:
        self._topic = topic
        self._groups = groups
        self._traced = traced
        self._spans: list[Span] = []

    async def __aenter__(self) -> None:
        tracer = tracing.tracer()
        if tracer is None or self._traced is None or not self._groups:
            return
        projection = self._groups[0].target.name
        applied = [
            (group.partition, offset, span_context)
            for group in self._groups
            for (partition, offset), span_context in self._traced.items()
            if partition == group.partition and group.expected <= offset < group.new
        ]
        transaction = tracer.start_span(
            f"{projection} transaction",
            context=Context(),  # a root: whatever span the runner's task started in
            kind=SpanKind.CONSUMER,
            attributes={
                tracing.MESSAGING_SYSTEM: "kafka",
                tracing.MESSAGING_OPERATION_TYPE: "process",
                tracing.MESSAGING_DESTINATION: self._topic,
                tracing.MESSAGING_BATCH_COUNT: sum(len(g.events) for g in self._groups),
                "orders.projection": projection,
                "orders.partitions": sorted({g.partition for g in self._groups}),
            },
            links=tracing.links_to(context for _p, _o, context in applied),
        )
        self._spans.append(transaction)
        for partition, offset, producer in applied:
            attributes = tracing.kafka_attributes(self._topic, partition, "process")
            attributes[tracing.MESSAGING_OFFSET] = offset
            attributes["orders.projection"] = projection
            self._spans.append(
                tracer.start_span(
                    f"apply {projection}",
                    context=tracing.parent(producer),
                    kind=SpanKind.CONSUMER,
                    attributes=attributes,
                    links=tracing.links_to([transaction.get_span_context()]),
                )
            )

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._spans:
            tracing.end_all(self._spans, error)
