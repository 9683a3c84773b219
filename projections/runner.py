"""The projections runner: consume and decode once, apply each projection in ONE transaction.

Per batch, each projection's rows and checkpoints commit in one Postgres transaction; the
projections' transactions run side by side on their own connections (Postgres writes one
projection's rows while this process folds another's), and the next batch is fetched and
decoded meanwhile.

Exactly-once effects (design.md, invariant 6):

* The checkpoint table holds, per (projection, version, topic, partition), the offset of the
  next event to apply. It is the only position that counts: on assignment the consumer seeks
  to the lowest checkpoint of the partition, and each projection skips what it already has.
  Kafka's committed offsets are written afterwards for lag tools only.
* A projection's rows of a batch and its checkpoints commit together. Each update is a
  compare-and-set on the offset this instance expects; an instance that lost a partition in a
  rebalance (a zombie) matches fewer rows, so its whole transaction rolls back and it re-seeks.
* Each batch also locks its versions' registry rows (``FOR SHARE``): a rebuild switches
  versions between batches, and a runner that finds its version retired follows the new one.
* aiokafka runs the rebalance listener in its own task, concurrently with the loop; the
  listener waits for the batch in flight through a lock held only around database work,
  never around a Kafka call, so it cannot wait on itself.

An event a projection cannot apply halts that projection in that partition (invariant 7): the
reason is stored (``orders projections status``) and logged; the other projections and
partitions go on. Events of an order an operator parked are set aside with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass, field
from datetime import datetime
from typing import Any, Protocol

import asyncpg
import msgspec
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from projections.models import catalog
from projections.projection import Applied, Db, Projection, State, begin, pg_text, store
from projections.versions import Target, building, live_targets
from service.infra.database import EncodingRefused, connection_lost, sqlstate
from service.kernel import envelope
from service.kernel.errors import Conflict
from service.kernel.events import DomainEvent
from service.kernel.settings import Settings

_log = logging.getLogger(__name__)


class Record(Protocol):
    """What the runner reads of a Kafka record (aiokafka's ``ConsumerRecord`` has it)."""

    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


class _Kept(msgspec.Struct, frozen=True, gc=False):
    """A fetched record as the runner keeps it until its batch is applied. Never tracked by
    the cyclic garbage collector: a batch's records live about a second, and every young
    collection meanwhile traversed those still alive (aiokafka's records, and even a
    NamedTuple of these values: only plain tuples are ever untracked)."""

    offset: int
    key: bytes | None
    value: bytes | None


Fetched = dict[TopicPartition, Sequence[Record]]
# A record's decoded envelope and event, or why it does not decode.
Decoded = tuple[envelope.Envelope, DomainEvent] | envelope.UndecodableEvent

# Records taken from the consumer (and decoded) at a time: the event loop gets a turn between
# chunks, so the batch in flight keeps talking to Postgres while the next one is decoded.
FETCH_CHUNK = 2_000


def transient(error: BaseException) -> bool:
    """A database error worth retrying: lost connection, deadlock, shutdown, no resources.

    A lost connection (``connection_lost``) includes one left out of step by a server that
    went away mid-statement: ``begin`` discards it, and the retry gets a fresh one."""
    return connection_lost(error) or sqlstate(error)[:2] in {"40", "53", "57"}


class StaleCheckpoint(Conflict):
    """A stored checkpoint is not where this instance expected: another instance moved it."""


class _ConsumerBroken(Exception):
    """The Kafka consumer failed in a way only a new consumer recovers from."""


class VersionsChanged(Exception):
    """A version this runner applies to is no longer in the state it runs for (a switch)."""


@dataclass(frozen=True)
class Halt:
    projection: str
    partition: int
    offset: int
    order_id: str | None
    reason: str


@dataclass
class Group:
    """The events of one partition that one projection version applies in a transaction."""

    target: Target
    partition: int
    expected: int
    new: int
    events: list[Applied] = field(default_factory=list)

    @property
    def last_event_at(self) -> datetime | None:
        return self.events[-1].envelope.occurred_at if self.events else None


class _FoldFailed(Exception):
    def __init__(self, target: Target, applied: Applied, reason: str) -> None:
        super().__init__(reason)
        self.target = target
        self.applied = applied
        self.reason = reason


@dataclass
class _Fetch:
    """A batch as the consumer handed it over, decoded.

    ``generations`` holds each partition's seek counter at the moment its records were handed
    over: a seek since then makes them stale (the seek has already moved the consumer).
    """

    records: dict[TopicPartition, list[_Kept]] = field(default_factory=dict)
    generations: dict[int, int] = field(default_factory=dict)
    decoded: dict[TopicPartition, list[Decoded]] = field(default_factory=dict)


def _decode(value: bytes | None) -> Decoded:
    try:
        return envelope.decode(value)
    except envelope.UndecodableEvent as error:
        return error


@dataclass(kw_only=True)
class RunnerConfig:
    bootstrap_servers: str
    topic: str
    group_prefix: str = "orders-projection"
    instance_id: str | None = None
    batch_max_records: int = 20_000
    batch_wait_ms: int = 50
    max_partition_fetch_bytes: int = 4 * 1024 * 1024
    commit_kafka_offsets_every: float = 1.0
    # The longest wait for that informational commit: while the broker is away aiokafka's
    # commit never fails (it keeps looking for the group coordinator).
    commit_kafka_offsets_timeout: float = 2.0
    # Append-only rows by binary COPY: less CPU in all, more of it here (see ``store``).
    copy_append_only: bool = False
    # How often a halted projection looks for an operator's park (or idle catch-up runs).
    housekeeping_every: float = 0.5


@dataclass
class RunnerStats:
    batches: int = 0
    events: int = 0
    rows_written: int = 0
    stale_batches: int = 0


async def read_checkpoints(
    connection: asyncpg.Connection, targets: Sequence[Target], topic: str, partitions: Sequence[int]
) -> dict[tuple[str, int], int]:
    """(projection, partition) -> stored next offset; offset-0 rows for partitions never seen."""
    names = [t.name for t in targets for _ in partitions]
    versions = [t.version for t in targets for _ in partitions]
    numbers = [p for _ in targets for p in partitions]
    await connection.execute(
        "INSERT INTO projection_checkpoints (projection, version, topic, partition, next_offset) "
        "SELECT n, v, $4, p, 0 FROM unnest($1::text[], $2::int[], $3::int[]) AS u(n, v, p) "
        "ON CONFLICT DO NOTHING",
        names,
        versions,
        numbers,
        topic,
    )
    rows = await connection.fetch(
        "SELECT c.projection, c.partition, c.next_offset FROM projection_checkpoints c "
        "JOIN unnest($1::text[], $2::int[], $3::int[]) AS u(n, v, p) "
        "ON c.projection = u.n AND c.version = u.v AND c.partition = u.p WHERE c.topic = $4",
        names,
        versions,
        numbers,
        topic,
    )
    return {(row["projection"], row["partition"]): row["next_offset"] for row in rows}


async def advance_checkpoints(
    connection: asyncpg.Connection, topic: str, groups: Sequence[Group]
) -> None:
    """Compare-and-set each group's checkpoint from ``expected`` to ``new``, in one statement.

    Raises ``StaleCheckpoint`` unless every checkpoint was at the expected offset.
    """
    moved = await connection.fetch(
        "UPDATE projection_checkpoints AS c SET next_offset = m.new, "
        "last_event_at = COALESCE(m.at, c.last_event_at), updated_at = now() "
        "FROM unnest($1::text[], $2::int[], $3::int[], $4::int8[], $5::int8[], $6::timestamptz[])"
        " AS m(projection, version, partition, expected, new, at) "
        "WHERE c.projection = m.projection AND c.version = m.version AND c.topic = $7 "
        "AND c.partition = m.partition AND c.next_offset = m.expected "
        "RETURNING c.projection, c.partition",
        [g.target.name for g in groups],
        [g.target.version for g in groups],
        [g.partition for g in groups],
        [g.expected for g in groups],
        [g.new for g in groups],
        [g.last_event_at for g in groups],
        topic,
    )
    if len(moved) != len(groups):
        done = {(row["projection"], row["partition"]) for row in moved}
        missed = sorted((g.target.name, g.partition) for g in groups)
        raise StaleCheckpoint(
            f"checkpoints {[m for m in missed if m not in done]} were moved by another instance"
        )


async def parked_orders(
    connection: asyncpg.Connection, targets: Sequence[Target], order_ids: Iterable[str]
) -> set[tuple[str, str]]:
    """(projection, order id) of the given orders that an operator parked; locked FOR SHARE.

    Order ids as stored (``pg_text``)."""
    versions = ([t.name for t in targets], [t.version for t in targets])
    # Usually no order of these versions is parked: one cheap look spares sending every id.
    any_parked = await connection.fetchval(
        "SELECT EXISTS (SELECT FROM parked_orders p JOIN unnest($1::text[], $2::int[]) "
        "AS t(n, v) ON p.projection = t.n AND p.version = t.v)",
        *versions,
    )
    wanted = list({pg_text(order_id) for order_id in order_ids}) if any_parked else []
    if not wanted:
        return set()
    rows = await connection.fetch(
        "SELECT p.projection, p.order_id FROM parked_orders p "
        "JOIN unnest($1::text[], $2::int[]) AS t(n, v) ON p.projection = t.n AND p.version = t.v "
        "WHERE p.order_id = ANY($3::text[]) FOR SHARE OF p",
        *versions,
        wanted,
    )
    return {(row["projection"], row["order_id"]) for row in rows}


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, runner: ProjectionRunner) -> None:
        self.runner = runner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        async with self.runner.applying:
            for tp in revoked:
                self.runner.forget(tp.partition)
        if revoked:
            _log.info(
                "%s: partitions %s revoked",
                self.runner.label,
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
    """Runs projections from one consumer: each event decoded once; per batch, one transaction
    per projection, side by side.

    ``building=False`` follows each projection's live version (and moves on when a rebuild
    switches versions); ``building=True`` fills the versions a rebuild is building, and stops
    once they are no longer building.
    """

    projections: Sequence[Projection]
    engine: AsyncEngine
    config: RunnerConfig
    building: bool = False
    targets: list[Target] = field(default_factory=list)
    # partition -> projection name -> next offset to apply (the stored checkpoint)
    positions: dict[int, dict[str, int]] = field(default_factory=dict)
    halted: dict[tuple[str, int], Halt] = field(default_factory=dict)
    stats: RunnerStats = field(default_factory=RunnerStats)
    consumer: AIOKafkaConsumer | None = None
    applying: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Bumped by every seek: records fetched before a seek of their partition are stale.
    seeks: dict[int, int] = field(default_factory=dict)
    # Assigned partitions whose checkpoint could not be read yet (the run loop retries).
    unsought: set[int] = field(default_factory=set)
    # Halts stored in the database, to clear once their partition moves past them.
    stored_halts: dict[tuple[str, int], int] = field(default_factory=dict)
    finished: bool = False
    _last_kafka_commit: float = 0.0
    _last_housekeeping: float = 0.0

    @property
    def label(self) -> str:
        names = "+".join(sorted(p.name for p in self.projections))
        return f"{names}{' (rebuild)' if self.building else ''}"

    @property
    def group_id(self) -> str:
        names = "+".join(sorted(p.name for p in self.projections))
        kind = "rebuild." if self.building else ""
        return f"{self.config.group_prefix}.{kind}{names}"

    def _tp(self, partition: int) -> TopicPartition:
        return TopicPartition(self.config.topic, partition)

    async def load_targets(self) -> None:
        """The versions to apply to: the live ones, or those still being built."""
        async with begin(self.engine) as connection:
            if not self.building:
                self.targets = await live_targets(connection, self.projections)
                return
            found = [await building(connection, p) for p in self.projections]
        targets = [t for t in found if t is not None]
        if not targets:
            names = ", ".join(p.name for p in self.projections)
            raise VersionsChanged(f"no version of {names} is being built")
        self.targets = targets

    # -- positions ------------------------------------------------------------------------

    def forget(self, partition: int) -> None:
        self.positions.pop(partition, None)
        self.unsought.discard(partition)
        for key in [k for k in self.halted if k[1] == partition]:
            del self.halted[key]

    def _reposition(self, partition: int) -> None:
        """Seek to the lowest checkpoint of the projections not halted there (or pause)."""
        assert self.consumer is not None
        self.seeks[partition] = self.seeks.get(partition, 0) + 1
        going = [
            offset
            for name, offset in self.positions.get(partition, {}).items()
            if (name, partition) not in self.halted
        ]
        if going:
            self.consumer.seek(self._tp(partition), min(going))
            self.consumer.resume(self._tp(partition))
        else:
            self.consumer.pause(self._tp(partition))

    async def seek_to_checkpoints(self, partitions: Sequence[int]) -> None:
        """Read the stored checkpoints (and halts) of ``partitions`` and seek there."""
        assert self.consumer is not None
        async with begin(self.engine) as connection:
            stored = await read_checkpoints(connection, self.targets, self.config.topic, partitions)
            halts = await connection.fetch(
                'SELECT projection, partition, "offset" FROM projection_halts h '
                "JOIN unnest($1::text[], $2::int[]) AS t(n, v) "
                "ON h.projection = t.n AND h.version = t.v "
                "WHERE h.topic = $3 AND h.partition = ANY($4::int[])",
                [t.name for t in self.targets],
                [t.version for t in self.targets],
                self.config.topic,
                list(partitions),
            )
        for partition in partitions:
            # A stored halt is tried again (the cause may be fixed); it is cleared once passed.
            for key in [k for k in self.halted if k[1] == partition]:
                del self.halted[key]
            self.positions[partition] = {t.name: stored[(t.name, partition)] for t in self.targets}
            self.unsought.discard(partition)
            self._reposition(partition)
        for row in halts:
            self.stored_halts[(row["projection"], row["partition"])] = row["offset"]
        _log.info(
            "%s: assigned partitions %s at %s",
            self.label,
            sorted(partitions),
            [self.positions[p] for p in sorted(partitions)],
        )

    def await_seek(self, partitions: Sequence[int], error: Exception) -> None:
        """Reading the checkpoints failed on assignment: pause, and let the loop retry."""
        _log.warning(
            "%s: could not read the checkpoints of partitions %s (%r); retrying",
            self.label,
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

    # -- the loop -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Consume and apply until ``stop`` is set (or, rebuilding, the build is over).

        A consumer that breaks (the broker went away mid-coordination) is replaced after a
        back-off: the new one joins the group and seeks to the stored checkpoints again.
        """
        await self.load_targets()
        delay = 0.5
        while not stop.is_set() and not self.finished:
            try:
                await self._consume(stop)
            except _ConsumerBroken as broken:
                _log.warning(
                    "%s: the Kafka consumer broke (%r); a new one in %.1fs",
                    self.label,
                    broken.__cause__,
                    delay,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 10.0)

    async def _until_topic_exists(self, consumer: AIOKafkaConsumer, stop: asyncio.Event) -> None:
        if self.config.topic not in await consumer.topics():
            _log.info("%s: waiting for topic %s to exist", self.label, self.config.topic)
        while self.config.topic not in await consumer.topics() and not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)

    def _new_consumer(self) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            bootstrap_servers=self.config.bootstrap_servers,
            group_id=self.group_id,
            group_instance_id=(
                f"{self.config.instance_id}.{self.group_id}" if self.config.instance_id else None
            ),
            isolation_level="read_committed",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=self.config.max_partition_fetch_bytes,
            fetch_max_bytes=max(32 * 1024 * 1024, self.config.max_partition_fetch_bytes),
            metadata_max_age_ms=30_000,  # notice new partitions within half a minute
        )

    async def _consume(self, stop: asyncio.Event) -> None:
        consumer = self._new_consumer()
        try:
            await consumer.start()
        except KafkaError as error:
            raise _ConsumerBroken from error
        self.consumer = consumer
        try:
            await self._until_topic_exists(consumer, stop)
        except KafkaError as error:
            raise _ConsumerBroken from error
        # Subscribing before the topic exists would join the group with no partitions, and a
        # static member (instance id) keeps that empty assignment when it rejoins.
        consumer.subscribe([self.config.topic], listener=_Listener(self))
        _log.info("%s: applying to %s", self.label, ", ".join(map(str, self.targets)))
        pending: asyncio.Future[_Fetch] | None = None
        try:
            while not stop.is_set() and not self.finished:
                if self.unsought:
                    await self._retry_seeks(stop)
                batch = await (pending or self._fetch(consumer))
                # The next batch is fetched and decoded while this one's transactions run.
                pending = asyncio.ensure_future(self._fetch(consumer)) if batch.records else None
                await self._with_retry(
                    stop, self.apply, batch.records, batch.generations, batch.decoded
                )
                if time.monotonic() - self._last_housekeeping >= self.config.housekeeping_every:
                    await self._with_retry(stop, self.housekeeping, pending is None)
                    self._last_housekeeping = time.monotonic()
                await self._commit_kafka_offsets(stop)
        finally:
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
            # Leaves the group: the partitions move to the other instances at once.
            async with self.applying:
                self.consumer = None
                for partition in list(self.positions):
                    self.forget(partition)
            await _stop_consumer(consumer)

    async def _fetch(self, consumer: AIOKafkaConsumer) -> _Fetch:
        """Up to ``batch_max_records`` records, decoded, in chunks of ``FETCH_CHUNK``."""
        batch = _Fetch()
        wait_ms = self.config.batch_wait_ms
        count = 0
        while count < self.config.batch_max_records:
            try:
                chunk = await consumer.getmany(
                    timeout_ms=wait_ms,
                    max_records=min(FETCH_CHUNK, self.config.batch_max_records - count),
                )
            except Exception as error:  # aiokafka re-raises its coordinator's failures here
                raise _ConsumerBroken from error
            if not chunk:
                break
            wait_ms = 0  # then only what is already buffered
            for tp, fetched in chunk.items():
                generation = self.seeks.get(tp.partition, 0)
                records = [_Kept(r.offset, r.key, r.value) for r in fetched]
                decoded = [_decode(record.value) for record in records]
                if tp in batch.records and batch.generations[tp.partition] == generation:
                    batch.records[tp].extend(records)
                    batch.decoded[tp].extend(decoded)
                else:  # first records of the partition, or sought since its earlier ones
                    batch.records[tp] = records
                    batch.decoded[tp] = decoded
                    batch.generations[tp.partition] = generation
                count += len(records)
        return batch

    async def _with_retry(self, stop: asyncio.Event, step: Any, *args: Any) -> None:
        delay = 0.2
        while True:
            try:
                await step(*args)
                return
            except VersionsChanged as changed:
                await self._follow_versions(changed)
                return
            except Exception as error:
                if stop.is_set() or not transient(error):
                    raise
                _log.warning(
                    "%s: database unavailable (%s); retrying in %.1fs",
                    self.label,
                    type(error).__name__,
                    delay,
                )
                await asyncio.sleep(delay)  # back-off while the database is away
                delay = min(delay * 2, 5.0)

    async def _follow_versions(self, changed: VersionsChanged) -> None:
        """A rebuild switched versions: a live runner follows the new ones; a builder goes on
        with the versions still being built, and is done when none is left."""
        _log.info("%s: %s; reloading the versions", self.label, changed)
        async with self.applying:
            try:
                await self.load_targets()
            except VersionsChanged as over:
                _log.info("%s: %s; the build is over", self.label, over)
                self.finished = True
                return
            self.halted.clear()
            self.stored_halts.clear()
            if self.positions:
                await self.seek_to_checkpoints(sorted(self.positions))

    async def apply(
        self,
        fetched: Fetched,
        generations: dict[int, int] | None = None,
        decoded: dict[TopicPartition, list[Decoded]] | None = None,
    ) -> None:
        """Apply one fetched batch: per projection, its rows and checkpoints in ONE transaction.

        The projections' transactions run concurrently on their own connections, so Postgres
        writes one projection's rows while this process folds another's. Each stands alone:
        its checkpoints move with its rows, and a query waits on the checkpoint of the
        projection it reads.

        A checkpoint moved by another instance (``StaleCheckpoint``) rolls that projection's
        batch back; its partitions are then re-read from the stored checkpoints (the other
        projections skip what they already have). ``generations`` (the seek counters when the
        records were handed over) drops partitions sought since: their records predate the seek.
        ``decoded`` holds the records' decoded events when the fetch decoded them already.
        """
        if not fetched:
            return
        async with self.applying:
            if generations is not None:
                fetched = self._without_stale(fetched, generations)
            groups, raw, halts = self._groups(fetched, decoded or {})
            by_target: dict[str, list[Group]] = defaultdict(list)
            for group in groups:
                by_target[group.target.name].append(group)
            halted_before = dict(self.halted)
            outcomes = await asyncio.gather(
                *(self._commit(part, raw) for part in by_target.values()), return_exceptions=True
            )
            failed: set[str] = set()
            errors: list[BaseException] = []
            for name, outcome in zip(by_target, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    failed.add(name)
                    errors.append(outcome)
                else:
                    self._moved(outcome)
            self.stats.batches += 1
            if errors:
                # Halts a failed projection found meanwhile are found again when retried.
                for key in self.halted.keys() ^ halted_before.keys():
                    if key[0] in failed:
                        if key in halted_before:
                            self.halted[key] = halted_before[key]
                        else:
                            del self.halted[key]
                        self._reposition(key[1])
                stale = [e for e in errors if isinstance(e, StaleCheckpoint)]
                if len(stale) < len(errors):
                    raise next(e for e in errors if not isinstance(e, StaleCheckpoint))
                self.stats.stale_batches += 1
                _log.warning("%s: %s; re-seeking to the stored checkpoints", self.label, stale[0])
                await self.seek_to_checkpoints(
                    [tp.partition for tp in fetched if tp.partition in self.positions]
                )
                return
            for halt in halts:
                key = (halt.projection, halt.partition)
                if key not in self.halted and self.positions[halt.partition][key[0]] == halt.offset:
                    self._halt(self._target(halt.projection), *astuple(halt)[1:])

    def _moved(self, committed: Sequence[Group]) -> None:
        for group in committed:
            self.positions[group.partition][group.target.name] = group.new
            self.stats.events += len(group.events)

    def _without_stale(self, fetched: Fetched, generations: dict[int, int]) -> Fetched:
        """Drop the records of partitions sought since they were handed over.

        The seek has already put the consumer where that partition must go on from.
        """
        return {
            tp: records
            for tp, records in fetched.items()
            if self.seeks.get(tp.partition, 0) == generations.get(tp.partition)
        }

    def _groups(
        self, fetched: Fetched, decoded: dict[TopicPartition, list[Decoded]]
    ) -> tuple[list[Group], dict[tuple[int, int], bytes], list[Halt]]:
        """Decode each record once; split the batch by (projection, partition).

        A projection takes the records from its checkpoint on, up to the first it cannot
        decode: its checkpoint moves to that record, where it halts once the batch commits.
        The others go on past that record.
        """
        groups = []
        halts = []
        raw: dict[tuple[int, int], bytes] = {}
        for tp, records in fetched.items():
            partition = tp.partition
            positions = self.positions.get(partition)
            if positions is None:
                continue  # revoked meanwhile: not ours to apply
            going = [
                Group(t, partition, positions[t.name], positions[t.name])
                for t in self.targets
                if (t.name, partition) not in self.halted
            ]
            if not going:
                continue
            lowest = min(group.expected for group in going)
            applied: list[Applied] = []
            poison: list[tuple[int, str | None, str]] = []
            done = decoded.get(tp)
            for i, record in enumerate(records):
                if record.offset < lowest:
                    continue
                result = done[i] if done is not None else _decode(record.value)
                if isinstance(result, envelope.UndecodableEvent):
                    key = record.key.decode(errors="replace") if record.key else None
                    poison.append((record.offset, key, str(result)))
                    continue
                assert record.value is not None  # it decoded
                raw[(partition, record.offset)] = record.value
                applied.append(Applied(result[0], result[1], partition, record.offset))
            for group in going:
                bad = next((p for p in poison if p[0] >= group.expected), None)
                if group.expected == lowest and bad is None:
                    group.events = applied  # the usual case: shared, never mutated
                else:
                    until = bad[0] if bad is not None else float("inf")
                    group.events = [a for a in applied if group.expected <= a.offset < until]
                if group.events:
                    group.new = group.events[-1].offset + 1
                if bad is not None:
                    # Every record between the checkpoint and ``bad`` was in this fetch.
                    group.new = bad[0]
                    halts.append(Halt(group.target.name, partition, *bad))
                if group.new > group.expected:
                    groups.append(group)
        return groups, raw, halts

    # -- transactions ---------------------------------------------------------------------

    async def _commit(self, groups: list[Group], raw: dict[tuple[int, int], bytes]) -> list[Group]:
        """Apply the groups; returns those that committed (some perhaps cut short by a halt).

        ``groups`` are one projection's. All in one transaction first. An event the fold
        refuses halts the projection's partition there and the rest is retried. When the
        database refuses the batch (a value it cannot store, or asyncpg cannot encode), the
        groups are split in halves until the event is found, whose partition then halts at it.
        """
        committed: list[Group] = []
        pending: list[list[Group]] = [groups]
        while pending:
            part = [g for g in pending.pop(0) if g.new > g.expected and self._before_halt(g)]
            if not part:
                continue
            try:
                await self._transaction(part, raw)
                committed.extend(part)
            except _FoldFailed as failed:
                pending.insert(0, self._cut_at(failed, part))
            except (asyncpg.PostgresError, DBAPIError, EncodingRefused) as error:
                if transient(error):
                    raise
                halves = _halves(part)
                if halves is None:
                    bad = part[0]
                    if not bad.events:
                        raise  # a bare checkpoint move refused: not an event's fault
                    first = bad.events[0]
                    reason = f"the database refused it: {error}"
                    self._halt(
                        bad.target, bad.partition, first.offset, first.envelope.order_id, reason
                    )
                    if first.offset > bad.expected:  # only markers before it: move up to it
                        move = Group(bad.target, bad.partition, bad.expected, first.offset)
                        pending.insert(0, [move])
                else:
                    pending[0:0] = halves
        return committed

    def _before_halt(self, group: Group) -> bool:
        """Whether ``group`` ends at or before where its projection halted (if it did)."""
        halt = self.halted.get((group.target.name, group.partition))
        return halt is None or group.new <= halt.offset

    def _cut_at(self, failed: _FoldFailed, part: list[Group]) -> list[Group]:
        """Halt the failed event's projection and partition there; keep what came before."""
        bad = failed.applied
        self._halt(failed.target, bad.partition, bad.offset, bad.envelope.order_id, failed.reason)
        kept = []
        for group in part:
            if group.target.name == failed.target.name and group.partition == bad.partition:
                before = [a for a in group.events if a.offset < bad.offset]
                group = Group(group.target, group.partition, group.expected, bad.offset, before)
            kept.append(group)
        return kept

    async def _transaction(self, groups: list[Group], raw: dict[tuple[int, int], bytes]) -> None:
        targets = {g.target.name: g.target for g in groups}
        async with begin(self.engine) as connection:
            await self._check_versions(connection, list(targets.values()))
            await advance_checkpoints(connection, self.config.topic, groups)
            parked = await parked_orders(
                connection,
                list(targets.values()),
                (a.envelope.order_id for g in groups for a in g.events),
            )
            by_target: dict[str, list[Applied]] = defaultdict(list)
            set_aside: list[tuple[Target, Applied]] = []
            for group in groups:
                if not parked:
                    by_target[group.target.name].extend(group.events)
                    continue
                for applied in group.events:
                    if (group.target.name, pg_text(applied.envelope.order_id)) in parked:
                        set_aside.append((group.target, applied))
                    else:
                        by_target[group.target.name].append(applied)
            for name, events in by_target.items():
                target = targets[name]
                db = Db(connection, target.schema)
                state = await target.projection.load(db, events)
                _fold(target, state, events)
                self.stats.rows_written += await store(db, state, copy=self.config.copy_append_only)
            if set_aside:
                await _park(connection, self.config.topic, set_aside, raw)
            await self._clear_passed_halts(connection, groups)

    async def _check_versions(
        self, connection: asyncpg.Connection, targets: Sequence[Target]
    ) -> None:
        wanted = "building" if self.building else "live"
        rows = await connection.fetch(
            "SELECT projection, version, state FROM projection_versions "
            "WHERE projection = ANY($1::text[]) FOR SHARE",
            [t.name for t in targets],
        )
        states = {(row["projection"], row["version"]): row["state"] for row in rows}
        for target in targets:
            state = states.get((target.name, target.version))
            if state != wanted:
                raise VersionsChanged(f"{target} is {state or 'gone'}, no longer {wanted}")

    async def _clear_passed_halts(
        self, connection: asyncpg.Connection, groups: Sequence[Group]
    ) -> None:
        passed = [
            g
            for g in groups
            if (offset := self.stored_halts.get((g.target.name, g.partition))) is not None
            and g.new > offset
        ]
        if not passed:
            return
        await connection.execute(
            "DELETE FROM projection_halts h USING unnest($1::text[], $2::int[], $3::int[]) "
            "AS u(n, v, p) WHERE h.projection = u.n AND h.version = u.v AND h.partition = u.p "
            "AND h.topic = $4",
            [g.target.name for g in passed],
            [g.target.version for g in passed],
            [g.partition for g in passed],
            self.config.topic,
        )
        for group in passed:
            self.stored_halts.pop((group.target.name, group.partition), None)

    # -- halts ----------------------------------------------------------------------------

    def _halt(
        self, target: Target, partition: int, offset: int, order_id: str | None, reason: str
    ) -> None:
        self.halted[(target.name, partition)] = Halt(
            target.name, partition, offset, order_id, reason
        )
        if self.consumer is not None and all(
            (t.name, partition) in self.halted for t in self.targets
        ):
            self.consumer.pause(self._tp(partition))
        _log.error(
            "%s: HALTED partition %d at offset %d (order %s): %s. Fix the cause and restart "
            "the projector, or set the order aside: orders projections park %s --partition %d "
            "--offset %d",
            target,
            partition,
            offset,
            order_id or "?",
            reason,
            target.name,
            partition,
            offset,
        )

    async def housekeeping(self, idle: bool = True) -> None:
        """Store new halts, pick up parks, and (when ``idle``, no fetch in flight) move
        checkpoints past transaction markers."""
        async with self.applying:
            if self.halted:
                await self._sync_halts()
            if idle:
                await self._past_markers()

    async def _sync_halts(self) -> None:
        """Store new halts; a halt whose stored row an operator removed (a park) is lifted."""
        async with begin(self.engine) as connection:
            rows = await connection.fetch(
                'SELECT h.projection, h.partition, h."offset" FROM projection_halts h '
                "JOIN unnest($1::text[], $2::int[]) AS t(n, v) "
                "ON h.projection = t.n AND h.version = t.v WHERE h.topic = $3",
                [t.name for t in self.targets],
                [t.version for t in self.targets],
                self.config.topic,
            )
            stored = {(row["projection"], row["partition"]): row["offset"] for row in rows}
            for key, halt in list(self.halted.items()):
                if key in self.stored_halts and key not in stored:
                    await self._lift(connection, halt)
                elif stored.get(key) != halt.offset:
                    await _store_halt(
                        connection, self._target(halt.projection), self.config.topic, halt
                    )
                    self.stored_halts[key] = halt.offset

    def _target(self, name: str) -> Target:
        return next(t for t in self.targets if t.name == name)

    async def _lift(self, connection: asyncpg.Connection, halt: Halt) -> None:
        """An operator removed the halt (e.g. parked the event): resume from the checkpoint."""
        key = (halt.projection, halt.partition)
        target = self._target(halt.projection)
        stored = await read_checkpoints(connection, [target], self.config.topic, [halt.partition])
        del self.halted[key]
        self.stored_halts.pop(key, None)
        self.positions[halt.partition][halt.projection] = stored[key]
        _log.info("%s: partition %d resumes at offset %d", target, halt.partition, stored[key])
        self._reposition(halt.partition)

    async def _past_markers(self) -> None:
        """Move checkpoints over what only transaction markers fill, so lag can reach 0.

        After a transaction, the next readable record sits past its commit marker. Once the
        consumer has returned everything up to its position (the batch in flight is done), the
        offsets between a projection's checkpoint and that position hold no events for it.
        """
        if self.consumer is None:
            return
        assigned = self.consumer.assignment()
        groups = []
        for partition, positions in self.positions.items():
            tp = self._tp(partition)
            if tp not in assigned or partition in self.unsought:
                continue
            position = await self.consumer.position(tp)
            for target in self.targets:
                expected = positions.get(target.name)
                if (
                    expected is not None
                    and (target.name, partition) not in self.halted
                    and expected < position
                ):
                    groups.append(Group(target, partition, expected, position))
        if not groups:
            return
        try:
            async with begin(self.engine) as connection:
                await self._check_versions(connection, list({g.target for g in groups}))
                await advance_checkpoints(connection, self.config.topic, groups)
        except StaleCheckpoint:
            await self.seek_to_checkpoints(sorted({g.partition for g in groups}))
            return
        for group in groups:
            self.positions[group.partition][group.target.name] = group.new

    async def _commit_kafka_offsets(self, stop: asyncio.Event) -> None:
        """Informational only: lets Kafka tools show lag. Correctness never reads them.

        Skipped once stopping, and given up after ``commit_kafka_offsets_timeout``: during a
        broker outage the commit would otherwise hold the loop (and a SIGTERM) until the
        broker is back."""
        now = time.monotonic()
        if (
            self.consumer is None
            or stop.is_set()
            or now - self._last_kafka_commit < self.config.commit_kafka_offsets_every
        ):
            return
        self._last_kafka_commit = now
        assigned = self.consumer.assignment()
        offsets = {
            self._tp(p): min(offsets.values())
            for p, offsets in self.positions.items()
            if self._tp(p) in assigned and offsets
        }
        if offsets:
            with contextlib.suppress(KafkaError, TimeoutError):
                commit = self.consumer.commit(offsets)
                await asyncio.wait_for(commit, self.config.commit_kafka_offsets_timeout)
        # From the attempt's end: a commit that timed out does not come again at once, which
        # would hold every pass of the loop while the coordinator alone is away.
        self._last_kafka_commit = time.monotonic()


async def _stop_consumer(consumer: AIOKafkaConsumer) -> None:
    """Stop ``consumer`` (it leaves its group), whatever state the broker is in.

    With the broker away, aiokafka's ``stop`` lets out the CancelledError of a fetch request it
    cancelled itself (one sleeping out its retry back-off). That one is not for this task, and
    passed on it would end the runner as if cancelled: only a cancellation of this task is.
    """
    try:
        with contextlib.suppress(Exception):
            await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        # ``stop`` ended there, before closing its client (connections, metadata task), and
        # will not run again: close it, or each consumer replaced during an outage leaks one.
        with contextlib.suppress(Exception):
            await consumer._client.close()


def _fold(target: Target, state: State, events: Sequence[Applied]) -> None:
    fold = target.projection.fold
    for applied in events:
        try:
            fold(state, applied)
        except Exception as error:  # a handler bug must halt, not vanish
            raise _FoldFailed(target, applied, f"{type(error).__name__}: {error}") from error


async def _store_halt(
    connection: asyncpg.Connection, target: Target, topic: str, halt: Halt
) -> None:
    """Store ``halt`` for the status and ``park``; its order id and reason come from the log,
    so they may hold what Postgres text cannot (``pg_text``)."""
    await connection.execute(
        'INSERT INTO projection_halts (projection, version, topic, partition, "offset", '
        "order_id, reason) VALUES ($1, $2, $3, $4, $5, $6, $7) "
        "ON CONFLICT (projection, version, topic, partition) DO UPDATE SET "
        '"offset" = EXCLUDED."offset", order_id = EXCLUDED.order_id, '
        "reason = EXCLUDED.reason, halted_at = now()",
        target.name,
        target.version,
        topic,
        halt.partition,
        halt.offset,
        None if halt.order_id is None else pg_text(halt.order_id),
        pg_text(halt.reason),
    )


def _halves(part: list[Group]) -> list[list[Group]] | None:
    """Split a refused transaction in two, in order; None when it is down to one event."""
    if len(part) > 1:
        middle = len(part) // 2
        return [part[:middle], part[middle:]]
    group = part[0]
    if len(group.events) <= 1:
        return None
    middle = len(group.events) // 2
    split_at = group.events[middle].offset
    first = Group(group.target, group.partition, group.expected, split_at, group.events[:middle])
    second = Group(group.target, group.partition, split_at, group.new, group.events[middle:])
    return [[first], [second]]


async def _park(
    connection: asyncpg.Connection,
    topic: str,
    events: Sequence[tuple[Target, Applied]],
    raw: dict[tuple[int, int], bytes],
) -> None:
    """Set aside later events of parked orders, with the order (invariant 7)."""
    await connection.executemany(
        'INSERT INTO parked_events (projection, version, topic, partition, "offset", order_id, '
        "value, reason) VALUES ($1, $2, $3, $4, $5, $6, $7, 'its order is parked') "
        "ON CONFLICT DO NOTHING",
        [
            (
                target.name,
                target.version,
                topic,
                applied.partition,
                applied.offset,
                pg_text(applied.envelope.order_id),
                raw[(applied.partition, applied.offset)],
            )
            for target, applied in events
        ],
    )


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
    """Run the chosen projections (all by default), live versions, from one consumer."""
    config = runner_config(settings)
    runner = ProjectionRunner(catalog.select(only), engine, config)
    _log.info("projector running: %s on topic %s", runner.label, config.topic)
    await runner.run(stop)


def oracle(projection: Projection, events: Sequence[Applied]) -> State:
    """The read model a pure fold of ``events`` gives, from empty: what the tables must hold."""
    state = State(projection.tables)
    for applied in events:
        projection.fold(state, applied)
    return state
