"""The single, fenced writer: decides commands on the exact current state and appends to Kafka.

Invariants (design.md 3-5):

* One asyncio task owns the order state. Commands queue up and are decided strictly one after
  another, each against the state left by the previous one (including earlier commands of the
  same, not yet committed, batch). Two commands can never be decided on the same version.
* A batch of commands is appended in ONE Kafka transaction (group commit). The in-memory state
  moves forward only after the commit succeeded; callers hear "done" only then, and only once
  read_committed readers can see the batch. The broker answers the commit before it writes the
  commit markers into the partitions, and a broker killed in between can come back without
  some of them (a single KRaft node does); waiting for the last stable offset to pass the batch
  means an acknowledged command is never in a transaction that can still be lost or aborted.
* The producer is transactional. When another writer with the same transactional id starts, ours
  is fenced: we stop for good and every later command gets ``WriterUnavailable``. Also when it
  starts while ours is recovering: ours reopens its producer only from the epoch it last held
  (``service.write.fencing``), so it finds out instead of fencing the newer writer in turn.
* When a commit fails for any other reason its outcome is unknown, so we discard the producer
  and rebuild the whole state from the log (read_committed, up to the last stable offset)
  before deciding anything again. The state never comes from a read model.
* The commit is requested only once every record of the batch is in the log (delivered, not
  yet visible). A batch that fails before that point can therefore only ever be aborted: a
  command refused while the broker was down never shows up once it returns. Only a failure
  during the commit request itself leaves the outcome open (the broker may have committed).
* Before the log is read, no transaction may be open on our partitions: ``init_transactions``
  has just completed or aborted our own, and nobody else writes here. A transaction still
  open there holds the last stable offset back, so the state read would be stale and the next
  decisions would repeat versions. One our producer id left open (its marker lost by a broker
  that restarted uncleanly: the coordinator thinks it is complete, so nothing else will ever
  close it) is closed by aborting: it can only hold unacknowledged commands, because commands
  are acknowledged only once their markers are in. If a partition is still held back after
  that (another producer's transaction), the writer refuses to take commands and says why.
* A discarded producer is never flushed on the way out (closing it waits for the broker and
  would finish its transaction when the broker returns). It is retired in the background:
  its open transaction is aborted, or fenced by the ``init_transactions`` of the producer that
  replaces it, which runs before the log is read again. So whatever it still does happens
  before that read, and the rebuilt state includes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaError,
    ProducerFenced,
    TransactionalIdAuthorizationFailed,
)

from service.infra.eventlog import (
    TopicRepartitioned,
    committed_reader,
    ensure_topic,
    partition_for,
    read_to_end,
)
from service.kernel import envelope
from service.kernel.domain import Command, DomainEvent, Order, decide, evolve
from service.kernel.errors import Conflict, DomainError, EnvironmentProblem, Unavailable
from service.write import fencing

_log = logging.getLogger(__name__)

# How many of the first orders of each partition ``_load`` checks are where their key goes.
_PLACEMENT_CHECKS = 64
_FENCING_ERRORS = (ProducerFenced, InvalidProducerEpoch, TransactionalIdAuthorizationFailed)
# What a broker outage looks like; anything else is logged with its traceback.
_EXPECTED_OUTAGE_ERRORS = (KafkaError, TimeoutError, OSError)


class WriterState(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    RECOVERING = "recovering"
    FENCED = "fenced"
    STOPPED = "stopped"


class WriterUnavailable(Unavailable):
    """The writer cannot take commands now (starting, recovering, broker down, or fenced)."""

    def __init__(self, reason: str, *, retry_after: int | None = 1) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class VersionMismatch(Conflict):
    """``If-Match`` named a version the order is no longer (or not yet) at."""

    def __init__(self, expected: int, actual: int) -> None:
        super().__init__(f"the order is at version {actual}, not {expected}")
        self.expected = expected
        self.actual = actual


class IdempotencyKeyReused(Conflict):
    """The same Idempotency-Key came with a different request."""


class OpenTransactionInLog(EnvironmentProblem):
    """A transaction is still open on a partition after ``init_transactions``: reading the log
    now would give a stale state, so the writer must not decide anything."""

    def __init__(self, topic: str, open_at: dict[int, tuple[int, int]]) -> None:
        where = ", ".join(
            f"partition {p}: last stable offset {stable} < end {end}"
            for p, (stable, end) in sorted(open_at.items())
        )
        super().__init__(
            f"an open transaction that is not the writer's holds back {topic} ({where}); the "
            "writer will not decide on a stale state. Find it with `kafka-transactions.sh "
            "find-hanging`, resolve it with `kafka-transactions.sh abort`, and make sure "
            "nothing else writes to this topic"
        )
        self.open_at = open_at


@dataclass(frozen=True, slots=True)
class CommandRequest:
    """A command with what the HTTP edge knows about it."""

    command: Command
    expected_version: int | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None
    correlation_id: str | None = None
    command_id: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass(frozen=True, slots=True)
class Accepted:
    """A committed command: the order's new version and where its last event sits."""

    order_id: str
    version: int
    partition: int
    offset: int
    replayed: bool = False

    @property
    def consistency_token(self) -> str:
        return f"{self.partition}:{self.offset}"


