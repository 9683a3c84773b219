"""The projector's and the rebuild's Prometheus series (docs/telemetry.md, "Projector").

Counters and histograms are observed once per batch or per transaction, never per event: the
projector applies about 100,000 events a second. What a runner holds (assigned partitions,
lag, halts, parked events) is read at scrape time by one collector over the runners
``exported`` in this process, so a partition revoked or a runner stopped leaves no series
behind. Lag comes from what the consumer already knows (the checkpoints the runner holds, the
last stable offsets of its fetch responses, the timestamps of the records it fetched), never
from reading the log; the parked count is refreshed by the runner's housekeeping, so a scrape
never waits on the database.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import math
import threading
import time
from collections import Counter as Tally
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from projections.batches import Halt, HaltKey
from projections.projection import Target

_EVENT_BUCKETS = (1, 5, 10, 50, 100, 500, 1000, 2000, 5000, 10_000, 20_000, 50_000)

EVENTS_APPLIED = Counter(
    "orders_projection_events_applied", "Events applied, per projection", ["projection"]
)
BATCH_EVENTS = Histogram(
    "orders_projection_batch_events",
    "Events per projection transaction",
    ["projection"],
    buckets=_EVENT_BUCKETS,
)
BATCH_SECONDS = Histogram(
    "orders_projection_batch_seconds", "One fetched batch applied, all projections"
)
TRANSACTION_SECONDS = Histogram(
    "orders_projection_transaction_seconds",
    "One Postgres transaction of a projection (rows and checkpoints)",
    ["projection"],
)
CHECKPOINT_CONFLICTS = Counter(
    "orders_projection_checkpoint_conflicts",
    "Batches rolled back because another instance moved the checkpoint",
    ["projection"],
)
DATABASE_REFUSALS = Counter(
    "orders_projection_database_refusals",
    "Batches the database refused for the environment's sake, by SQLSTATE: read-only (25xxx) "
    "or a privilege missing (42501); retried, never halted",
    ["sqlstate"],
)
REBALANCES = Counter("orders_projection_rebalances", "Consumer group rebalances seen")

REBUILD_REPLAYED = Gauge(
    "orders_rebuild_events_replayed", "Events of the topic a rebuild has replayed", ["projection"]
)
REBUILD_TARGET = Gauge(
    "orders_rebuild_events_target", "Events of the topic a rebuild has to replay", ["projection"]
)
REBUILD_RATE = Gauge(
    "orders_rebuild_events_per_second", "Events a rebuild replays per second", ["projection"]
)
REBUILD_ETA = Gauge(
    "orders_rebuild_eta_seconds", "Seconds until a rebuild has replayed its target", ["projection"]
)


# -- per batch ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProjectionSeries:
    """One projection's children of the labelled series, bound once (``series``)."""

    applied: Counter
    batch_events: Histogram
    transaction_seconds: Histogram
    conflicts: Counter


@functools.cache
def series(projection: str) -> ProjectionSeries:
    return ProjectionSeries(
        EVENTS_APPLIED.labels(projection),
        BATCH_EVENTS.labels(projection),
        TRANSACTION_SECONDS.labels(projection),
        CHECKPOINT_CONFLICTS.labels(projection),
    )


class _Grouped(Protocol):
    @property
    def target(self) -> Target: ...
    @property
    def events(self) -> Sequence[object]: ...


@contextlib.contextmanager
def transaction(groups: Sequence[_Grouped]) -> Iterator[None]:
    """Time one projection's transaction over ``groups``; once it committed, count its events."""
    started = time.perf_counter()
    committed = False
    try:
        yield
        committed = True
    finally:
        if groups:
            found = series(groups[0].target.name)
            found.transaction_seconds.observe(time.perf_counter() - started)
            if committed:
                found.batch_events.observe(sum(len(g.events) for g in groups))


def show_rebuild(projection: str, replayed: int, target: int, rate: float, eta_s: float) -> None:
    """A rebuild's progress for one projection (fed from the figures it prints)."""
    REBUILD_REPLAYED.labels(projection).set(replayed)
    REBUILD_TARGET.labels(projection).set(target)
    REBUILD_RATE.labels(projection).set(rate)
    REBUILD_ETA.labels(projection).set(eta_s)


