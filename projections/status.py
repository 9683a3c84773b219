"""How far each projection is: checkpoints next to the topic's last stable offsets.

Shared by ``orders projections status`` and ``GET /ops/projections``.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition
from sqlalchemy.ext.asyncio import AsyncEngine

from projections.bookkeeping.checkpoints import StoredCheckpoint, topic_checkpoints
from projections.bookkeeping.halts import topic_halts
from projections.bookkeeping.parked import parked_counts
from projections.bookkeeping.registry import version_states
from projections.bookkeeping.topics import topic_ids
from projections.models import catalog
from projections.projection import Target, begin
from service.infra.eventlog import committed_reader, topic_end_offsets
from service.infra.kafka_clients import KafkaTarget, admin_client
from service.infra.topic import look_up_topic

# Partition and projection states, worst first.
TOPIC_REPLACED = (
    "topic replaced"  # checkpoints of another topic of that name (projections.identity)
)
HALTED = "halted"
REBUILDING = "rebuilding"
RUNNING = "running"
STOPPED = "stopped"  # events wait and no projector consumer applies them
CAUGHT_UP = "caught up"


class PartitionStatus(msgspec.Struct, frozen=True, kw_only=True):
    partition: int
    checkpoint: int
    last_stable_offset: int | None
    # Events waiting, counted (transaction markers take offsets too); None past COUNT_CAP.
    lag_events: int | None
    lag_offsets: int | None
    lag_seconds: float | None
    last_event_at: datetime | None
    state: str
    halted_at_offset: int | None = None
    halted_order_id: str | None = None
    reason: str | None = None


class VersionStatus(msgspec.Struct, frozen=True, kw_only=True):
    projection: str
    version: int
    role: str  # live | building
    state: str
    lag_events: int | None
    lag_offsets: int | None
    parked_events: int
    partitions: list[PartitionStatus]
    # Live versions: members of the projector consumer groups that apply this projection (what
    # Kafka says now: 0 means no projector is running for it). None: not asked.
    consumers: int | None = None


class TopicStatus(msgspec.Struct, frozen=True, kw_only=True):
    topic: str
    partitions: int | None
    projections: list[VersionStatus]


REPLACED_REASON = (
    "built from another topic of this name (deleted and created again, or truncated): "
    "rebuild the projections: orders projections rebuild all"
)

# Counting the events behind the checkpoints reads them: at most this many per partition.
COUNT_CAP = 50_000
COUNT_TIME_S = 5.0


class _EventOffsets:
    """The offsets of the committed events behind some checkpoints, up to the last stable offset.

    Each partition is read backwards in segments, from its most recent checkpoint to the end
    first, then from each older checkpoint to the next: a version far behind (a rebuild under
    way), whose count stops at COUNT_CAP or COUNT_TIME_S, leaves those closer to the end
    counted exactly.
    """

    def __init__(self, starts: dict[int, set[int]]) -> None:
        self.starts = starts  # partition -> the checkpoints to count from
        self.offsets: dict[int, list[int]] = {}  # partition -> sorted offsets of the events read
        self.read_from: dict[int, int] = {}  # partition -> every event from here on was read

    async def read(self, consumer: AIOKafkaConsumer, topic: str, ends: dict[int, int]) -> None:
        """Read the events behind ``starts`` up to ``ends`` (partition -> last stable offset)."""
        segments: dict[int, list[tuple[int, int]]] = {}
        for partition, end in ends.items():
            self.offsets[partition], self.read_from[partition] = [], end
            if pending := _segments(self.starts.get(partition, set()), end):
                segments[partition] = pending
        tps = {p: TopicPartition(topic, p) for p in segments}
        consumer.assign(list(tps.values()))
        for partition, pending in segments.items():
            consumer.seek(tps[partition], pending[0][0])
        found: dict[int, list[int]] = {p: [] for p in segments}  # in the current segment
        deadline = time.monotonic() + COUNT_TIME_S
        while segments and time.monotonic() < deadline:
            fetched = await consumer.getmany(timeout_ms=200, max_records=COUNT_CAP)
            for tp, records in fetched.items():
                if tp.partition in segments:
                    low, high = segments[tp.partition][0]
                    found[tp.partition] += [r.offset for r in records if low <= r.offset < high]
            for partition in list(segments):
                low, high = segments[partition][0]
                if await consumer.position(tps[partition]) >= high:
                    # Segment read: keep its events, go on to the one before it (up to the cap).
                    self.offsets[partition][:0] = found[partition]
                    self.read_from[partition], found[partition] = low, []
                    del segments[partition][0]
                    if segments[partition] and len(self.offsets[partition]) < COUNT_CAP:
                        consumer.seek(tps[partition], segments[partition][0][0])
                        continue
                elif len(self.offsets[partition]) + len(found[partition]) < COUNT_CAP:
                    continue  # mid-segment, under the cap
                del segments[partition]
                consumer.pause(tps[partition])

    def count(self, partition: int, start: int) -> int | None:
        """Events at or after ``start``; None when they were not all read."""
        if start < self.read_from.get(partition, start + 1):
            return None
        offsets = self.offsets.get(partition, [])
        return len(offsets) - bisect_left(offsets, start)


def _segments(starts: set[int], end: int) -> list[tuple[int, int]]:
    """The ranges [low, high) between the checkpoints ``starts`` and ``end``, the last first."""
    bounds = sorted({start for start in starts if start < end} | {end})
    return list(zip(bounds[-2::-1], bounds[:0:-1], strict=True))


async def consumers(bootstrap: KafkaTarget, group_prefix: str) -> dict[str, int | None]:
    """Projection name -> members of the live projector groups that apply it (see
    ``members_per_projection``). A stopped projector leaves its group at once; a static member
    (ORDERS_PROJECTOR_INSTANCE_ID) only when its session times out."""
    admin = admin_client(bootstrap)
    try:
        await admin.start()
        prefix = f"{group_prefix}."
        groups = [
            group_id
            for group_id, *_ in await admin.list_consumer_groups()
            if group_id.startswith(prefix) and not group_id.startswith(f"{prefix}rebuild.")
        ]
        responses = await admin.describe_consumer_groups(groups) if groups else []
        return members_per_projection(prefix, [g for r in responses for g in r.groups])
    finally:
        await admin.close()


def members_per_projection(
    prefix: str, described: Sequence[Sequence[Any]]
) -> dict[str, int | None]:
    """From DescribeGroups entries ``(error_code, group_id, state, protocol_type, protocol,
    members, ...)`` of the groups ``<prefix><names joined by +>`` (as
    ``ProjectionRunner.group_id`` names them): members per projection, summed over its groups.
    None where a group could not be described: unknown, not "no projector"."""
    counts: dict[str, int | None] = {}
    for error_code, group_id, _state, _protocol_type, _protocol, members, *_ in described:
        for name in group_id[len(prefix) :].split("+"):
            known = counts.get(name, 0)
            counts[name] = None if error_code or known is None else known + len(members)
    return counts


async def status(
    engine: AsyncEngine,
    bootstrap: KafkaTarget,
    topic: str,
    names: Sequence[str] | None = None,
    *,
    group_prefix: str | None = None,
) -> TopicStatus:
    """Every live and building version of the named projections (all by default); with
    ``group_prefix``, also how many projector consumers apply each live version."""
    wanted = [p.name for p in catalog.select(list(names) if names else None)]
    now = datetime.now(UTC)
    async with begin(engine) as connection:
        states = await version_states(connection, wanted, states=("live", "building"))
        stored = await topic_checkpoints(connection, topic)
        halted = await topic_halts(connection, topic)
        parked = await parked_counts(connection, topic)
        targets = [
            Target(catalog.PROJECTIONS[name], version)
            for name in sorted(states)
            for version in states[name]
        ]
        recorded = await topic_ids(connection, targets, topic)
    versions = [
        (name, version, role) for name in sorted(states) for version, role in states[name].items()
    ]
    # Raises, saying which ACL to grant, for a topic hidden from this client: not "caught up".
    described = await look_up_topic(bootstrap, topic)
    topic_id = described.topic_id if described else None
    other_topic = {
        (t.name, t.version) for t, known in recorded.items() if topic_id and known != topic_id
    }
    consumer = committed_reader(bootstrap)
    try:
        await consumer.start()
        stable = await topic_end_offsets(consumer, topic)  # read_committed: stable
        events = _EventOffsets(_starts(versions, stored, stable or {}))
        await events.read(consumer, topic, stable or {})
    finally:
        await consumer.stop()  # also after a failed start, which leaves its connections open
    members = await consumers(bootstrap, group_prefix) if group_prefix is not None else None
    partitions = sorted(stable) if stable is not None else []
    found = []
    for name, version, role in versions:
        consuming = members.get(name, 0) if members is not None and role == "live" else None
        rows = []
        for partition in partitions or sorted(
            p for (n, v, p) in stored if (n, v) == (name, version)
        ):
            checkpoint = stored.get((name, version, partition))
            next_offset = checkpoint.next_offset if checkpoint else 0
            last_at = checkpoint.last_event_at if checkpoint else None
            end = stable.get(partition) if stable is not None else None
            lag_offsets = max(0, end - next_offset) if end is not None else None
            lag = 0 if lag_offsets == 0 else events.count(partition, next_offset)
            halt = halted.get((name, version, partition))
            reason = halt.reason if halt else None
            if (name, version) in other_topic or (end is not None and next_offset > end):
                state = TOPIC_REPLACED
                reason = REPLACED_REASON
            elif halt is not None:
                state = HALTED
            elif role == "building":
                state = REBUILDING
            elif lag_offsets == 0 or lag == 0:
                state = CAUGHT_UP
            elif consuming == 0:
                state = STOPPED
            else:
                state = RUNNING
            rows.append(
                PartitionStatus(
                    partition=partition,
                    checkpoint=next_offset,
                    last_stable_offset=end,
                    lag_events=lag,
                    lag_offsets=lag_offsets,
                    lag_seconds=_lag_seconds(lag if lag is not None else lag_offsets, last_at, now),
                    last_event_at=last_at,
                    state=state,
                    halted_at_offset=halt.offset if halt else None,
                    halted_order_id=halt.order_id if halt else None,
                    reason=reason,
                )
            )
        lags = [r.lag_events for r in rows]
        offset_lags = [r.lag_offsets for r in rows]
        found.append(
            VersionStatus(
                projection=name,
                version=version,
                role=role,
                state=_overall(role, [r.state for r in rows]),
                lag_events=None if None in lags else sum(lag or 0 for lag in lags),
                lag_offsets=None if None in offset_lags else sum(x or 0 for x in offset_lags),
                parked_events=parked.get((name, version), 0),
                partitions=rows,
                consumers=consuming,
            )
        )
    return TopicStatus(
        topic=topic, partitions=len(stable) if stable is not None else None, projections=found
    )


def _starts(
    versions: Sequence[tuple[str, int, str]],
    stored: dict[tuple[str, int, int], StoredCheckpoint],
    partitions: Iterable[int],
) -> dict[int, set[int]]:
    """Per partition, the checkpoints of the versions reported (0 where one has none yet): the
    offsets to count events from. Not a retired version's: it is not reported, and may be far
    behind."""
    return {
        partition: {
            stored[key].next_offset if key in stored else 0
            for key in ((name, version, partition) for name, version, _ in versions)
        }
        for partition in partitions
    }


def _lag_seconds(lag: int | None, last_event_at: datetime | None, now: datetime) -> float | None:
    """How old the last applied event is, when events wait behind it; 0 when caught up."""
    if lag == 0:
        return 0.0
    if lag is None or last_event_at is None:
        return None
    return max(0.0, (now - last_event_at).total_seconds())


def _overall(role: str, states: Sequence[str]) -> str:
    if TOPIC_REPLACED in states:
        return TOPIC_REPLACED
    if HALTED in states:
        return HALTED
    if role == "building":
        return REBUILDING
    if states and all(state == CAUGHT_UP for state in states):
        return CAUGHT_UP
    if STOPPED in states:
        return STOPPED
    return RUNNING


def render(report: TopicStatus) -> str:
    """A readable table: one line per projection version and partition, halts explained."""
    if report.partitions is None:
        head = f"topic {report.topic}: not found (no events written yet?)"
    else:
        head = f"topic {report.topic}: {report.partitions} partitions"
    lines = [
        head,
        f"{'PROJECTION':<18} {'VERSION':<12} {'PART':>4} {'CHECKPOINT':>11} {'END':>11} "
        f"{'LAG':>9} {'LAG(s)':>8}  STATE",
    ]
    for version in report.projections:
        label = f"v{version.version} {version.role}"
        for row in version.partitions:
            lag_s = "-" if row.lag_seconds is None else f"{row.lag_seconds:.1f}"
            lag = _n(row.lag_events) if row.lag_events is not None else f"~{_n(row.lag_offsets)}"
            lines.append(
                f"{version.projection:<18} {label:<12} {row.partition:>4} {row.checkpoint:>11} "
                f"{_n(row.last_stable_offset):>11} {lag:>9} {lag_s:>8}  {row.state}"
            )
            if row.state == HALTED:
                lines.append(
                    f"{'':<18} {'':<12} {'':>4}   at offset {row.halted_at_offset}, order "
                    f"{row.halted_order_id or '?'}: {row.reason}"
                )
                lines.append(
                    f"{'':<18} {'':<12} {'':>4}   fix and restart the projector, or: orders "
                    f"projections park {version.projection} --partition {row.partition} "
                    f"--offset {row.halted_at_offset}"
                )
            elif row.state == TOPIC_REPLACED:
                lines.append(f"{'':<18} {'':<12} {'':>4}   {row.reason}")
        summary = f"{version.projection} v{version.version}: {version.state}"
        if version.consumers == 0:
            summary += ", no projector consuming it (start one: orders projector)"
        elif version.consumers is not None:
            summary += f", {version.consumers} projector consumer(s)"
        if version.parked_events:
            summary += f", {version.parked_events} parked event(s) (orders projections parked)"
        lines.append(f"  -> {summary}")
    return "\n".join(lines)


def _n(value: int | None) -> str:
    return "-" if value is None else str(value)