@dataclass(slots=True)
class _Receipt:
    """What the log says a command with an idempotency key produced (rebuilt on start)."""

    request_hash: str | None
    order_id: str
    version: int
    partition: int
    offset: int


@dataclass(slots=True)
class _Pending:
    request: CommandRequest
    reply: asyncio.Future[Accepted]


@dataclass(frozen=True, kw_only=True)
class WriterConfig:
    bootstrap_servers: str
    topic: str
    partitions: int = 12
    transactional_id: str = "orders-writer"
    allow_deleting_topic: bool = False
    max_batch: int = 500
    commit_timeout: float = 15.0


class Writer:
    """Owns the order state and the transactional producer. Use ``start``, ``submit``, ``stop``."""

    def __init__(self, config: WriterConfig) -> None:
        self.config = config
        self.state = WriterState.STARTING
        self.orders: dict[str, Order] = {}
        self._receipts: dict[str, _Receipt] = {}
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._producer: AIOKafkaProducer | None = None
        # Reads last stable offsets for the producer's batches; opened and closed with it.
        self._stable_offsets: AIOKafkaConsumer | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._busy = asyncio.Lock()
        # The producer id and epoch this writer last held: reopening resumes from them.
        self._held: fencing.ProducerIdentity | None = None
        self.partition_count = 0
        self.loaded_events = 0
        self.load_seconds = 0.0

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Check the topic, fence older writers, rebuild state from the log, then take commands."""
        self.partition_count = await ensure_topic(
            self.config.bootstrap_servers,
            self.config.topic,
            partitions=self.config.partitions,
            allow_deleting=self.config.allow_deleting_topic,
        )
        await self._open_producer()
        try:
            await self._load()
        except BaseException:
            await self._drop_producer()
            raise
        self.state = WriterState.READY
        self._task = asyncio.create_task(self._run(), name="writer")

    async def stop(self, *, timeout: float = 20.0) -> None:
        """Refuse new and queued commands, let the batch in flight finish, close the producer.

        Waits up to ``timeout`` for the batch in flight (then cancels it: its callers hear the
        outcome is unknown), and up to ``timeout`` again for the producers being closed."""
        if self.state is not WriterState.FENCED:
            self.state = WriterState.STOPPED
        self._fail_queued(WriterUnavailable("the service is shutting down"))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._busy.acquire()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # Commands queued while the batch in flight (or a recovery) finished.
        self._fail_queued(self._unavailable())
        # Aborts what a cancelled batch left open, which would otherwise hold every partition's
        # last stable offset back until the broker times the transaction out.
        self._discard_producer()
        if self._retiring:
            # Producers discarded during an outage finish once the broker answers; bounded.
            _done, pending = await asyncio.wait(self._retiring, timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    @property
    def ready(self) -> bool:
        return self.state is WriterState.READY

    async def submit(self, request: CommandRequest) -> Accepted:
        """Decide and append one command; returns once its events are committed to the log
        and visible to read_committed readers."""
        if self.state is not WriterState.READY:
            raise self._unavailable()
        reply: asyncio.Future[Accepted] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(request, reply))
        # Shielded: a client that hangs up does not cancel a command already on its way.
        return await asyncio.shield(reply)

    def _unavailable(self) -> WriterUnavailable:
        if self.state is WriterState.FENCED:
            return WriterUnavailable(
                "another writer took over the event log (this instance was fenced); "
                "send commands to the new writer",
                retry_after=None,
            )
        if self.state is WriterState.STOPPED:
            return WriterUnavailable("the service is shutting down")
        return WriterUnavailable(f"the writer is {self.state.value}: try again shortly")

    # -- loading ------------------------------------------------------------------------------

    async def _open_producer(self, *, resume: bool = False) -> None:
        """Start a transactional producer, which fences every earlier one with our id.

        ``resume``: only if no other writer has taken the id over since this one last held
        it (``service.write.fencing``); otherwise this raises ``InvalidProducerEpoch`` and the other
        writer keeps the log.
        """
        producer = AIOKafkaProducer(
            bootstrap_servers=self.config.bootstrap_servers,
            transactional_id=self.config.transactional_id,
            enable_idempotence=True,
            acks="all",
            linger_ms=0,
            request_timeout_ms=int(self.config.commit_timeout * 1000),
            max_batch_size=1024 * 1024,
        )
        if resume and self._held is not None:
            fencing.resume(producer, self._held)
        stable_offsets = committed_reader(self.config.bootstrap_servers)
        try:
            # start() runs init_transactions: this fences any older producer with our id and
            # aborts its open transaction before we read the log.
            await producer.start()
            self._held = fencing.identity_of(producer)
            await stable_offsets.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await producer.stop()
            with contextlib.suppress(Exception):
                await stable_offsets.stop()
            raise
        self._producer, self._stable_offsets = producer, stable_offsets

    async def _close_producer(self) -> None:
        producer, self._producer = self._producer, None
        stable_offsets, self._stable_offsets = self._stable_offsets, None
        if producer is not None:
            with contextlib.suppress(Exception):
                await producer.stop()
        if stable_offsets is not None:
            with contextlib.suppress(Exception):
                await stable_offsets.stop()

    def _discard_producer(self) -> asyncio.Task[None] | None:
        """Stop using the producer at once; abort and close it in the background.

        Not ``stop()`` here: it flushes, which waits for the broker and would then complete
        whatever the producer still had pending. Aborting instead can only abort (a commit is
        never requested before all records are delivered); a producer that had requested its
        commit may still complete it, but the next ``init_transactions`` fences it first.
        """
        producer, self._producer = self._producer, None
        stable_offsets, self._stable_offsets = self._stable_offsets, None
        if stable_offsets is not None:
            task = asyncio.create_task(stable_offsets.stop(), name="writer-close-offsets")
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        if producer is None:
            return None
        task = asyncio.create_task(self._retire(producer), name="writer-retire-producer")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return task

    async def _drop_producer(self) -> None:
        """Discard the producer after a failed start or recovery attempt; wait for it a while."""
        retiring = self._discard_producer()
        if retiring is not None:
            await asyncio.wait({retiring}, timeout=self.config.commit_timeout)

    @staticmethod
    async def _retire(producer: AIOKafkaProducer) -> None:
        # Fails at once when no transaction is open or its commit was already requested.
        with contextlib.suppress(Exception):
            await producer.abort_transaction()
        with contextlib.suppress(Exception):
            await producer.stop()

    async def _check_no_open_transaction(self) -> None:
        """Make sure no transaction holds a partition's last stable offset back (see the module
        docstring); raise ``OpenTransactionInLog`` if one that is not ours does."""
        open_at = await self._open_transactions()
        if not open_at:
            return
        _log.error(
            "transactions still open in %s after init_transactions (%s; a broker that restarted "
            "uncleanly can lose commit markers): aborting what our producer id left there",
            self.config.topic,
            open_at,
        )
        await self._abort_left_open(sorted(open_at))
        open_at = await self._open_transactions()
        if open_at:
            raise OpenTransactionInLog(self.config.topic, open_at)
        _log.warning("the transactions left open in %s are aborted", self.config.topic)

    async def _open_transactions(self) -> dict[int, tuple[int, int]]:
        """Partitions whose last stable offset stays behind their end, with (stable, end).

        Called after ``init_transactions``; markers still on their way get a moment: the
        whole ``commit_timeout``. Only then does ``_abort_left_open`` end what is still open,
        and by then a writer this one fenced, still waiting for that batch's markers, has
        given up on it (its transaction, the wait included, is bounded by the same timeout
        and began earlier). The last stable offset does not tell an abort from a commit: this
        wait is what keeps it from acknowledging a batch that the abort ends."""
        partitions = [TopicPartition(self.config.topic, p) for p in range(self.partition_count)]
        deadline = time.monotonic() + self.config.commit_timeout
        while True:
            stable = await self._end_offsets(partitions, "read_committed")
            end = await self._end_offsets(partitions, "read_uncommitted")
            open_at = {
                tp.partition: (stable[tp], end[tp]) for tp in partitions if stable[tp] < end[tp]
            }
            if not open_at or time.monotonic() >= deadline:
                return open_at
            await asyncio.sleep(0.2)  # pacing between checks while markers are written

    async def _abort_left_open(self, partitions: list[int]) -> None:
        """Close a transaction our producer id left open on ``partitions`` by aborting one.

        A marker only reaches partitions the transaction wrote to, so each gets a placeholder
        record, aborted with the rest: read_committed readers never see it. The abort marker,
        of our newer epoch, ends whatever our producer id had open there. Another producer's
        transaction stays open.
        """
        producer = self._producer
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

    async def _end_offsets(
        self, partitions: list[TopicPartition], isolation_level: str
    ) -> dict[TopicPartition, int]:
        consumer = committed_reader(self.config.bootstrap_servers, isolation_level=isolation_level)
        await consumer.start()
        try:
            ends: dict[TopicPartition, int] = await consumer.end_offsets(partitions)
            return ends
        finally:
            await consumer.stop()

    async def _load(self) -> None:
        await self._check_no_open_transaction()
        started = time.monotonic()
        orders: dict[str, Order] = {}
        receipts: dict[str, _Receipt] = {}
        count = 0
        # The first orders created in each partition, placed as the key would be now.
        unchecked = [_PLACEMENT_CHECKS] * self.partition_count
        async for batch in read_to_end(
            self.config.bootstrap_servers, self.config.topic, range(self.partition_count)
        ):
            for record in batch:
                sealed, event = envelope.decode(record.value)
                if sealed.version == 1 and unchecked[record.partition]:
                    unchecked[record.partition] -= 1
                    self._check_placement(sealed.order_id, record.partition)
                orders[sealed.order_id] = evolve(
                    orders.get(sealed.order_id), event, sealed.order_id
                )
                if sealed.idempotency_key is not None:
                    receipts[sealed.idempotency_key] = _Receipt(
                        sealed.request_hash,
                        sealed.order_id,
                        sealed.version,
                        record.partition,
                        record.offset,
                    )
                count += 1
        self.orders, self._receipts = orders, receipts
        self.loaded_events = count
        self.load_seconds = time.monotonic() - started
        _log.info(
            "writer state rebuilt from %d events (%d orders) in %.2fs",
            count,
            len(orders),
            self.load_seconds,
        )

    def _check_placement(self, order_id: str, partition: int) -> None:
        """Raise ``TopicRepartitioned`` if the order's key no longer goes to its partition.

        Orders written before partitions were added sit where the old count put them, and
        among the first orders of a partition that had any then, each lands elsewhere under
        the new count with a probability of at least one half: ``_PLACEMENT_CHECKS`` of them
        tell, at a hashing cost that does not grow with the log."""
        now = partition_for(order_id.encode(), self.partition_count)
        if now != partition:
            raise TopicRepartitioned(
                self.config.topic, order_id, partition, now, self.partition_count
            )

    # -- the decision loop --------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            batch = [first]
            while len(batch) < self.config.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            async with self._busy:
                try:
                    await self._process(batch)
                except asyncio.CancelledError:
                    # ``stop`` gave up waiting for this batch: its commit may have been
                    # requested, so its outcome is unknown. Its callers must hear that.
                    self._fail(
                        batch,
                        WriterUnavailable(
                            "the service stopped before the command's outcome was known: "
                            "retry with the same Idempotency-Key"
                        ),
                    )
                    raise
                except Exception as error:
                    # A bug outside any one command's decision (those fail alone, in
                    # ``_process``): the batch's callers get it (a 500) and the loop goes on,
                    # rather than leave every later command waiting on a loop that is gone.
                    _log.exception("a batch of commands failed")
                    self._fail(batch, error)

    async def _process(self, batch: list[_Pending]) -> None:
        staged: dict[str, Order] = {}
        staged_receipts: dict[str, _Pending] = {}
        outgoing: list[tuple[_Pending, list[envelope.Envelope]]] = []
        replays: list[tuple[_Pending, _Pending]] = []
        for pending in batch:
            request = pending.request
            key = request.idempotency_key
            try:
                if key is not None:
                    receipt = self._receipts.get(key)
                    if receipt is not None:
                        self._check_same_request(receipt.request_hash, request)
                        pending.reply.set_result(
                            Accepted(
                                receipt.order_id,
                                receipt.version,
                                receipt.partition,
                                receipt.offset,
                                replayed=True,
                            )
                        )
                        continue
                    earlier = staged_receipts.get(key)
                    if earlier is not None:
                        self._check_same_request(earlier.request.request_hash, request)
                        replays.append((pending, earlier))
                        continue
                order_id = request.command.order_id
                current = staged.get(order_id) or self.orders.get(order_id)
                if request.expected_version is not None:
                    actual = current.version if current else 0
                    if actual != request.expected_version:
                        raise VersionMismatch(request.expected_version, actual)
                events = decide(request.command, current)
                sealed, state = self._sealed(request, order_id, current, events)
            except (DomainError, VersionMismatch, IdempotencyKeyReused) as error:
                pending.reply.set_exception(error)
                continue
            except Exception as error:
                # A bug with this command (a 500 for it alone): nothing of it is staged, and
                # the rest of the batch goes on.
                _log.exception("deciding command %s failed", request.command_id)
                pending.reply.set_exception(error)
                continue
            if state is not None:
                staged[order_id] = state
            if key is not None:
                staged_receipts[key] = pending
            outgoing.append((pending, sealed))
        if outgoing:
            await self._append(staged, outgoing)
        for duplicate, original in replays:
            self._copy_outcome(duplicate, original)

    @staticmethod
    def _sealed(
        request: CommandRequest, order_id: str, current: Order | None, events: list[DomainEvent]
    ) -> tuple[list[envelope.Envelope], Order | None]:
        """The command's events in their envelopes, and the order's state after them."""
        key = request.idempotency_key
        sealed = []
        state = current
        for index, event in enumerate(events):
            state = evolve(state, event, order_id)
            sealed.append(
                envelope.seal(
                    event,
                    event_id=envelope.event_id_for(key, request.command_id, index),
                    order_id=order_id,
                    version=state.version,
                    occurred_at=request.command.at,
                    command_id=request.command_id,
                    correlation_id=request.correlation_id or request.command_id,
                    causation_id=request.command_id,
                    idempotency_key=key,
                    request_hash=request.request_hash,
                )
            )
        return sealed, state

    @staticmethod
    def _check_same_request(recorded_hash: str | None, request: CommandRequest) -> None:
        if recorded_hash != request.request_hash:
            raise IdempotencyKeyReused(
                "this Idempotency-Key was already used for a different request"
            )

    @staticmethod
    def _copy_outcome(duplicate: _Pending, original: _Pending) -> None:
        if original.reply.cancelled():
            duplicate.reply.set_exception(WriterUnavailable("the original request failed"))
        elif (error := original.reply.exception()) is not None:
            duplicate.reply.set_exception(error)
        else:
            result = original.reply.result()
            duplicate.reply.set_result(
                Accepted(
                    result.order_id, result.version, result.partition, result.offset, replayed=True
                )
            )

    async def _append(
        self, staged: dict[str, Order], outgoing: list[tuple[_Pending, list[envelope.Envelope]]]
    ) -> None:
        try:
            positions = await asyncio.wait_for(
                self._transaction(outgoing), self.config.commit_timeout
            )
        except _FENCING_ERRORS as error:
            self._fenced(error)
            self._fail((pending for pending, _ in outgoing), self._unavailable())
            self._fail_queued(self._unavailable())
            self._discard_producer()
            return
        except Exception as error:
            # Not only KafkaError/TimeoutError: whatever the producer raises, the batch's
            # callers must hear back and the loop must go on, or every later command hangs.
            _log.warning(
                "append failed (%r): outcome unknown, rebuilding state from the log",
                error,
                exc_info=not isinstance(error, _EXPECTED_OUTAGE_ERRORS),
            )
            if self.state is WriterState.READY:
                self.state = WriterState.RECOVERING
            self._fail(
                (pending for pending, _ in outgoing),
                WriterUnavailable(
                    "the event log is unavailable: the command may not have been recorded; "
                    "retry with the same Idempotency-Key"
                ),
            )
            self._fail_queued(self._unavailable())
            retiring = self._discard_producer()
            if self.state is WriterState.RECOVERING:
                await self._recover(retiring)
            return
        self.orders.update(staged)
        for (pending, sealed), (partition, offset) in zip(outgoing, positions, strict=True):
            last = sealed[-1]
            result = Accepted(last.order_id, last.version, partition, offset)
            if pending.request.idempotency_key is not None:
                self._receipts[pending.request.idempotency_key] = _Receipt(
                    pending.request.request_hash, last.order_id, last.version, partition, offset
                )
            if not pending.reply.done():
                pending.reply.set_result(result)

    async def _transaction(
        self, outgoing: list[tuple[_Pending, list[envelope.Envelope]]]
    ) -> list[tuple[int, int]]:
        producer, stable_offsets = self._producer, self._stable_offsets
        if producer is None or stable_offsets is None:
            raise KafkaError("no producer")
        # On any failure the caller discards the producer, which aborts what it can.
        await producer.begin_transaction()
        # One record batch per partition (a second one only when the first is full), records in
        # the order the commands were decided: the partition keeps each order's versions in
        # order, and a batch gets consecutive offsets, so a record's offset is its batch's base
        # offset plus its index. A command's events share its order's key, hence one partition.
        batches: list[tuple[int, Any]] = []  # (partition, aiokafka BatchBuilder)
        filling: dict[int, int] = {}  # partition -> index in batches of the batch being filled
        last: list[tuple[int, int]] = []  # per command: batch index and index of its last event
        for _, sealed in outgoing:
            key = sealed[0].order_id.encode()
            partition = partition_for(key, self.partition_count)
            index = filling.get(partition, -1)
            for item in sealed:
                value, headers = envelope.encode(item), envelope.headers(item)
                record = dict(timestamp=None, key=key, value=value, headers=headers)
                if index < 0 or batches[index][1].append(**record) is None:
                    index = filling[partition] = len(batches)
                    batches.append((partition, producer.create_batch()))
                    if batches[index][1].append(**record) is None:
                        raise ValueError(f"an event of order {item.order_id} exceeds a batch")
            last.append((index, batches[index][1].record_count() - 1))
        sends = [
            await producer.send_batch(batch, self.config.topic, partition=partition)
            for partition, batch in batches
        ]
        # Every record delivered before the commit is requested: until then the transaction
        # can only be aborted, so a batch that fails here is certainly not in the log.
        delivered = await asyncio.gather(*sends)
        await producer.commit_transaction()
        ends: dict[int, int] = {}
        for (partition, batch), metadata in zip(batches, delivered, strict=True):
            ends[partition] = max(
                ends.get(partition, -1), metadata.offset + batch.record_count() - 1
            )
        await self._until_visible(stable_offsets, self.config.topic, ends)
        return [(batches[index][0], delivered[index].offset + position) for index, position in last]

    @staticmethod
    async def _until_visible(
        stable_offsets: AIOKafkaConsumer, topic: str, last: dict[int, int]
    ) -> None:
        """Return once the last stable offset of every partition written has passed the batch
        (``last``: partition -> offset of its last record), i.e. the commit markers are in the
        partitions (see the module docstring)."""
        wanted = {TopicPartition(topic, partition): offset for partition, offset in last.items()}
        while True:
            stable = await stable_offsets.end_offsets(list(wanted))
            if all(stable[tp] > offset for tp, offset in wanted.items()):
                return
            await asyncio.sleep(0.001)  # pacing while the broker writes the markers

    async def _recover(self, retiring: asyncio.Task[None] | None) -> None:
        """Reopen the producer and reload the log, retrying until the broker is back.

        Gives the discarded producer a moment to abort and close while the broker answers;
        past that it carries on in the background (see ``_discard_producer``).
        """
        if retiring is not None:
            await asyncio.wait({retiring}, timeout=self.config.commit_timeout)
        delay = 0.5
        while self.state is WriterState.RECOVERING:
            try:
                await self._open_producer(resume=True)
                await self._load()
            except _FENCING_ERRORS as error:
                # Another writer took the transactional id over while this one was away (the
                # producer resumes only from the epoch it last held): it keeps the log.
                self._fenced(error)
                await self._drop_producer()
                return
            except OpenTransactionInLog as error:
                await self._drop_producer()
                _log.error("cannot recover: %s; checking again in %.1fs", error, delay)
                await asyncio.sleep(delay)  # back-off: this needs an operator, or the broker
                delay = min(delay * 2, 5.0)
                continue
            except Exception as error:  # retried until the log can be read again
                await self._drop_producer()
                _log.warning(
                    "event log still unavailable (%r); retrying in %.1fs",
                    error,
                    delay,
                    exc_info=not isinstance(error, _EXPECTED_OUTAGE_ERRORS),
                )
                await asyncio.sleep(delay)  # back-off between reconnection attempts
                delay = min(delay * 2, 5.0)
                continue
            if self.state is not WriterState.RECOVERING:  # stopped meanwhile
                await self._close_producer()
                return
            self.state = WriterState.READY
            _log.info("writer recovered: state rebuilt from the log")
            return

    def _fenced(self, error: Exception) -> None:
        """Another writer with our transactional id took over the log: never write again."""
        _log.error(
            "FENCED: another writer with transactional id %r took over the log (%r); this "
            "instance will never write again",
            self.config.transactional_id,
            error,
        )
        self.state = WriterState.FENCED

    @staticmethod
    def _fail(batch: Iterable[_Pending], error: Exception) -> None:
        for pending in batch:
            if not pending.reply.done():
                pending.reply.set_exception(error)

    def _fail_queued(self, error: Exception) -> None:
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.reply.done():
                pending.reply.set_exception(error)