# -- what a runner holds, read at scrape time ---------------------------------------------------


class _Record(Protocol):
    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int: ...


class RecordTimes:
    """The Kafka timestamps of some fetched records: the first of each chunk a partition
    handed over, which (batches being applied whole) is where checkpoints stand.

    Facts about the log, never wrong, only incomplete: an offset's timestamp does not change,
    so records fetched again after a seek add nothing new.
    """

    def __init__(self) -> None:
        self._times: dict[int, list[tuple[int, int]]] = {}  # partition -> sorted (offset, ms)
        self.fetched_to: dict[int, int] = {}  # partition -> the offset after the last handed over
        # (projection, partition) -> (checkpoint, when (s) a scrape first saw the partition
        # behind that checkpoint): the event at it was in the log by then.
        self.behind_since: dict[tuple[str, int], tuple[int, float]] = {}

    def note(self, partition: int, first: _Record, last: _Record) -> None:
        """A chunk of ``partition``'s records, ``first`` to ``last``, was handed over."""
        times = self._times.setdefault(partition, [])
        fact = (first.offset, first.timestamp)
        at = bisect.bisect_left(times, fact)
        if at == len(times) or times[at][0] != first.offset:
            times.insert(at, fact)
        self.fetched_to[partition] = max(self.fetched_to.get(partition, 0), last.offset + 1)

    def oldest_waiting(self, partition: int, checkpoint: int) -> float | None:
        """The timestamp (s) of the first record fetched at or after ``checkpoint``: the
        oldest fetched and not yet applied. None when no such record was fetched."""
        if checkpoint >= self.fetched_to.get(partition, 0):
            return None
        times = self._times.get(partition, [])
        at = bisect.bisect_left(times, (checkpoint, -math.inf))
        return times[at][1] / 1000 if at < len(times) else None

    def waited(self, name: str, partition: int, checkpoint: int, behind: bool, now: float) -> float:
        """How long (s) the oldest event ``name`` has not applied in ``partition`` has waited:
        since its timestamp once it was handed over; before that (the runner stuck in a
        transaction with nothing fetched), at least since a scrape first saw the partition
        behind this same checkpoint, when that event was in the log already."""
        key = (name, partition)
        if not behind:
            self.behind_since.pop(key, None)
            return 0.0
        seen = self.behind_since.get(key)
        if seen is None or seen[0] != checkpoint:
            seen = self.behind_since[key] = (checkpoint, now)
        since = seen[1]
        oldest = self.oldest_waiting(partition, checkpoint)
        return max(0.0, now - (oldest if oldest is not None else since))

    def keep(self, positions: Mapping[int, Mapping[str, int]]) -> None:
        """Forget what no checkpoint in ``positions`` needs any more: the facts below each
        partition's checkpoints but the first at or after each of them; a partition no longer
        held entirely."""
        for partition in [p for p in self._times if p not in positions]:
            del self._times[partition]
            self.fetched_to.pop(partition, None)
        for partition, times in self._times.items():
            checkpoints = sorted(set(positions[partition].values()))
            if not checkpoints:
                continue
            needed = {bisect.bisect_left(times, (c, -math.inf)) for c in checkpoints}
            highest = max(needed)
            self._times[partition] = [
                fact for i, fact in enumerate(times) if i in needed or i >= highest
            ]


PARKED_REFRESH_S = 5.0


@dataclass
class RunnerTelemetry:
    """What a runner keeps for its metrics: record timestamps and the parked count."""

    times: RecordTimes = field(default_factory=RecordTimes)
    exported: bool = False  # by ``exported``: only then is the parked count refreshed
    parked: dict[str, int] = field(default_factory=dict)  # projection -> its parked events
    parked_at: float = -math.inf

    def parked_due(self) -> bool:
        return self.exported and time.monotonic() - self.parked_at >= PARKED_REFRESH_S

    def parked_changed(self) -> None:
        """An operator parked something: count again at the next housekeeping."""
        self.parked_at = -math.inf

    def counted_parked(self, counts: dict[str, int]) -> None:
        self.parked = counts
        self.parked_at = time.monotonic()


class _Config(Protocol):
    @property
    def topic(self) -> str: ...


