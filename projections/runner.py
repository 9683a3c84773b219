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

The pieces: ``batches`` plans a batch and ``halts`` bisects a refused one (both pure),
``partitions`` keeps where the runner stands and decides seeks and halts (pure),
``consuming`` holds the Kafka consumer, ``bookkeeping`` the SQL. This module runs the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from sqlalchemy.ext.asyncio import AsyncEngine

from projections import consuming, metrics
from projections.applying import Applier, RunnerStats, VersionsChanged, targets_of, transient
from projections.batches import (
    Batch,
    Decoded,
    Fetched,
    Halt,
    HaltKey,
    Traced,
    plan,
    without_stale,
)
from projections.bookkeeping.checkpoints import StaleCheckpoint
from projections.bookkeeping.topics import checkpoint_reach, record_topic
from projections.halts import advice
from projections.identity import TopicReplaced, replaced
from projections.models import catalog
from projections.partitions import Partitions
from projections.projection import Projection, Target, begin
from service.infra.database import refused_by_environment, sqlstate
from service.infra.eventlog import topic_end_offsets
from service.infra.kafka_clients import KafkaTarget
from service.infra.topic import look_up_topic
from service.kernel.settings import Settings

_log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class RunnerConfig:
    kafka: KafkaTarget
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
    partitions: Partitions = field(default_factory=Partitions)
    stats: RunnerStats = field(default_factory=RunnerStats)
    consumer: AIOKafkaConsumer | None = None
    applying: asyncio.Lock = field(default_factory=asyncio.Lock)
    finished: bool = False
    telemetry: metrics.RunnerTelemetry = field(default_factory=metrics.RunnerTelemetry)
    _last_kafka_commit: float = 0.0
    _last_housekeeping: float = 0.0
    _applier: Applier = field(init=False)

    def __post_init__(self) -> None:
        self._applier = Applier(
            self.engine, self.config.topic, self.building, self.partitions, self.stats, self._halt
        )

    @property
    def positions(self) -> dict[int, dict[str, int]]:
        """partition -> projection name -> next offset to apply (the stored checkpoint)."""
        return self.partitions.positions

    @positions.setter
    def positions(self, positions: dict[int, dict[str, int]]) -> None:
        self.partitions.positions = positions

    @property
    def halted(self) -> dict[HaltKey, Halt]:
        return self.partitions.halted

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

    def _target(self, name: str) -> Target:
        return next(t for t in self.targets if t.name == name)

    async def load_targets(self) -> None:
        """The versions to apply to: the live ones, or those still being built."""
        self.targets = await targets_of(self.engine, self.projections, building=self.building)

    # -- positions ------------------------------------------------------------------------

    def forget(self, partition: int) -> None:
        self.partitions.forget(partition)

    def _reposition(self, partition: int) -> None:
        """Seek to the lowest checkpoint of the projections not halted there (or pause)."""
        assert self.consumer is not None
        offset = self.partitions.reposition(partition)
        if offset is None:
            self.consumer.pause(self._tp(partition))
        else:
            self.consumer.seek(self._tp(partition), offset)
            self.consumer.resume(self._tp(partition))

    async def seek_to_checkpoints(self, partitions: Sequence[int]) -> None:
        """Read the stored checkpoints (and halts) of ``partitions`` and seek there."""
        assert self.consumer is not None
        await self._applier.sought(self.targets, partitions)
        for partition in partitions:
            self._reposition(partition)
        _log.info(
            "%s: assigned partitions %s; %s",
            self.label,
            _spans(partitions),
            _checkpoint_summary({p: self.positions[p] for p in partitions}),
        )

    def await_seek(self, partitions: Sequence[int], error: Exception) -> None:
        """Reading the checkpoints failed on assignment: pause, and let the loop retry."""
        if refused_by_environment(error):
            _report_refusal(self.label, error)
        else:
            _log.warning(
                "%s: could not read the checkpoints of partitions %s (%r); retrying",
                self.label,
                sorted(partitions),
                error,
            )
        self.partitions.unreadable(partitions)
        if self.consumer is not None:
            for partition in partitions:
                self.consumer.pause(self._tp(partition))

    async def _retry_seeks(self, stop: asyncio.Event) -> None:
        delay = 0.2
        while self.partitions.unsought and not stop.is_set():
            async with self.applying:
                pending = sorted(self.partitions.unsought)
                try:
                    await self.seek_to_checkpoints(pending)
                    return
                except Exception as error:
                    self.await_seek(pending, error)
                    if refused_by_environment(error):
                        await self.engine.dispose()  # see ``_retrying``
            await asyncio.sleep(delay)  # back-off while the database is away
            delay = min(delay * 2, 5.0)

    async def _check_topic_identity_until_done(
        self, consumer: AIOKafkaConsumer, stop: asyncio.Event
    ) -> None:
        """``_check_topic_identity``, again after a back-off while the database or the broker
        cannot answer (like the checkpoint reads of an assignment)."""
        delay = 0.2
        while not stop.is_set():
            try:
                return await self._check_topic_identity(consumer)
            except TopicReplaced:
                raise
            except Exception as error:
                if refused_by_environment(error):
                    _report_refusal(self.label, error, delay)
                    await self.engine.dispose()  # see ``_retrying``
                else:
                    _log.warning(
                        "%s: could not read the checkpoints to check the topic against (%r); "
                        "retrying in %.1fs",
                        self.label,
                        error,
                        delay,
                    )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)  # back-off, ended early by a stop
            delay = min(delay * 2, 5.0)

    async def _check_topic_identity(self, consumer: AIOKafkaConsumer) -> None:
        """Refuse checkpoints taken on another topic of the same name (``projections.identity``);
        a version that has no topic id yet gets this topic's."""
        topic = self.config.topic
        description = await look_up_topic(self.config.kafka, topic)
        if description is None:  # deleted since the consumer saw it: the next start checks
            return
        async with begin(self.engine) as connection:
            recorded = await record_topic(connection, self.targets, topic, description.topic_id)
            reach = await checkpoint_reach(connection, self.targets, topic)
        # Read after the checkpoints: other instances move them on meanwhile, never past the
        # last stable offset as it was when they committed, and it only grows.
        ends = await topic_end_offsets(consumer, topic) or {}
        problem = replaced(topic, description.topic_id, recorded, reach, ends)
        if problem is not None:
            _log.error("%s: %s", self.label, problem)
            raise problem

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
            except consuming.ConsumerBroken as broken:
                _log.warning(
                    "%s: the Kafka consumer broke (%r); a new one in %.1fs",
                    self.label,
                    broken.__cause__,
                    delay,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 10.0)

    async def _consume(self, stop: asyncio.Event) -> None:
        consumer = consuming.new_consumer(
            self.config.kafka,
            self.group_id,
            instance_id=self.config.instance_id,
            max_partition_fetch_bytes=self.config.max_partition_fetch_bytes,
        )
        await consuming.start(consumer, self.config.topic, stop, self.label)
        self.consumer = consumer
        try:
            await self._check_topic_identity_until_done(consumer, stop)
        except BaseException:
            await consuming.stop_consumer(consumer)
            raise
        # Subscribing before the topic exists would join the group with no partitions, and a
        # static member (instance id) keeps that empty assignment when it rejoins.
        consumer.subscribe([self.config.topic], listener=consuming.Listener(self))
        _log.info("%s: applying to %s", self.label, ", ".join(map(str, self.targets)))
        pending: asyncio.Future[Batch] | None = None
        try:
            while not stop.is_set() and not self.finished:
                if self.partitions.unsought:
                    await self._retry_seeks(stop)
                batch = await (pending or self._fetch(consumer))
                # The next batch is fetched and decoded while this one's transactions run.
                pending = asyncio.ensure_future(self._fetch(consumer)) if batch.records else None
                await self._with_retry(
                    stop, self.apply, batch.records, batch.generations, batch.decoded, batch.traced
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
            await consuming.stop_consumer(consumer)

    async def _fetch(self, consumer: AIOKafkaConsumer) -> Batch:
        config = self.config
        seeks = self.partitions.seeks
        return await consuming.fetch(
            consumer, config.batch_max_records, config.batch_wait_ms, seeks, self.telemetry.times
        )

    async def _with_retry(
        self, stop: asyncio.Event, step: Callable[..., Awaitable[None]], *args: Any
    ) -> None:
        try:
            await _retrying(
                stop, self.label, functools.partial(step, *args), reconnect=self.engine.dispose
            )
        except VersionsChanged as changed:
            await self._follow_versions(changed)

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
            self.partitions.stored_halts.clear()
            if self.positions:
                await self.seek_to_checkpoints(sorted(self.positions))

    async def apply(
        self,
        fetched: Fetched,
        generations: Mapping[int, int] | None = None,
        decoded: Mapping[TopicPartition, Sequence[Decoded]] | None = None,
        traced: Traced | None = None,
    ) -> None:
        """Apply one fetched batch: per projection, its rows and checkpoints in ONE transaction
        (``Applier.apply``).

        A checkpoint moved by another instance (``StaleCheckpoint``) rolls that projection's
        batch back; its partitions are then re-read from the stored checkpoints (the other
        projections skip what they already have). ``generations`` (the seek counters when the
        records were handed over) drops partitions sought since: their records predate the seek.
        ``decoded`` holds the records' decoded events when the fetch decoded them already;
        ``traced`` the records that carry a trace (``Batch.traced``).
        """
        if not fetched:
            return
        started = time.perf_counter()
        async with self.applying:
            if generations is not None:
                fetched = without_stale(fetched, generations, self.partitions.seeks)
            planned = plan(fetched, decoded or {}, self.targets, self.positions, self.halted)
            reseek, errors = await self._applier.apply(
                planned, copy=self.config.copy_append_only, traced=traced
            )
            if errors:
                for partition in reseek:
                    self._reposition(partition)
                stale = [e for e in errors if isinstance(e, StaleCheckpoint)]
                if len(stale) < len(errors):
                    raise next(e for e in errors if not isinstance(e, StaleCheckpoint))
                self.stats.stale_batches += 1
                _log.warning("%s: %s; re-seeking to the stored checkpoints", self.label, stale[0])
                await self.seek_to_checkpoints(
                    [tp.partition for tp in fetched if tp.partition in self.positions]
                )
                return
            for halt in self.partitions.halts_to_make(planned.halts):
                self._halt(halt)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)

    # -- halts ----------------------------------------------------------------------------

    def _halt(self, halt: Halt) -> None:
        names = [t.name for t in self.targets]
        if self.partitions.halt(halt, names) and self.consumer is not None:
            self.consumer.pause(self._tp(halt.partition))
        _log.error(
            "%s",
            advice(halt, self._target(halt.projection)),
            extra={
                "projection": halt.projection,
                "partition": halt.partition,
                "offset": halt.offset,
                "order_id": halt.order_id,
                "correlation_id": halt.correlation_id,
            },
        )

    async def housekeeping(self, idle: bool = True) -> None:
        """Store new halts, pick up parks, and (when ``idle``, no fetch in flight) move
        checkpoints past transaction markers."""
        async with self.applying:
            if self.halted:
                await self._applier.sync_halts(self.targets, self._resume)
            if idle:
                await self._past_markers()
            self.telemetry.times.keep(self.positions)
            if self.telemetry.parked_due():
                self.telemetry.counted_parked(await self._applier.parked_counts(self.targets))

    def _resume(self, halt: Halt, checkpoint: int) -> None:
        """An operator removed ``halt`` (e.g. parked the event): go on from ``checkpoint``."""
        target = self._target(halt.projection)
        _log.info("%s: partition %d resumes at offset %d", target, halt.partition, checkpoint)
        self.telemetry.parked_changed()
        self._reposition(halt.partition)

    async def _past_markers(self) -> None:
        """Move checkpoints over what only transaction markers fill, so lag can reach 0.

        After a transaction, the next readable record sits past its commit marker. Once the
        consumer has returned everything up to its position (the batch in flight is done), the
        offsets between a projection's checkpoint and that position hold no events for it.
        """
        if self.consumer is None:
            return
        settled = self.partitions.settled(consuming.assigned(self.consumer, self.config.topic))
        consumed = await consuming.positions(self.consumer, self.config.topic, settled)
        moves = self.partitions.marker_moves(consumed, self.targets)
        if moves and not await self._applier.past_markers(moves):
            await self.seek_to_checkpoints(sorted({g.partition for g in moves}))

    async def _commit_kafka_offsets(self, stop: asyncio.Event) -> None:
        """Informational only: lets Kafka tools show lag. Correctness never reads them.

        Skipped once stopping, and given up after ``commit_kafka_offsets_timeout``."""
        now = time.monotonic()
        if (
            self.consumer is None
            or stop.is_set()
            or now - self._last_kafka_commit < self.config.commit_kafka_offsets_every
        ):
            return
        self._last_kafka_commit = now
        offsets = self.partitions.committable(consuming.assigned(self.consumer, self.config.topic))
        await consuming.commit_offsets(
            self.consumer, self.config.topic, offsets, self.config.commit_kafka_offsets_timeout
        )
        # From the attempt's end: a commit that timed out does not come again at once, which
        # would hold every pass of the loop while the coordinator alone is away.
        self._last_kafka_commit = time.monotonic()


