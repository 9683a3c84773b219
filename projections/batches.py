"""Batch planning, without I/O: which fetched records each projection version applies, and how
a batch the database refuses is split until the event at fault is found.

A fetch holds records of several partitions. ``plan`` decodes each record once and gives each
projection version not halted in a partition a ``Group``: the events from its checkpoint on,
and the checkpoint move (``expected`` -> ``new``) that commits with them. A record that does
not decode ends the groups that reach it: their checkpoints move up to it, and a ``Halt``
there is made once the batch commits; the other versions (already past it) go on.

A group's events are shared between versions at the same checkpoint, never copied, and never
mutated: a batch of 20,000 events applied to four projections is one list.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

import msgspec
from aiokafka import TopicPartition
from opentelemetry.trace import SpanContext

from projections.projection import Applied, Target, pg_text
from service.infra import tracing
from service.kernel import envelope
from service.kernel.events import DomainEvent


class Record(Protocol):
    """What the runner reads of a Kafka record (aiokafka's ``ConsumerRecord`` has it)."""

    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


class Consumed(Record, Protocol):
    """A record as the consumer hands it over: with its headers."""

    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


class Kept(msgspec.Struct, frozen=True, gc=False):
    """A fetched record as the runner keeps it until its batch is applied. Never tracked by
    the cyclic garbage collector: a batch's records live about a second, and every young
    collection meanwhile traversed those still alive (aiokafka's records, and even a
    NamedTuple of these values: only plain tuples are ever untracked)."""

    offset: int
    key: bytes | None
    value: bytes | None


Fetched = Mapping[TopicPartition, Sequence[Record]]
# A record's decoded envelope and event, or why it does not decode.
Decoded = tuple[envelope.Envelope, DomainEvent] | envelope.UndecodableEvent
# (partition, offset) -> the record's value, for events set aside with a parked order.
Raw = dict[tuple[int, int], bytes]
# (projection, partition)
HaltKey = tuple[str, int]
# (partition, offset) -> the span a traced record's producer sent it in.
Traced = dict[tuple[int, int], SpanContext]


def decode(value: bytes | None) -> Decoded:
    """The record's envelope and event, or the error that says why it does not decode."""
    try:
        return envelope.decode(value)
    except envelope.UndecodableEvent as error:
        return error


@dataclass
class Batch:
    """A batch as the consumer handed it over, decoded.

    ``generations`` holds each partition's seek counter at the moment its records were handed
    over: a seek since then makes them stale (the seek has already moved the consumer).
    """

    records: dict[TopicPartition, list[Kept]] = field(default_factory=dict)
    generations: dict[int, int] = field(default_factory=dict)
    decoded: dict[TopicPartition, list[Decoded]] = field(default_factory=dict)
    count: int = 0
    # (partition, offset) -> the producer span a traced record names; looked for only while
    # tracing is on (``service.infra.tracing``).
    traced: Traced = field(default_factory=dict)

    def add(self, tp: TopicPartition, records: Sequence[Consumed], generation: int) -> None:
        """Keep and decode a chunk of ``tp``'s records, handed over at seek ``generation``.

        Records of a partition sought since its earlier ones replace those."""
        kept = [Kept(r.offset, r.key, r.value) for r in records]
        decoded = [decode(record.value) for record in kept]
        if tp in self.records and self.generations[tp.partition] == generation:
            self.records[tp].extend(kept)
            self.decoded[tp].extend(decoded)
        else:  # first records of the partition, or sought since its earlier ones
            self.records[tp] = kept
            self.decoded[tp] = decoded
            self.generations[tp.partition] = generation
        self.count += len(kept)
        if tracing.tracer() is not None:
            for record in records:
                if (span_context := tracing.traced_in(record.headers)) is not None:
                    self.traced[(tp.partition, record.offset)] = span_context


@dataclass(frozen=True)
class Halt:
    """Where a projection stopped in a partition, and why (invariant 7)."""

    projection: str
    partition: int
    offset: int
    order_id: str | None
    reason: str
    correlation_id: str | None = None  # of the event, when it could be decoded


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


@dataclass
class Plan:
    """A batch split by (projection version, partition)."""

    groups: list[Group] = field(default_factory=list)
    raw: Raw = field(default_factory=dict)
    # Halts at records that do not decode, to make once their groups have committed.
    halts: list[Halt] = field(default_factory=list)

    def by_projection(self) -> dict[str, list[Group]]:
        """The groups of each projection: what one transaction applies."""
        found: dict[str, list[Group]] = defaultdict(list)
        for group in self.groups:
            found[group.target.name].append(group)
        return found


def without_stale(
    fetched: Fetched, generations: Mapping[int, int], seeks: Mapping[int, int]
) -> Fetched:
    """Drop the records of partitions sought since they were handed over.

    The seek has already put the consumer where that partition must go on from.
    """
    return {
        tp: records
        for tp, records in fetched.items()
        if seeks.get(tp.partition, 0) == generations.get(tp.partition)
    }


def plan(
    fetched: Fetched,
    decoded: Mapping[TopicPartition, Sequence[Decoded]],
    targets: Sequence[Target],
    positions: Mapping[int, Mapping[str, int]],
    halted: Mapping[HaltKey, Halt],
) -> Plan:
    """Decode each record once (unless ``decoded`` has it); split the batch by (projection,
    partition), each from its checkpoint in ``positions``, skipping those ``halted``.

    A projection takes the records from its checkpoint on, up to the first it cannot
    decode: its checkpoint moves to that record, where it halts once the batch commits.
    The others go on past that record.
    """
    found = Plan()
    for tp, records in fetched.items():
        partition = tp.partition
        checkpoints = positions.get(partition)
        if checkpoints is None:
            continue  # revoked meanwhile: not ours to apply
        going = [
            Group(t, partition, checkpoints[t.name], checkpoints[t.name])
            for t in targets
            if (t.name, partition) not in halted
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
            result = done[i] if done is not None else decode(record.value)
            if isinstance(result, envelope.UndecodableEvent):
                key = record.key.decode(errors="replace") if record.key else None
                poison.append((record.offset, key, str(result)))
                continue
            assert record.value is not None  # it decoded
            found.raw[(partition, record.offset)] = record.value
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
                found.halts.append(Halt(group.target.name, partition, *bad))
            if group.new > group.expected:
                found.groups.append(group)
    return found


def split_parked(
    groups: Sequence[Group], parked: set[tuple[str, str]]
) -> tuple[dict[str, list[Applied]], list[tuple[Target, Applied]]]:
    """Per projection, the events to apply; and those of ``parked`` (projection, order id as
    stored) orders, to set aside with their order."""
    applying: dict[str, list[Applied]] = defaultdict(list)
    set_aside: list[tuple[Target, Applied]] = []
    for group in groups:
        if not parked:
            applying[group.target.name].extend(group.events)
            continue
        for applied in group.events:
            if (group.target.name, pg_text(applied.envelope.order_id)) in parked:
                set_aside.append((group.target, applied))
            else:
                applying[group.target.name].append(applied)
    return applying, set_aside