class Observed(Protocol):
    """What the collector reads of a runner (``ProjectionRunner``)."""

    @property
    def consumer(self) -> AIOKafkaConsumer | None: ...
    @property
    def config(self) -> _Config: ...
    @property
    def targets(self) -> Sequence[Target]: ...
    @property
    def positions(self) -> dict[int, dict[str, int]]: ...
    @property
    def halted(self) -> Mapping[HaltKey, Halt]: ...
    @property
    def telemetry(self) -> RunnerTelemetry: ...


def _stable_offset(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int | None:
    """The last stable offset of ``tp`` in the consumer's latest fetch response (its high
    watermark from a broker that does not say); None before the first fetch."""
    try:
        stable = consumer.last_stable_offset(tp)
        if stable is None or stable < 0:
            stable = consumer.highwater(tp)
    except AssertionError:  # revoked meanwhile (a scrape from another thread)
        return None
    return stable if stable is None else int(stable)


class _RunnersCollector(Collector):
    """The series of every runner ``exported`` in this process, read at scrape time."""

    def __init__(self) -> None:
        self.runners: list[Observed] = []

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def _families(self) -> list[GaugeMetricFamily]:
        by_projection = ["projection"]
        by_partition = ["projection", "partition"]
        return [
            GaugeMetricFamily(
                "orders_projection_assigned_partitions",
                "Partitions this projector holds (0: it applies nothing)",
                labels=[],
            ),
            GaugeMetricFamily(
                "orders_projection_lag_events",
                "Offsets between the checkpoint and the last stable offset",
                labels=by_partition,
            ),
            GaugeMetricFamily(
                "orders_projection_lag_seconds",
                "How old the oldest event not yet applied is (0 when caught up; before it "
                "is fetched, at least how long the partition has been seen behind)",
                labels=by_partition,
            ),
            GaugeMetricFamily(
                "orders_projection_halted_partitions",
                "Partitions halted at an event the projection cannot apply",
                labels=by_projection,
            ),
            GaugeMetricFamily(
                "orders_projection_parked_events",
                "Events set aside by an operator",
                labels=by_projection,
            ),
        ]

    def collect(self) -> Iterable[Metric]:
        assigned, lag_events, lag_seconds, halted, parked = self._families()
        partitions = 0
        halts: Tally[str] = Tally()
        parked_events: dict[str, int] = {}
        now = time.time()
        for runner in list(self.runners):
            for target in runner.targets:
                halts[target.name] += 0
            for name, _ in list(runner.halted):
                halts[name] += 1
            parked_events.update(runner.telemetry.parked)
            consumer = runner.consumer
            if consumer is None:
                continue
            topic = runner.config.topic
            held = [tp for tp in consumer.assignment() if tp.topic == topic]
            partitions += len(held)
            positions = dict(runner.positions)
            for tp in sorted(held):
                checkpoints = positions.get(tp.partition)
                stable = _stable_offset(consumer, tp)
                if not checkpoints or stable is None:
                    continue  # not sought yet, or nothing fetched yet: unknown
                for name, checkpoint in list(checkpoints.items()):
                    behind = max(0, stable - checkpoint)
                    labels = [name, str(tp.partition)]
                    lag_events.add_metric(labels, behind)
                    waited = runner.telemetry.times.waited(
                        name, tp.partition, checkpoint, behind > 0, now
                    )
                    lag_seconds.add_metric(labels, waited)
        assigned.add_metric([], partitions)
        for name, count in sorted(halts.items()):
            halted.add_metric([name], count)
        for name, count in sorted(parked_events.items()):
            parked.add_metric([name], count)
        return [assigned, lag_events, lag_seconds, halted, parked]


_collector = _RunnersCollector()
_registering = threading.Lock()


@contextlib.contextmanager
def exported(runner: Observed) -> Iterator[None]:
    """Export ``runner``'s state at scrape time while the block runs: the collector is in the
    default registry while at least one runner is exported, and leaves it with the last."""
    with _registering:
        if not _collector.runners:
            REGISTRY.register(_collector)
        _collector.runners.append(runner)
        runner.telemetry.exported = True
    try:
        yield
    finally:
        with _registering:
            runner.telemetry.exported = False
            _collector.runners.remove(runner)
            if not _collector.runners:
                REGISTRY.unregister(_collector)
