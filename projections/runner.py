"""The projections runner: consume, batch, apply in ONE Postgres transaction with the checkpoint.

Exactly-once effects (design.md, invariant 6):

* The checkpoint table holds, per (projection, topic, partition), the offset of the next event
  to apply. It is the only position that counts: on assignment the consumer seeks there;
  Kafka's committed offsets are written afterwards for lag tools only.
* A batch's rows and its checkpoint advance commit together. The checkpoint update is a
  compare-and-set on the offset this instance expects; an instance that lost a partition in a
  rebalance (a zombie) matches zero rows, so its whole transaction rolls back and it re-seeks.
* The rebalance listener runs inside ``getmany``, never while a batch is being applied, so it
  shares no lock with the loop (aiokafka, "Storing Offsets Outside Kafka").

An event that cannot be applied halts its partition (invariant 7): the partition is paused at
that event, the reason is logged and shown by ``status``; the other partitions go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from projections import catalog
from projections.projection import Applied, Projection, State, store
from projections.schema import projection_checkpoints
from service import envelope
from service.settings import Settings

_log = logging.getLogger(__name__)


def _transient(error: BaseException) -> bool:
    """A database error worth retrying: lost connection, deadlock, shutdown, no resources."""
    if isinstance(error, OSError | OperationalError | InterfaceError):
        return True
    if isinstance(error, DBAPIError):
        if error.connection_invalidated:
            return True
        state = str(getattr(error.orig, "sqlstate", "") or getattr(error.orig, "pgcode", ""))
        return state[:2] in {"08", "40", "53", "57"}
    return False


class _FoldFailed(Exception):
    def __init__(self, applied: Applied, reason: str) -> None:
        super().__init__(reason)
        self.applied = applied
        self.reason = reason


class StaleCheckpoint(Exception):
    """The stored checkpoint is not where this instance expected: another instance moved it."""


@dataclass(frozen=True)
class Halt:
    partition: int
    offset: int
    order_id: str | None
    reason: str


@dataclass(kw_only=True)
class RunnerConfig:
    bootstrap_servers: str
    topic: str
    group_prefix: str = "orders-projection"
    instance_id: str | None = None
    batch_max_records: int = 5000
    batch_wait_ms: int = 50
    commit_kafka_offsets_every: float = 1.0


@dataclass
class RunnerStats:
    batches: int = 0
    events: int = 0
    rows_written: int = 0
    stale_batches: int = 0


async def read_checkpoints(
    connection: AsyncConnection, projection: str, topic: str, partitions: Sequence[int]
) -> dict[int, int]:
    """The stored next offsets, creating offset-0 rows for partitions never seen before."""
    if partitions:
        await connection.execute(
            insert(projection_checkpoints).on_conflict_do_nothing(),
            [
                {"projection": projection, "topic": topic, "partition": p, "next_offset": 0}
                for p in partitions
            ],
        )
    result = await connection.execute(
        sa.select(projection_checkpoints.c.partition, projection_checkpoints.c.next_offset).where(
            projection_checkpoints.c.projection == projection,
            projection_checkpoints.c.topic == topic,
            projection_checkpoints.c.partition.in_(list(partitions)),
        )
    )
    return {row.partition: row.next_offset for row in result}


async def advance_checkpoints(
    connection: AsyncConnection, projection: str, topic: str, moves: dict[int, tuple[int, int]]
) -> None:
    """Compare-and-set each partition's checkpoint from ``expected`` to ``new``, in one statement.

    Raises ``StaleCheckpoint`` unless every partition was at the expected offset.
    """
    values = sa.values(
        sa.column("partition", sa.Integer),
        sa.column("expected", sa.BigInteger),
        sa.column("new", sa.BigInteger),
        name="moves",
    ).data([(p, expected, new) for p, (expected, new) in moves.items()])
    table = projection_checkpoints
    statement = (
        table.update()
        .where(
            table.c.projection == projection,
            table.c.topic == topic,
            table.c.partition == values.c.partition,
            table.c.next_offset == values.c.expected,
        )
        .values(next_offset=values.c.new, updated_at=sa.func.now())
        .returning(table.c.partition)
    )
    moved = {row.partition for row in await connection.execute(statement)}
    if moved != set(moves):
        raise StaleCheckpoint(
            f"{projection}: partitions {sorted(set(moves) - moved)} were moved by another instance"
        )


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, runner: ProjectionRunner) -> None:
        self.runner = runner

    # aiokafka runs these in its coordination task, concurrently with the loop's batch. They
    # wait for the batch in flight (the lock is held only around database work, never around
    # a Kafka call, so the rebalance cannot wait on itself), then hand partitions over.
    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        async with self.runner.applying:
            for tp in revoked:
                self.runner.positions.pop(tp.partition, None)
                self.runner.unsought.discard(tp.partition)
        if revoked:
            _log.info(
                "%s: partitions %s revoked",
                self.runner.name,
                sorted(tp.partition for tp in revoked),
            )

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        partitions = [tp.partition for tp in assigned]
        async with self.runner.applying:
            try:
                await self.runner.seek_to_checkpoints(partitions)
            except Exception as error:  # aiokafka would only log it: the run loop retries
                self.runner.await_seek(partitions, error)


@dataclass
class ProjectionRunner:
    """Runs one projection in its own consumer group."""

    projection: Projection
    engine: AsyncEngine
    config: RunnerConfig
    positions: dict[int, int] = field(default_factory=dict)
    halted: dict[int, Halt] = field(default_factory=dict)
    stats: RunnerStats = field(default_factory=RunnerStats)
    consumer: AIOKafkaConsumer | None = None
    applying: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Bumped by every seek: records fetched before a seek of their partition are stale.
    seeks: dict[int, int] = field(default_factory=dict)
    # Assigned partitions whose checkpoint could not be read yet (the run loop retries).
    unsought: set[int] = field(default_factory=set)
    _last_kafka_commit: float = 0.0

    @property
    def name(self) -> str:
        return self.projection.name

    def _tp(self, partition: int) -> TopicPartition:
        return TopicPartition(self.config.topic, partition)

    async def seek_to_checkpoints(self, partitions: Sequence[int]) -> None:
        assert self.consumer is not None
        async with self.engine.begin() as connection:
            stored = await read_checkpoints(connection, self.name, self.config.topic, partitions)
        for partition in partitions:
            self.positions[partition] = stored[partition]
            self.seeks[partition] = self.seeks.get(partition, 0) + 1
            self.unsought.discard(partition)
            self.consumer.seek(self._tp(partition), stored[partition])
            if partition in self.halted:
                self.consumer.pause(self._tp(partition))
            else:
                self.consumer.resume(self._tp(partition))
        _log.info(
            "%s: assigned partitions %s at %s",
            self.name,
            sorted(partitions),
            [stored[p] for p in sorted(partitions)],
        )

    def await_seek(self, partitions: Sequence[int], error: Exception) -> None:
        """Reading the checkpoints failed on assignment: pause, and let the loop retry."""
        _log.warning(
            "%s: could not read the checkpoints of partitions %s (%r); retrying",
            self.name,
            sorted(partitions),
            error,
        )
        self.unsought.update(partitions)
        for partition in partitions:
            self.positions.pop(partition, None)
            if self.consumer is not None:
                self.consumer.pause(self._tp(partition))

    async def _retry_seeks(self, stop: asyncio.Event) -> None:
        delay = 0.2
        while self.unsought and not stop.is_set():
            async with self.applying:
                pending = sorted(self.unsought)
                try:
                    await self.seek_to_checkpoints(pending)
                    return
                except Exception as error:
                    self.await_seek(pending, error)
            await asyncio.sleep(delay)  # back-off while the database is away
            delay = min(delay * 2, 5.0)

    async def run(self, stop: asyncio.Event) -> None:
        """Consume and apply until ``stop`` is set; then leave the group cleanly."""
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.config.bootstrap_servers,
            group_id=f"{self.config.group_prefix}.{self.name}",
            group_instance_id=(
                f"{self.config.instance_id}.{self.name}" if self.config.instance_id else None
            ),
            isolation_level="read_committed",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 * 1024 * 1024,
            fetch_max_bytes=32 * 1024 * 1024,
        )
        await self.consumer.start()
        self.consumer.subscribe([self.config.topic], listener=_Listener(self))
        try:
            while not stop.is_set():
                if self.unsought:
                    await self._retry_seeks(stop)
                # Taken before the fetch: a seek during or after it makes its records stale.
                generations = dict(self.seeks)
                fetched = await self.consumer.getmany(
                    timeout_ms=self.config.batch_wait_ms, max_records=self.config.batch_max_records
                )
                if fetched:
                    await self._apply_with_retry(fetched, stop, generations)
        finally:
            # Leaves the group: the partitions move to the other instances at once.
            await self.consumer.stop()
            self.consumer = None

    async def _apply_with_retry(
        self,
        fetched: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]],
        stop: asyncio.Event,
        generations: dict[int, int],
    ) -> None:
        delay = 0.2
        while True:
            try:
                await self.apply(fetched, generations)
                await self._commit_kafka_offsets()
                return
            except (DBAPIError, OSError) as error:
                if stop.is_set() or not _transient(error):
                    raise
                _log.warning(
                    "%s: database unavailable (%s); retrying the batch in %.1fs",
                    self.name,
                    type(error).__name__,
                    delay,
                )
                await asyncio.sleep(delay)  # back-off while the database is away
                delay = min(delay * 2, 5.0)

    async def apply(
        self,
        fetched: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]],
        generations: dict[int, int] | None = None,
    ) -> None:
        """Apply one fetched batch and advance the checkpoints, in one transaction.

        A checkpoint moved by another instance (``StaleCheckpoint``) rolls the whole batch
        back; the partitions are then re-read from the stored checkpoints. ``generations``
        (the seek counters when the fetch began) drops partitions sought since: their records
        may predate the seek.
        """
        async with self.applying:
            if generations is not None:
                fetched = self._without_stale(fetched, generations)
            try:
                await self._apply(fetched)
            except StaleCheckpoint as stale:
                self.stats.stale_batches += 1
                _log.warning("%s: %s; re-seeking to the stored checkpoints", self.name, stale)
                await self.seek_to_checkpoints(
                    [tp.partition for tp in fetched if tp.partition in self.positions]
                )

    def _without_stale(
        self,
        fetched: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]],
        generations: dict[int, int],
    ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        """Drop the records of partitions sought since the fetch began, and fetch them again.

        The consumer's position has already moved past the dropped records, so it is put back
        at the checkpoint: otherwise the next fetch would start after them.
        """
        fresh = {}
        for tp, records in fetched.items():
            if self.seeks.get(tp.partition) == generations.get(tp.partition):
                fresh[tp] = records
            elif tp.partition in self.positions and self.consumer is not None:
                self.consumer.seek(tp, self.positions[tp.partition])
        return fresh

    async def _apply(
        self,
        fetched: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]],
    ) -> None:
        batch: list[Applied] = []
        moves: dict[int, tuple[int, int]] = {}
        for tp, records in fetched.items():
            expected = self.positions.get(tp.partition)
            if expected is None or tp.partition in self.halted:
                continue  # revoked or halted meanwhile: not ours to apply
            applied_until = expected
            for record in records:
                if record.offset < expected:
                    continue
                try:
                    sealed, event = envelope.decode(record.value)
                except envelope.UndecodableEvent as error:
                    self._halt(tp.partition, record.offset, None, str(error))
                    break
                batch.append(Applied(sealed, event, tp.partition, record.offset))
                applied_until = record.offset + 1
            if applied_until > expected:
                moves[tp.partition] = (expected, applied_until)
        committed = await self._commit(batch, moves)
        for partition, (_, new) in committed.items():
            self.positions[partition] = new
        self.stats.batches += 1
        self.stats.events += sum(
            1 for a in batch if a.offset < committed.get(a.partition, (0, 0))[1]
        )

    async def _commit(
        self, batch: list[Applied], moves: dict[int, tuple[int, int]]
    ) -> dict[int, tuple[int, int]]:
        """Apply the batch in one transaction; returns the checkpoint moves that committed.

        An event the fold refuses halts its partition there and the rest is retried. When the
        database refuses the batch (a value it cannot store), the batch is re-applied one
        event at a time to find that event, whose partition then halts at it.
        """
        while moves:
            try:
                await self._transaction(batch, moves)
                return moves
            except _FoldFailed as failed:
                batch, moves = self._without_halted(failed, batch, moves)
            except DBAPIError as error:
                if _transient(error):
                    raise
                return await self._one_by_one(batch, moves)
        return {}

    async def _one_by_one(
        self, batch: list[Applied], moves: dict[int, tuple[int, int]]
    ) -> dict[int, tuple[int, int]]:
        committed = {}
        for partition, (expected, _) in moves.items():
            position = expected
            for applied in [a for a in batch if a.partition == partition]:
                try:
                    await self._transaction([applied], {partition: (position, applied.offset + 1)})
                except _FoldFailed as failed:
                    self._halt(partition, applied.offset, applied.envelope.order_id, failed.reason)
                    break
                except DBAPIError as error:
                    if _transient(error):
                        raise
                    reason = f"the database refused it: {error.orig}"
                    self._halt(partition, applied.offset, applied.envelope.order_id, reason)
                    break
                position = applied.offset + 1
            if position > expected:
                committed[partition] = (expected, position)
        return committed

    async def _transaction(self, batch: list[Applied], moves: dict[int, tuple[int, int]]) -> None:
        async with self.engine.begin() as connection:
            await advance_checkpoints(connection, self.name, self.config.topic, moves)
            state = await self.projection.load(connection, batch)
            for applied in batch:
                try:
                    self.projection.fold(state, applied)
                except Exception as error:  # a handler bug must halt, not vanish
                    raise _FoldFailed(applied, f"{type(error).__name__}: {error}") from error
            self.stats.rows_written += await store(connection, state)

    def _without_halted(
        self,
        failed: _FoldFailed,
        batch: list[Applied],
        moves: dict[int, tuple[int, int]],
    ) -> tuple[list[Applied], dict[int, tuple[int, int]]]:
        """Halt the failed event's partition there; keep the rest of the batch."""
        bad = failed.applied
        self._halt(bad.partition, bad.offset, bad.envelope.order_id, failed.reason)
        kept = [a for a in batch if a.partition != bad.partition or a.offset < bad.offset]
        moves = dict(moves)
        expected = moves.pop(bad.partition)[0]
        if bad.offset > expected:
            moves[bad.partition] = (expected, bad.offset)
        return kept, moves

    def _halt(self, partition: int, offset: int, order_id: str | None, reason: str) -> None:
        halt = Halt(partition, offset, order_id, reason)
        self.halted[partition] = halt
        if self.consumer is not None:
            self.consumer.pause(self._tp(partition))
        _log.error(
            "%s: HALTED partition %d at offset %d (order %s): %s. Fix the cause, then "
            "restart the projector, or park the event (orders projections park)",
            self.name,
            partition,
            offset,
            order_id or "?",
            reason,
        )

    async def _commit_kafka_offsets(self) -> None:
        """Informational only: lets Kafka tools show lag. Correctness never reads them."""
        now = time.monotonic()
        if (
            self.consumer is None
            or now - self._last_kafka_commit < self.config.commit_kafka_offsets_every
        ):
            return
        self._last_kafka_commit = now
        assigned = self.consumer.assignment()
        offsets = {
            self._tp(p): offset for p, offset in self.positions.items() if self._tp(p) in assigned
        }
        if offsets:
            with contextlib.suppress(KafkaError):
                await self.consumer.commit(offsets)


def runner_config(settings: Settings) -> RunnerConfig:
    return RunnerConfig(
        bootstrap_servers=settings.require_kafka(),
        topic=settings.topic,
        group_prefix=settings.projection_group_prefix,
        instance_id=settings.projector_instance_id,
    )


async def run_projector(
    settings: Settings, engine: AsyncEngine, stop: asyncio.Event, *, only: list[str] | None = None
) -> None:
    """Run the chosen projections (all by default), each in its own consumer group."""
    config = runner_config(settings)
    runners = [ProjectionRunner(p, engine, config) for p in catalog.select(only)]
    _log.info("projector running: %s on topic %s", ", ".join(r.name for r in runners), config.topic)
    await asyncio.gather(*(runner.run(stop) for runner in runners))


def oracle(projection: Projection, events: Sequence[Applied]) -> State:
    """The read model a pure fold of ``events`` gives, from empty: what the tables must hold."""
    state = State(projection.tables)
    for applied in events:
        projection.fold(state, applied)
    return state
