"""Following a replay: where the rebuilt versions' checkpoints stand against the topic's end.

``Tracker`` reads the topic's last stable offsets (and, once, the last event committed before
the replay began: the goal of an in-place rebuild) next to the stored checkpoints, once a tick;
``Progress`` is what a rebuild reports to its caller each time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from aiokafka import TopicPartition
from sqlalchemy.ext.asyncio import AsyncEngine

from projections.bookkeeping.checkpoints import read_checkpoints
from projections.projection import Target, begin
from projections.runner import RunnerConfig
from service.infra.eventlog import committed_reader, topic_end_offsets
from service.infra.topic import TopicMissing, look_up_topic


@dataclass(frozen=True)
class Replayed:
    """One projection's share of a replay (its figures for the rebuild's metrics)."""

    position: int  # events of the topic behind its checkpoints
    end: int
    rate: float

    @property
    def eta_s(self) -> float | None:
        return max(0, self.end - self.position) / self.rate if self.rate > 0 else None


@dataclass(frozen=True)
class Progress:
    phase: str  # replaying | indexing | switching | done
    position: int  # events of the topic behind every rebuilt projection's checkpoints
    end: int  # the topic's last stable offsets, summed
    rate: float  # events/s over the last tick
    elapsed_s: float
    projections: dict[str, Replayed] = field(default_factory=dict)

    @property
    def lag(self) -> int:
        return max(0, self.end - self.position)

    @property
    def eta_s(self) -> float | None:
        return self.lag / self.rate if self.rate > 0 else None


class Tracker:
    """Checkpoints of the targets next to the topic's end, once a tick."""

    def __init__(self, engine: AsyncEngine, config: RunnerConfig, targets: Sequence[Target]):
        self.engine = engine
        self.config = config
        self.targets = list(targets)
        self.consumer = committed_reader(config.kafka)
        self.started = time.monotonic()
        self.last: tuple[float, int] | None = None
        self.first_position: int | None = None
        # Per target name, as of the latest ``lags``: its position, and the one a tick before.
        self.positions: dict[str, int] = {}
        self.last_positions: dict[str, int] = {}

    async def __aenter__(self) -> Tracker:
        await self.consumer.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.consumer.stop()

    async def ends(self) -> dict[int, int]:
        ends = await topic_end_offsets(self.consumer, self.config.topic)
        if ends is None:
            await look_up_topic(self.config.kafka, self.config.topic)  # raises if hidden
            raise TopicMissing(
                f"no topic {self.config.topic} at {self.config.kafka}: nothing to "
                "rebuild from (is ORDERS_TOPIC right?)"
            )
        return ends

    async def checkpoints(self) -> dict[tuple[str, int], int]:
        """(target name, partition) -> its stored checkpoint (next offset to apply)."""
        async with begin(self.engine) as connection:
            return await read_checkpoints(connection, self.targets, self.config.topic)

    async def replay_goal(self, stop: asyncio.Event) -> dict[int, int]:
        """Per partition, the offset just after the last event committed by now (0: none).

        Checkpoints that reach it have applied everything committed before the replay began;
        what comes later is the live projector's business, as in normal running. The last
        stable offset itself is no goal: transaction markers take offsets too, and under
        steady traffic the runner never moves a checkpoint past the last one. Incomplete once
        ``stop`` is set (while the broker is away, the reading would not end by itself).
        """
        ends = await self.ends()
        goal: dict[int, int] = {}
        window = 64  # offsets looked at before each end, widened where no event is in it
        while len(goal) < len(ends) and not stop.is_set():
            looking = {p: end for p, end in ends.items() if p not in goal}
            starts = {p: max(0, end - window) for p, end in looking.items()}
            last = await self._last_events(starts, looking, stop)
            for partition, start in starts.items():
                if partition in last:
                    goal[partition] = last[partition] + 1
                elif start == 0:
                    goal[partition] = 0
            window *= 16
        return goal

    async def _last_events(
        self, starts: dict[int, int], ends: dict[int, int], stop: asyncio.Event
    ) -> dict[int, int]:
        """Per partition, the offset of the last committed event in [start, end), if any."""
        tps = {
            p: TopicPartition(self.config.topic, p)
            for p, start in starts.items()
            if start < ends[p]
        }
        self.consumer.assign(list(tps.values()))
        for partition, tp in tps.items():
            self.consumer.seek(tp, starts[partition])
        last: dict[int, int] = {}
        reading = set(tps)
        while reading and not stop.is_set():
            fetched = await self.consumer.getmany(*(tps[p] for p in reading), timeout_ms=200)
            for tp, records in fetched.items():
                offsets = [r.offset for r in records if r.offset < ends[tp.partition]]
                if offsets:
                    last[tp.partition] = max(last.get(tp.partition, -1), *offsets)
            for partition in list(reading):
                if await self.consumer.position(tps[partition]) >= ends[partition]:
                    reading.discard(partition)
        self.consumer.assign([])  # or its fetcher goes on filling buffers nobody reads
        return last

    async def replayed(self, goal: dict[int, int]) -> bool:
        """Whether every target's checkpoint has reached ``goal`` in every partition."""
        stored = await self.checkpoints()
        return all(
            stored.get((t.name, partition), 0) >= offset
            for t in self.targets
            for partition, offset in goal.items()
        )

    async def lags(self) -> tuple[dict[str, int], int, int]:
        """Per target name, events behind the end; and (position, end) over all targets."""
        ends = await self.ends()
        stored = await self.checkpoints()
        lags = {
            t.name: sum(max(0, end - stored.get((t.name, p), 0)) for p, end in ends.items())
            for t in self.targets
        }
        self.positions = {name: sum(ends.values()) - lag for name, lag in lags.items()}
        position = (
            sum(min(stored.get((t.name, p), 0) for t in self.targets) for p in ends)
            if self.targets
            else sum(ends.values())
        )
        return lags, position, sum(ends.values())

    def progress(self, phase: str, position: int, end: int) -> Progress:
        now = time.monotonic()
        if self.first_position is None:
            self.first_position = position
        rate = 0.0
        if self.last is not None and now > self.last[0]:
            rate = (position - self.last[1]) / (now - self.last[0])
        projections = {
            name: Replayed(at, end, self._rate(at, self.last_positions.get(name), now))
            for name, at in self.positions.items()
        }
        self.last_positions = dict(self.positions)
        self.last = (now, position)
        return Progress(phase, position, end, max(rate, 0.0), now - self.started, projections)

    def _rate(self, position: int, before: int | None, now: float) -> float:
        if self.last is None or before is None or now <= self.last[0]:
            return 0.0
        return max(0.0, (position - before) / (now - self.last[0]))
