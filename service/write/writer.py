"""The single, fenced writer: decides commands on the exact current state and appends to Kafka.

Invariants (design.md 3-5); this module is the I/O shell that holds them together:

* One asyncio task owns the order state. Commands queue up and are decided strictly one after
  another, each against the state left by the previous one (including earlier commands of the
  same, not yet committed, batch: ``service.write.staging``). Two commands can never be
  decided on the same version.
* A batch of commands is appended in ONE Kafka transaction (group commit,
  ``service.write.appender``). The in-memory state moves forward only after the commit
  succeeded; callers hear "done" only then, and only once read_committed readers can see the
  batch.
* The producer is transactional. When another writer with the same transactional id starts, ours
  is fenced: we stop for good and every later command gets ``WriterUnavailable``. Also when it
  starts while ours is recovering: ours reopens its producer only from the epoch it last held
  (``service.write.fencing``), so it finds out instead of fencing the newer writer in turn.
* When a commit fails for any other reason its outcome is unknown, so we discard the producer
  and rebuild the whole state from the log (read_committed, up to the last stable offset,
  ``service.write.recovery``) before deciding anything again. The state never comes from a
  read model.
* Overload is refused fast, never queued without bound (design.md 9): a command that would
  wait longer than ``max_queue_delay`` for its batch to begin (``service.write.pacing``) is
  refused at once, and one whose deadline passes while queued is refused then
  (``WriterOverloaded``); neither is decided. A command is decided only if it was still wanted
  when its batch began: one whose caller stopped waiting while it was queued is dropped, but
  once its batch has begun it completes whatever the caller does.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaError,
    ProducerFenced,
    TransactionalIdAuthorizationFailed,
)

from service.infra.eventlog import partition_for
from service.infra.topic import READ, WRITE, check_topic, look_up_topic
from service.kernel.domain import Order
from service.kernel.errors import EnvironmentProblem
from service.write import fencing, metrics, recovery, snapshots
from service.write.appender import Appender, StateOf
from service.write.contract import (
    Accepted,
    CommandRequest,
    WriterConfig,
    WriterOverloaded,
    WriterUnavailable,
)
from service.write.pacing import Pace
from service.write.recovery import OpenTransactionInLog
from service.write.snapshots import StateRecord
from service.write.staging import Answer, Committed, Receipt, StagedBatch, receipt_key
from service.write.visibility import StableOffsets

_log = logging.getLogger(__name__)

_FENCING_ERRORS = (ProducerFenced, InvalidProducerEpoch, TransactionalIdAuthorizationFailed)
# What a broker outage looks like; anything else is logged with its traceback.
_EXPECTED_OUTAGE_ERRORS = (KafkaError, TimeoutError, OSError)


class WriterState(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    RECOVERING = "recovering"
    FENCED = "fenced"
    STOPPED = "stopped"


@dataclass(slots=True)
class _Pending:
    """A submitted command. Answered (``reply`` done) while queued, it is not decided: its
    caller withdrew it, or its deadline passed. ``taken`` once its batch has begun; from then
    on it completes whatever the caller does."""

    request: CommandRequest
    reply: asyncio.Future[Accepted]
    queued_at: float  # loop time
    taken: bool = False


# A partition the changelog has no position for is written to it in transactions of this many
# records (its position last).
_CATCH_UP_RECORDS = 5000

# A failed batch's log line names this many of its commands' correlation ids.
_LOGGED_CORRELATION_IDS = 20


def _batch_context(batch: Sequence[_Pending]) -> dict[str, object]:
    """What a log line about a batch carries: its size and (the first) correlation ids."""
    return {
        "commands": len(batch),
        "correlation_ids": [
            pending.request.correlation_id or pending.request.command_id
            for pending in batch[:_LOGGED_CORRELATION_IDS]
        ],
    }


class Writer:
    """Owns the order state and the transactional producer. Use ``start``, ``submit``, ``stop``."""

    def __init__(
        self, config: WriterConfig, *, stable_offsets: StableOffsets | None = None
    ) -> None:
        """``stable_offsets``: shared with the process's other writers
        (``service.write.visibility``); by default the writer has its own."""
        self.config = config
        self.state = WriterState.STARTING
        self._committed = Committed(idempotency_ttl=config.idempotency_ttl)
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._appender = Appender(config, stable_offsets)
        self._task: asyncio.Task[None] | None = None
        self._busy = asyncio.Lock()
        self._pace = Pace()
        # The batch being decided and appended: how many commands, since when (loop time).
        self._in_flight: tuple[int, float] = (0, 0.0)
        self.partition_count = 0
        # The partitions this writer decides for (all of the topic's unless configured).
        self.partitions: list[int] = []
        self.loaded_events = 0
        self.load_seconds = 0.0
        self.loaded_state_records = 0
        # The epoch each of ``config.fences`` got when this writer fenced it.
        self.fenced_epochs: dict[str, int] = {}

    @property
    def orders(self) -> dict[str, Order]:
        """Every order's state as of the last committed batch."""
        return self._committed.orders

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Check the topic, fence older writers, rebuild state from the log, then take commands."""
        topic = await check_topic(
            self.config.kafka,
            self.config.topic,
            needs=(READ, WRITE),  # its state comes from the log
            allow_deleting=self.config.allow_deleting_topic,
            allow_undurable=self.config.allow_undurable_topic,
        )
        self.partition_count = topic.partitions
        wanted = self.config.partitions
        self.partitions = sorted(range(topic.partitions) if wanted is None else wanted)
        if self.partitions and self.partitions[-1] >= topic.partitions:
            raise EnvironmentProblem(
                f"{self.config.topic} has {topic.partitions} partitions, no partition "
                f"{self.partitions[-1]}"
            )
        self._appender.state_topic = await self._find_state_topic()
        await self._appender.open()
        try:
            self.fenced_epochs = await fencing.fence(self.config.kafka, self.config.fences)
            await self._load()
        except BaseException:
            await self._appender.drop()
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
        self._appender.discard()
        await self._appender.wait_retired(timeout)

    @property
    def ready(self) -> bool:
        return self.state is WriterState.READY

    @property
    def deciding_partitions(self) -> list[int]:
        """The partitions this writer decides commands for now: its own, once ready."""
        return list(self.partitions) if self.ready else []

    @property
    def fenced(self) -> bool:
        """Another writer took this one's transactional id over: it never writes again."""
        return self.state is WriterState.FENCED

    @property
    def epoch(self) -> int:
        """The epoch of the transactional id this writer last held (-1: none yet): each new
        holder of the id gets a higher one, and fences every lower."""
        held = self._appender.held
        return -1 if held is None else held.epoch

    # -- what the metrics read (``service.write.metrics.WriterCollector``) -------------------

    @property
    def state_name(self) -> str:
        return self.state.value

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def orders_held(self) -> int:
        return len(self._committed.orders)

    @property
    def idempotency_keys_held(self) -> int:
        return len(self._committed.receipts)

    async def submit(self, request: CommandRequest) -> Accepted:
        """Decide and append one command; returns once its events are committed to the log
        and visible to read_committed readers (counted in ``orders_writer_commands_total``).

        ``WriterOverloaded`` (nothing decided): at once when the commands ahead would keep this
        one queued longer than ``max_queue_delay``, or once it has been queued that long.
        Cancelling the caller withdraws a command still queued; once its batch has begun, the
        command completes (and is in the log if it committed) whatever the caller does."""
        command = type(request.command).__name__
        try:
            accepted = await self._submit(request)
        except BaseException as error:
            metrics.COMMANDS.labels(command, metrics.outcome_of(error)).inc()
            raise
        metrics.COMMANDS.labels(command, metrics.outcome_of(None, replayed=accepted.replayed)).inc()
        return accepted

    async def _submit(self, request: CommandRequest) -> Accepted:
        if self.state is not WriterState.READY:
            raise self._unavailable()
        if self.config.partitions is not None:
            partition = partition_for(request.command.order_id.encode(), self.partition_count)
            if partition not in self.config.partitions:
                raise WriterUnavailable(f"partition {partition} is not this writer's")
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._expected_wait(now) > self.config.max_queue_delay:
            raise WriterOverloaded()
        pending = _Pending(request, loop.create_future(), now)
        self._queue.put_nowait(pending)
        loop.call_at(now + self.config.max_queue_delay, self._expire, pending)
        try:
            # Shielded: cancelling the caller cancels only its wait, never a command taken.
            return await asyncio.shield(pending.reply)
        except asyncio.CancelledError:
            if not pending.taken:
                pending.reply.cancel()  # withdrawn: its batch will skip it
            raise

    @staticmethod
    def _expire(pending: _Pending) -> None:
        """At a command's deadline: refuse it if its batch has not begun (its batch skips it)."""
        if not pending.taken and not pending.reply.done():
            pending.reply.set_exception(WriterOverloaded())

    def _expected_wait(self, now: float) -> float:
        """Seconds until a command queued now is taken into a batch (``Pace.expected_wait``)."""
        in_flight, since = self._in_flight
        return self._pace.expected_wait(
            queued=self._queue.qsize(),
            max_batch=self.config.max_batch,
            in_flight=in_flight,
            in_flight_for=now - since,
        )

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

    async def _find_state_topic(self) -> str | None:
        """The writer's changelog (``service.write.snapshots``) if it exists; without it the
        writer reads the whole log at every start, and says so."""
        name = self.config.state_topic
        if name is None:
            return None
        found = await look_up_topic(self.config.kafka, name)
        if found is None:
            _log.warning(
                "no topic %s: the writer keeps no snapshots and reads the whole log at every "
                "start; create it with `orders topic create`",
                name,
            )
            return None
        if len(found.partitions) != self.partition_count:
            raise EnvironmentProblem(
                f"{name} has {len(found.partitions)} partitions and {self.config.topic} "
                f"{self.partition_count}: the writer's changelog must have as many as the "
                f"events topic; delete it and run `orders topic create`"
            )
        return name

    async def _load(self) -> None:
        """Rebuild the state from the log, once no transaction holds it back."""
        await recovery.check_no_open_transaction(
            self.config, self.partitions, self._appender.abort_left_open
        )
        loaded = await recovery.read_state(
            self.config,
            self.partition_count,
            now=datetime.now(UTC),
            state_topic=self._appender.state_topic,
            partitions=self.partitions,
        )
        await self._catch_up(loaded)
        self._committed = loaded.state
        self.loaded_events, self.load_seconds = loaded.events, loaded.seconds
        self.loaded_state_records = loaded.state_records

    async def _catch_up(self, loaded: recovery.Loaded) -> None:
        """Tell the changelog what it missed before deciding anything: the orders the log's
        tail changed (written without a changelog), or, for a partition it has no position for,
        every order of it. A partition with a position is caught up in ONE transaction (its
        records and its new position together); one without is written in chunks, its
        position last, since until then its records count for nothing."""
        state = loaded.state
        whole = {p for p, (orders, _) in loaded.catch_up.items() if orders is None}
        by_partition: dict[int, list[str]] = {p: [] for p in whole}
        if whole:
            for order_id in state.orders:
                partition = partition_for(order_id.encode(), self.partition_count)
                if partition in whole:
                    by_partition[partition].append(order_id)
        for partition, (orders, position) in sorted(loaded.catch_up.items()):
            ids = by_partition[partition] if orders is None else sorted(orders)
            first = orders is None  # nothing of this partition counts in the changelog yet
            records = [
                record
                for i in ids
                for record in snapshots.order_records(partition, state.orders[i], first=first)
            ]
            records += [
                snapshots.receipt_record(key, receipt)
                for key, receipt in state.receipts.items()
                if receipt.partition == partition and (orders is None or receipt.order_id in orders)
            ]
            mark = snapshots.position_record(partition, position)
            if orders is not None:
                await self._appender.write_state([*records, mark])
                continue
            for start in range(0, len(records), _CATCH_UP_RECORDS):
                await self._appender.write_state(records[start : start + _CATCH_UP_RECORDS])
            await self._appender.write_state([mark])
        if loaded.catch_up:
            _log.info(
                "writer changelog caught up: %d partition(s), %d in full",
                len(loaded.catch_up),
                len(whole),
            )

    def _state_of(self, staged: StagedBatch) -> tuple[StateOf, int]:
        """What the batch's transaction writes to the changelog, and how many of the receipts
        forgotten so far it tombstones."""
        forgotten = list(self._committed.forgotten)

        def state(positions: list[tuple[int, int]], ends: dict[int, int]) -> list[StateRecord]:
            records = [
                record
                for order_id, order in staged.orders.items()
                for record in snapshots.order_records(
                    partition_for(order_id.encode(), self.partition_count), order
                )
            ]
            for decided, (partition, offset) in zip(staged.appends, positions, strict=True):
                request = decided.request
                key = receipt_key(request.actor, request.idempotency_key)
                if key is not None:
                    receipt = Receipt.of(decided.events[-1], partition, offset)
                    records.append(snapshots.receipt_record(key, receipt))
            records += [snapshots.forgotten_record(p, key) for p, key in forgotten]
            records += [snapshots.position_record(p, last + 1) for p, last in ends.items()]
            return records

        return state, len(forgotten)

    # -- the decision loop --------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            batch = [first]
            while len(batch) < self.config.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            async with self._busy:
                batch = self._take(batch)
                if not batch:
                    continue
                started = loop.time()
                self._in_flight = (len(batch), started)
                try:
                    if await self._process(batch):
                        self._pace.observe(len(batch), loop.time() - started)
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
                    # staging): the batch's callers get it (a 500) and the loop goes on,
                    # rather than leave every later command waiting on a loop that is gone.
                    _log.exception("a batch of commands failed", extra=_batch_context(batch))
                    self._fail(batch, error)
                finally:
                    self._in_flight = (0, 0.0)

    @staticmethod
    def _take(batch: list[_Pending]) -> list[_Pending]:
        """The commands of ``batch`` to decide now that it begins, each marked taken: not those
        answered while queued (withdrawn by their caller, or refused at their deadline)."""
        taken = [pending for pending in batch if not pending.reply.done()]
        if not taken:
            return taken
        now = asyncio.get_running_loop().time()
        for pending in taken:
            pending.taken = True
            metrics.QUEUE_DELAY.observe(now - pending.queued_at)
        metrics.BATCH_COMMANDS.observe(len(taken))
        return taken

    async def _process(self, batch: list[_Pending]) -> bool:
        """Decide the batch, answer at once the commands replayed from the log or refused, and
        append the rest in one transaction. False if the append failed."""
        staged = self._committed.stage(pending.request for pending in batch)
        for pending, decision in zip(batch, staged.decisions, strict=True):
            if isinstance(decision, Accepted | Exception):
                self._answer(pending, decision)
        if staged.appends:
            return await self._append(batch, staged)
        return True

    async def _append(self, batch: list[_Pending], staged: StagedBatch) -> bool:
        """Append the staged batch in one transaction and answer its commands; the staged state
        is committed only if the transaction commits (True). After a failure, also fail the
        queued commands and (unless fenced) rebuild the state from the log."""
        state, tombstoned = self._state_of(staged)
        try:
            with metrics.TRANSACTION_SECONDS.time():
                positions = await asyncio.wait_for(
                    self._appender.append(
                        [decided.events for decided in staged.appends],
                        self.partition_count,
                        [decided.request.trace for decided in staged.appends],
                        state,
                    ),
                    self.config.commit_timeout,
                )
        except _FENCING_ERRORS as error:
            self._fenced(error, batch)
            self._answer_all(batch, staged.answers_after_failure(self._unavailable()))
            self._fail_queued(self._unavailable())
            self._appender.discard()
            return False
        except Exception as error:
            # Not only KafkaError/TimeoutError: whatever the producer raises, the batch's
            # callers must hear back and the loop must go on, or every later command hangs.
            _log.warning(
                "append failed (%r): outcome unknown, rebuilding state from the log",
                error,
                exc_info=not isinstance(error, _EXPECTED_OUTAGE_ERRORS),
                extra=_batch_context(batch),
            )
            if self.state is WriterState.READY:
                self.state = WriterState.RECOVERING
            unknown = WriterUnavailable(
                "the event log is unavailable: the command may not have been recorded; "
                "retry with the same Idempotency-Key"
            )
            self._answer_all(batch, staged.answers_after_failure(unknown))
            self._fail_queued(self._unavailable())
            if self.state is WriterState.RECOVERING:
                # The discarded producer gets a moment to abort and close while the broker
                # answers; past that it carries on in the background (``Appender.discard``).
                await self._appender.drop()
                await self._recover()
            else:
                self._appender.discard()
            return False
        # The changelog has these tombstones now (without a changelog, nobody needs them).
        del self._committed.forgotten[: tombstoned if self._appender.state_topic else None]
        self._answer_all(batch, self._committed.commit(staged, positions))
        return True

    async def _recover(self) -> None:
        """Reopen the producer and reload the log, retrying until the broker is back."""
        delay = 0.5
        while self.state is WriterState.RECOVERING:
            try:
                await self._appender.open(resume=True)
                await self._load()
            except _FENCING_ERRORS as error:
                # Another writer took the transactional id over while this one was away (the
                # producer resumes only from the epoch it last held): it keeps the log.
                self._fenced(error)
                await self._appender.drop()
                return
            except OpenTransactionInLog as error:
                await self._appender.drop()
                _log.error("cannot recover: %s; checking again in %.1fs", error, delay)
                await asyncio.sleep(delay)  # back-off: this needs an operator, or the broker
                delay = min(delay * 2, 5.0)
                continue
            except Exception as error:  # retried until the log can be read again
                await self._appender.drop()
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
                await self._appender.close()
                return
            self.state = WriterState.READY
            _log.info("writer recovered: state rebuilt from the log")
            return

    def _fenced(self, error: Exception, batch: Sequence[_Pending] = ()) -> None:
        """Another writer with our transactional id took over the log: never write again.
        ``batch``: the commands whose append found out (they were not recorded)."""
        _log.error(
            "FENCED: another writer with transactional id %r took over the log (%r); this "
            "instance will never write again",
            self.config.transactional_id,
            error,
            extra=_batch_context(batch) if batch else None,
        )
        self.state = WriterState.FENCED

    @staticmethod
    def _answer(pending: _Pending, answer: Answer) -> None:
        if pending.reply.done():
            return
        if isinstance(answer, Accepted):
            pending.reply.set_result(answer)
        else:
            pending.reply.set_exception(answer)

    @classmethod
    def _answer_all(cls, batch: Sequence[_Pending], answers: Sequence[Answer]) -> None:
        for pending, answer in zip(batch, answers, strict=True):
            cls._answer(pending, answer)

    @classmethod
    def _fail(cls, batch: Iterable[_Pending], error: Exception) -> None:
        for pending in batch:
            cls._answer(pending, error)

    def _fail_queued(self, error: Exception) -> None:
        while not self._queue.empty():
            self._answer(self._queue.get_nowait(), error)
