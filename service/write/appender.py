"""The writer's transactional producer: opening it (which fences older writers), appending a
batch of commands' events in one transaction, and discarding it when its state is in doubt.

* Opening runs ``init_transactions``: it fences every older producer with our transactional id
  and aborts its open transaction. Reopening after a failure resumes only from the producer id
  and epoch this writer last held (``service.write.fencing``), so a writer that took over
  meanwhile is not fenced in turn: reopening fails instead.
* The commit is requested only once every record of the batch is in the log (delivered, not
  yet visible). A batch that fails before that point can therefore only ever be aborted: a
  command refused while the broker was down never shows up once it returns. Only a failure
  during the commit request itself leaves the outcome open (the broker may have committed).
* An append returns only once read_committed readers can see the batch. The broker answers
  the commit before it writes the commit markers into the partitions, and a broker killed in
  between can come back without some of them (a single KRaft node does); waiting for the last
  stable offset to pass the batch means an acknowledged command is never in a transaction
  that can still be lost or aborted.
* A discarded producer is never flushed on the way out (closing it waits for the broker and
  would finish its transaction when the broker returns). It is retired in the background: its
  open transaction is aborted, or fenced by the ``init_transactions`` of the producer that
  replaces it, which runs before the log is read again. So whatever it still does happens
  before that read, and the rebuilt state includes it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from opentelemetry.trace import Span, SpanContext, SpanKind

from service.infra import tracing
from service.infra.eventlog import partition_for
from service.infra.kafka_clients import client_options
from service.kernel import envelope
from service.write import fencing, records, snapshots
from service.write.contract import WriterConfig
from service.write.visibility import StableOffsets

# Given each command's (partition, offset) and each partition's last offset: the changelog
# records that go into the same transaction.
StateOf = Callable[[list[tuple[int, int]], dict[int, int]], list[snapshots.StateRecord]]


class Appender:
    """Holds one transactional producer at a time, and the consumer that reads the last stable
    offsets of its batches (opened and closed with it)."""

    def __init__(self, config: WriterConfig, stable_offsets: StableOffsets | None = None) -> None:
        self.config = config
        self.producer: AIOKafkaProducer | None = None
        # Shared by the writers of a process (``service.write.visibility``); else our own,
        # opened and closed with the producer.
        self._shared_offsets = stable_offsets
        self._stable_offsets: StableOffsets | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        # The producer id and epoch this writer last held: reopening resumes from them.
        self.held: fencing.ProducerIdentity | None = None
        # The writer's changelog (``service.write.snapshots``), once the writer found it.
        self.state_topic: str | None = None

    async def open(self, *, resume: bool = False) -> None:
        """Start a transactional producer, which fences every earlier one with our id.

        ``resume``: only if no other writer has taken the id over since this one last held
        it (``service.write.fencing``); otherwise this raises ``InvalidProducerEpoch`` and the
        other writer keeps the log.
        """
        producer = AIOKafkaProducer(
            **client_options(self.config.kafka),
            transactional_id=self.config.transactional_id,
            enable_idempotence=True,
            acks="all",
            linger_ms=0,
            request_timeout_ms=int(self.config.commit_timeout * 1000),
            max_batch_size=1024 * 1024,
        )
        if resume and self.held is not None:
            fencing.resume(producer, self.held)
        stable_offsets = self._shared_offsets or StableOffsets(self.config.kafka, self.config.topic)
        try:
            # start() runs init_transactions: this fences any older producer with our id and
            # aborts its open transaction before we read the log.
            await producer.start()
            self.held = fencing.identity_of(producer)
            if stable_offsets is not self._shared_offsets:
                await stable_offsets.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await producer.stop()
            if stable_offsets is not self._shared_offsets:
                await stable_offsets.stop()
            raise
        self.producer, self._stable_offsets = producer, stable_offsets

    async def close(self) -> None:
        """Stop the producer (flushing it) and its consumer."""
        producer, self.producer = self.producer, None
        stable_offsets, self._stable_offsets = self._stable_offsets, None
        if producer is not None:
            with contextlib.suppress(Exception):
                await producer.stop()
        if stable_offsets is not None and stable_offsets is not self._shared_offsets:
            await stable_offsets.stop()

    def discard(self) -> asyncio.Task[None] | None:
        """Stop using the producer at once; abort and close it in the background.

        Not ``stop()`` here: it flushes, which waits for the broker and would then complete
        whatever the producer still had pending. Aborting instead can only abort (a commit is
        never requested before all records are delivered); a producer that had requested its
        commit may still complete it, but the next ``init_transactions`` fences it first.
        """
        producer, self.producer = self.producer, None
        stable_offsets, self._stable_offsets = self._stable_offsets, None
        if stable_offsets is not None and stable_offsets is not self._shared_offsets:
            self._in_background(stable_offsets.stop(), "writer-close-offsets")
        if producer is None:
            return None
        return self._in_background(self._retire(producer), "writer-retire-producer")

    async def drop(self) -> None:
        """Discard the producer after a failed start or recovery attempt; wait for it a while."""
        retiring = self.discard()
        if retiring is not None:
            await asyncio.wait({retiring}, timeout=self.config.commit_timeout)

    async def wait_retired(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the discarded producers to close, then cancel the rest.

        Producers discarded during an outage finish only once the broker answers."""
        if not self._retiring:
            return
        _done, pending = await asyncio.wait(self._retiring, timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def append(
        self,
        commands: Sequence[Sequence[envelope.Envelope]],
        partition_count: int,
        traces: Sequence[SpanContext | None] = (),
        state: StateOf | None = None,
    ) -> list[tuple[int, int]]:
        """Append the commands' events in one transaction; per command, the partition and
        offset of its last event. Returns once read_committed readers can see them.

        ``state``: given each command's position and each partition's last offset, the
        changelog records the same transaction writes to ``state_topic`` once the events are
        delivered and before it commits: they commit, or abort, together.

        ``traces``: per command, the span it was sent from when it is traced
        (``CommandRequest.trace``). Each traced command gets a producer span, a child of that
        one, lasting the transaction; its records carry that span's W3C context."""
        producer, stable_offsets = self.producer, self._stable_offsets
        if producer is None or stable_offsets is None:
            raise KafkaError("no producer")
        spans = self._producer_spans(commands, traces, partition_count)
        try:
            # On any failure the caller discards the producer, which aborts what it can.
            await producer.begin_transaction()
            headers = {number: tracing.record_headers(span) for number, span in spans.items()}
            packed = records.pack(commands, partition_count, producer.create_batch, headers)
            sends = [
                await producer.send_batch(batch, self.config.topic, partition=partition)
                for partition, batch in packed.batches
            ]
            # Every record delivered before the commit is requested: until then the
            # transaction can only be aborted, so a batch that fails here is certainly not in
            # the log.
            delivered = await _delivered(sends)
            base_offsets = [metadata.offset for metadata in delivered]
            if state is not None and self.state_topic is not None:
                await self._send_state(
                    producer, state(packed.positions(base_offsets), packed.ends(base_offsets))
                )
            await producer.commit_transaction()
            await stable_offsets.wait_past(packed.ends(base_offsets))
        except BaseException as error:
            tracing.end_all(list(spans.values()), error)
            raise
        positions = packed.positions(base_offsets)
        for number, span in spans.items():
            span.set_attribute(tracing.MESSAGING_OFFSET, positions[number][1])
            span.end()
        return positions

    async def write_state(self, records: Sequence[snapshots.StateRecord]) -> None:
        """Write changelog records alone, in one transaction."""
        producer = self.producer
        if producer is None:
            raise KafkaError("no producer")
        async with asyncio.timeout(self.config.commit_timeout):
            await producer.begin_transaction()
            try:
                await self._send_state(producer, records)
                await producer.commit_transaction()
            except BaseException:
                with contextlib.suppress(Exception):
                    await producer.abort_transaction()
                raise

    async def _send_state(
        self, producer: AIOKafkaProducer, records: Sequence[snapshots.StateRecord]
    ) -> None:
        topic = self.state_topic
        assert topic is not None
        sends = [
            await producer.send(topic, value, key=key, partition=partition)
            for partition, key, value in records
        ]
        await _delivered(sends)

    def _producer_spans(
        self,
        commands: Sequence[Sequence[envelope.Envelope]],
        traces: Sequence[SpanContext | None],
        partition_count: int,
    ) -> dict[int, Span]:
        """By the index of each traced command, its producer span (started): none at all
        when tracing is off."""
        tracer = tracing.tracer()
        if tracer is None:
            return {}
        topic = self.config.topic
        spans: dict[int, Span] = {}
        for number, caller in enumerate(traces):
            if caller is None:
                continue
            events = commands[number]
            key = events[0].order_id
            partition = partition_for(key.encode(), partition_count)
            attributes = tracing.kafka_attributes(topic, partition, "send")
            attributes[tracing.MESSAGING_KEY] = key
            attributes[tracing.MESSAGING_BATCH_COUNT] = len(events)
            attributes["orders.transaction.commands"] = len(commands)
            spans[number] = tracer.start_span(
                f"send {topic}",
                context=tracing.parent(caller),
                kind=SpanKind.PRODUCER,
                attributes=attributes,
            )
        return spans

    async def abort_left_open(self, partitions: list[int]) -> None:
        """Close a transaction our producer id left open on ``partitions`` by aborting one.

        A marker only reaches partitions the transaction wrote to, so each gets a placeholder
        record, aborted with the rest: read_committed readers never see it. The abort marker,
        of our newer epoch, ends whatever our producer id had open there. Another producer's
        transaction stays open.
        """
        producer = self.producer
        if producer is None:
            raise KafkaError("no producer")
        async with asyncio.timeout(self.config.commit_timeout):
            await producer.begin_transaction()
            for partition in partitions:
                await producer.send_and_wait(
                    self.config.topic,
                    key=b"",
                    value=b"",
                    partition=partition,
                    headers=[("placeholder", b"aborts a transaction left open")],
                )
            await producer.abort_transaction()

    def _in_background(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(work, name=name)
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return task

    @staticmethod
    async def _retire(producer: AIOKafkaProducer) -> None:
        # Fails at once when no transaction is open or its commit was already requested.
        with contextlib.suppress(Exception):
            await producer.abort_transaction()
        with contextlib.suppress(Exception):
            await producer.stop()


async def _delivered(sends: Sequence[asyncio.Future[Any]]) -> list[Any]:
    """Each send's record metadata, once every send is settled; the first failure raised (the
    others' are retrieved too, rather than logged as never retrieved)."""
    settled = await asyncio.gather(*sends, return_exceptions=True)
    for outcome in settled:
        if isinstance(outcome, BaseException):
            raise outcome
    return settled