def _spans(partitions: Iterable[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` as ``0-2, 5, 7-8``: a log line stays short with many partitions."""
    runs: list[list[int]] = []
    for partition in sorted(partitions):
        if runs and partition == runs[-1][-1] + 1:
            runs[-1].append(partition)
        else:
            runs.append([partition])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _checkpoint_summary(positions: Mapping[int, Mapping[str, int]]) -> str:
    """Each projection's checkpoints over some partitions as one range of offsets."""
    ranges: dict[str, tuple[int, int]] = {}
    for checkpoints in positions.values():
        for name, offset in checkpoints.items():
            low, high = ranges.get(name, (offset, offset))
            ranges[name] = (min(low, offset), max(high, offset))
    described = [
        f"{name} {low}" if low == high else f"{name} {low}-{high}"
        for name, (low, high) in ranges.items()
    ]
    return f"checkpoint offsets: {', '.join(described)}" if described else "no checkpoints"


async def _retrying(
    stop: asyncio.Event,
    label: str,
    step: Callable[[], Awaitable[None]],
    *,
    reconnect: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Run ``step``; after an error of a database that is away or refuses the work
    (``transient``), again after a back-off, until ``stop``.

    After a refusal the pool's connections are dropped (``reconnect``): a session keeps the
    read-only setting it started with, and after a failover the name may point elsewhere."""
    delay = 0.2
    while True:
        try:
            await step()
            return
        except Exception as error:
            if isinstance(error, VersionsChanged) or stop.is_set() or not transient(error):
                raise
            if refused_by_environment(error):
                _report_refusal(label, error, delay)
                if reconnect is not None:
                    await reconnect()
            else:
                _log.warning(
                    "%s: database unavailable (%s); retrying in %.1fs",
                    label,
                    type(error).__name__,
                    delay,
                )
            await asyncio.sleep(delay)  # back-off while the database is away
            delay = min(delay * 2, 5.0)


def _report_refusal(label: str, error: BaseException, delay: float | None = None) -> None:
    """Count and log a database's refusal (``refused_by_environment``), saying what to do."""
    state = sqlstate(error)
    metrics.DATABASE_REFUSALS.labels(state).inc()
    _log.error(
        "%s: the database refuses this projector's work (SQLSTATE %s: %s): %s; "
        "nothing is halted or skipped, retrying%s",
        label,
        state,
        str(error).splitlines()[0] if str(error) else type(error).__name__,
        _REFUSAL_ADVICE.get(state[:2], _REFUSAL_ADVICE["42"]),
        "" if delay is None else f" in {delay:.1f}s",
    )


# What to do about a refusal, by SQLSTATE class.
_REFUSAL_ADVICE = {
    "25": "make the database writable (a primary, not a standby; "
    "default_transaction_read_only off)",
    "42": "grant this login the orders_projector role (`orders migrate --create-roles` sets "
    "up its privileges; docs/security.md)",
}


def runner_config(settings: Settings) -> RunnerConfig:
    """The runner's settings from the service's."""
    return RunnerConfig(
        kafka=settings.require_kafka(),
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
    # ORDERS_TELEMETRY=off: no state series (the per-batch counters cost next to nothing).
    with metrics.exported(runner) if settings.telemetry else contextlib.nullcontext():
        await runner.run(stop)
